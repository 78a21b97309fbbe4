"""Writing the FN model and its statistics: ONNX, TorchScript, torch.export, factor files and the report.

Every artifact is written under a temporary name in the output folder and renamed when complete, so a kill never
leaves a truncated file under a final name. ``report.json`` goes last: its presence marks a complete result.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import FnconvertError, short_reason
from .log import jit_deprecation_silenced

TMP_PREFIX = ".fnconvert-tmp-"
ONNX_INPUT = "input"
ONNX_OUTPUT = "output"


def tmp_path(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds."""
    tmp = tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def clean_stale_tmp(out: Path) -> None:
    """Remove temporary files an earlier, killed run left behind."""
    if out.is_dir():
        for f in out.iterdir():
            if f.name.startswith(TMP_PREFIX) and f.is_file():
                with contextlib.suppress(OSError):
                    f.unlink()


def write_json(obj: dict, final: Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _scriptable(deploy: torch.nn.Module) -> torch.nn.Module:
    # A Python wrapper around a TorchScript body cannot be traced ("not part of the active trace"): script it.
    if not isinstance(deploy.body, torch.jit.ScriptModule):
        return deploy
    with jit_deprecation_silenced():
        return torch.jit.script(deploy)


def export_onnx(deploy: torch.nn.Module, example: torch.Tensor, final: Path, *, opset: int = 17,
                metadata: dict | None = None) -> None:
    """Export a drop-in ONNX model: input ``input`` (batch dynamic), output ``output``, FN metadata attached."""
    import onnx

    module = _scriptable(deploy)
    with atomic_path(final) as tmp:
        try:
            with warnings.catch_warnings():
                # The legacy exporter warns that it is deprecated; the TorchScript-based path is the one that can
                # export a scripted wrapper around a TorchScript body, so it is used on purpose.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                torch.onnx.export(
                    module, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                    dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                )
        except Exception as e:
            raise FnconvertError(f"ONNX export at opset {opset} failed ({_short(e)}); try another --opset (e.g. 17)")
        model = onnx.load(str(tmp))
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise FnconvertError(f"the exported ONNX model fails onnx.checker ({_short(e)}); report this as a bug")
        onnx.save(model, str(tmp))


def export_torchscript(deploy: torch.nn.Module, example: torch.Tensor, final: Path) -> None:
    with atomic_path(final) as tmp, jit_deprecation_silenced():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if isinstance(deploy.body, torch.jit.ScriptModule):
                ts = torch.jit.script(deploy)
            else:
                ts = torch.jit.trace(deploy, example, check_trace=False)
        torch.jit.save(ts, str(tmp))


def export_pt2(deploy: torch.nn.Module, example: torch.Tensor, final: Path) -> str | None:
    """Write a torch.export program; returns None, or the reason it could not be made."""
    if isinstance(deploy.body, torch.jit.ScriptModule):
        return "the source is TorchScript, which torch.export cannot trace"
    try:
        batch = torch.export.Dim("batch", min=1)
        ep = torch.export.export(deploy, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:
        return f"torch.export failed: {_short(e)}"
    with atomic_path(final) as tmp:
        torch.export.save(ep, str(tmp))
    return None


_short = short_reason  # one implementation, in errors.py


def plot_curves(history: list[dict], final: Path, *, accuracy_before: float | None = None) -> None:
    """curves.png: training loss and test accuracy per epoch (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="FN")
    ax1.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], "o-", color="tab:red", label="FN")
    if accuracy_before is not None:
        ax2.axhline(accuracy_before, ls="--", color="tab:blue", label="original model")
    ax2.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    ax2.legend()
    if not history:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no fine-tuning (--no-finetune)", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report_md(report: dict, final: Path) -> None:
    """report.md: the run summarised for a person."""
    r = report
    sv = ", ".join(f"{s:.4g}" for s in r["singular_values"])
    evr = ", ".join(f"{e:.2%}" for e in r["explained_variance_ratio"])
    lines = [
        f"# fnconvert report — {Path(r['source']['path']).name}",
        "",
        f"- Source: `{r['source']['path']}` ({r['source']['format']}, sha256 `{r['source']['sha256'][:16]}…`)",
        f"- Data: {r['data'].get('name')} — {r['data']['train_samples']} train / {r['data']['test_samples']} test; "
        f"calibration on {r['calibration_samples']} samples",
        f"- Preprocessing: scale {r['preprocessing']['scale']}, normalize {r['preprocessing']['normalize']}",
        f"- Factors: d = {r['factors']} ({r['factors_choice']}), method {r['factor_method']}",
        f"- Singular values λ1..λ{r['factors'] + 1}: {sv}; explained variance {evr}",
        f"- Rates: factor {', '.join(f'{x:.3g}' for x in r['lr']['factor'])}, residual {r['lr']['residual']:.3g} "
        f"({r['lr']['optimizer']}, {r['lr']['schedule']})",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| original model | {r['accuracy_before']:.4f} |",
        f"| FN, calibrated head only | {r['accuracy_calibrated']:.4f} |",
        f"| FN after fine-tuning | {r['accuracy_after']:.4f} |",
        f"| model_fn.onnx in onnxruntime | {r['accuracy_onnx']:.4f} |",
        "",
    ]
    if r["epochs"]:
        lines += ["| epoch | train loss | test accuracy | seconds |", "|---|---|---|---|"]
        lines += [f"| {e['epoch']} | {e['train_loss']:.4f} | {e['test_accuracy']:.4f} | {e['seconds']:.1f} |"
                  for e in r["epochs"]]
        lines.append("")
    v = r["verification"]
    lines += [
        f"Verification: onnxruntime ({v['provider']}) vs the {v.get('reference', 'torch FN model')}, "
        f"max |diff| {v['max_abs_diff']:.3g} "
        f"(atol {v['atol']}) at batch sizes {v['batch_sizes']}: **{'passed' if v['passed'] else 'FAILED'}**.",
        "",
        "Artifacts: " + ", ".join(f"`{a}`" for a in r["artifacts"]) + ".",
        "",
        "![curves](curves.png) ![spectrum](spectrum.png)",
        "",
    ]
    with atomic_path(final) as tmp:
        tmp.write_text("\n".join(lines))
