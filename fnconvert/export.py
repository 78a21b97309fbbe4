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

from .errors import FnconvertError

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
    return torch.jit.script(deploy) if isinstance(deploy.body, torch.jit.ScriptModule) else deploy


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
    with atomic_path(final) as tmp:
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


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:240] + "…") if len(text) > 240 else (text or type(e).__name__)
