"""``transform``: data → factors → surgery → finetune → export → verify, with every input validated first."""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FnconvertError, VerificationError
from .distributed import init_from_env, shutdown
from .log import NULL_LOG, Log, jit_deprecation_silenced

ARTIFACTS = ("model_fn.onnx", "model_fn.pt", "model_fn.pt2", "factors.safetensors", "factors.npz", "spectrum.png",
             "curves.png", "report.md", "report.json")
SPECTRUM_FACTORS = 10  # factors fitted for the spectrum plot and --factors auto


@dataclass
class TransformOptions:
    model: str
    data: str
    out: str = "fnconvert-out"
    factors: int | str = 1  # an int, or "auto"
    epochs: int = 3
    no_finetune: bool = False
    optimizer: str = "adam"
    lr: float | None = None
    schedule: str = "inv-sqrt"
    batch_size: int = 128
    seed: int = 0
    calib_samples: int | None = None
    method: str = "auto"
    device: str = "auto"
    arch: str | None = None
    trust_model_code: bool = False
    normalize: str | None = None
    data_dir: str | None = None
    opset: int = 17
    atol: float = 1e-4
    force: bool = False
    resume: bool = False
    deterministic: bool = False
    provider: str = "auto"
    extra: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FnconvertError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise FnconvertError(f"--device {device!r} is not one of auto, cpu, cuda")
    return device


def _check_out(out: Path, force: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FnconvertError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (force or resume):
        raise FnconvertError(f"--out {out} is not empty; pass --force to overwrite, or choose another folder")


def transform(opts: TransformOptions, log: Log = NULL_LOG) -> dict | None:
    """Convert ``opts.model`` to its FN form; returns the report (also written to ``OUT/report.json``).

    Under torchrun only rank 0 returns the report; the other ranks return None.
    """
    import torch

    from .finetune import TrainConfig

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # ---- validate everything before anything is written -------------------------------------------------------
    out = Path(opts.out)
    _check_out(out, opts.force, opts.resume)
    epochs = 0 if opts.no_finetune else opts.epochs
    cfg = TrainConfig(epochs, opts.optimizer, opts.lr, opts.schedule, opts.batch_size, opts.seed).validate()
    if not (opts.atol > 0):
        raise FnconvertError(f"--atol {opts.atol} must be positive")
    if not 9 <= opts.opset <= 23:
        raise FnconvertError(f"--opset {opts.opset} is outside 9..23; the default 17 suits onnxruntime ≥ 1.13")
    d_auto = isinstance(opts.factors, str)
    if d_auto and opts.factors != "auto":
        raise FnconvertError(f"--factors {opts.factors!r} must be a positive integer or 'auto'")
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    ctx, device = init_from_env(device)  # torchrun: join the process group; each rank gets its shard below
    if ctx.active:
        log = Log(quiet=log.quiet, verbose=log.verbose, stream=log.stream, rank=ctx.rank)
    if opts.deterministic:
        # cuBLAS needs this workspace setting for deterministic GEMMs; it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _transform(opts, log, ctx, device, out, cfg, timings, t_all)
    except RuntimeError as e:
        if opts.deterministic and "deterministic" in str(e):
            first = str(e).strip().splitlines()[0]
            raise FnconvertError(f"--deterministic: an op refused: {first}; drop --deterministic, or use --device cpu")
        raise
    finally:
        if opts.deterministic:
            torch.use_deterministic_algorithms(False)
        shutdown(ctx)


def _transform(opts, log, ctx, device, out, cfg, timings, t_all) -> dict | None:
    from .data import load_data
    from .export import export_onnx, export_pt2, export_torchscript
    from .finetune import config_hash, evaluate, finetune, train_config_dict
    from .models import load_model
    from .surgery import analyze_output, build_fn_model

    epochs = cfg.epochs

    ds = load_data(opts.data, data_dir=opts.data_dir, normalize=opts.normalize)
    with jit_deprecation_silenced():
        loaded = load_model(opts.model, arch=opts.arch, trust_model_code=opts.trust_model_code)
    if loaded.format == "onnx":
        from .onnx_io import transform_onnx

        return transform_onnx(opts, ds, loaded, log)
    model = loaded.module.to(device)
    example = next(ds.train.batches(2))[0].to(device)
    analysis = analyze_output(model, example)
    _check_labels(ds, analysis.num_classes)
    log.info(f"model: {loaded.format} {loaded.path.name}, {analysis.num_classes} classes, output "
             f"{'logits' if analysis.tail == 'none' else analysis.tail} after {analysis.dense_op}")

    calib_idx = ds.calibration_indices(opts.calib_samples, opts.seed)
    my_calib = ctx.shard(calib_idx)  # under torchrun each rank streams its shard; the sums are all-reduced
    t0 = time.perf_counter()
    factors, spectrum, d_reason = fit_for_transform(
        ds.train.flat_batches(512, my_calib), opts.factors, method=opts.method, device=device, seed=opts.seed)
    d = factors.d
    timings["factors"] = time.perf_counter() - t0
    log.info(f"factors: d={d} by {factors.method} on {factors.n_samples} samples "
             f"(λ1..λ{d + 1} = {np.array2string(factors.singular_values, precision=4)})")

    test_idx = ctx.shard(np.arange(len(ds.test)))
    accuracy_before = evaluate(model, ds.test, device=device, indices=test_idx)
    t0 = time.perf_counter()
    calib_x = _Reiter(lambda: (x.to(device) for x, _ in ds.train.batches(512, my_calib)))
    fn, analysis = build_fn_model(model, factors, calib_x, example)
    timings["calibration"] = time.perf_counter() - t0
    accuracy_calibrated = evaluate(fn, ds.test, device=device, indices=test_idx)
    log.info(f"accuracy: original {accuracy_before:.4f}, FN after calibration {accuracy_calibrated:.4f}")

    run_hash = config_hash({"model": loaded.sha256, "data": str(opts.data), "d": d, "train": train_config_dict(cfg),
                            "calib": opts.calib_samples, "normalize": opts.normalize, "method": opts.method})
    # ---- from here on the output folder exists (rank 0 alone writes) -----------------------------------------
    stage = open_out(out, opts) if ctx.is_main else None
    ctx.barrier()
    history: list[dict] = []
    if epochs > 0:
        t0 = time.perf_counter()
        history = finetune(fn, ds, cfg, factors.singular_values, device=device, checkpoint_dir=out / "checkpoints",
                           run_hash=run_hash, resume=opts.resume, log=log, dist_ctx=ctx)
        timings["finetune"] = time.perf_counter() - t0
    if not ctx.is_main:
        ctx.barrier()  # wait for rank 0 to export and verify, so torchrun sees every rank finish together
        return None  # only rank 0 reports

    t0 = time.perf_counter()
    deploy = fn.deploy().cpu()
    example_cpu = next(ds.test.batches(2))[0]
    export_onnx(deploy, example_cpu, stage / "model_fn.onnx", opset=opts.opset,
                metadata=fn_metadata(loaded, ds, factors, analysis.tail))
    export_torchscript(deploy, example_cpu, stage / "model_fn.pt")
    pt2_skipped = export_pt2(deploy, example_cpu, stage / "model_fn.pt2")
    return verify_and_finish(
        out, stage, opts, log, deploy=deploy, spectrum=spectrum, t_export=t0, t_all=t_all, loaded=loaded, ds=ds,
        factors=factors, d_reason=d_reason, cfg=cfg, calib_samples=len(calib_idx), accuracy_before=accuracy_before,
        accuracy_calibrated=accuracy_calibrated, history=history, pt2_skipped=pt2_skipped, timings=timings,
        device=device, world_size=ctx.world_size, barrier=ctx.barrier,
        input_info={"name": "input", "shape": ["batch", *ds.train.input_shape], "dtype": "float32"},
        output_info={"name": "output", "classes": analysis.num_classes, "activation": analysis.tail,
                     "final_layer": analysis.dense_op})


# ---- the steps both sources share (PyTorch here, ONNX in onnx_io.transform_onnx) -----------------------------


STAGE = ".fnconvert-stage"


def open_out(out: Path, opts) -> Path:
    """Make ``out`` ready; return the staging folder the artifacts are written to before :func:`publish`.

    A previous result stays in place until the new one is complete, so a kill at any moment leaves either the
    previous complete result or none (only ``checkpoints/``). On --force (without --resume) old checkpoints go.
    """
    from .export import clean_stale_tmp

    if out.is_dir() and opts.force and not opts.resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    stage = out / STAGE
    shutil.rmtree(stage, ignore_errors=True)  # what a killed run staged is incomplete by definition
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path, also: tuple[str, ...] = ()) -> None:
    """Move the staged artifacts into ``out``: the old report first out, the new report.json last in."""
    (out / "report.json").unlink(missing_ok=True)  # from here the old result no longer counts as complete
    for name in (*ARTIFACTS, *also):
        if not (stage / name).exists():
            (out / name).unlink(missing_ok=True)  # e.g. an old model_fn.pt2 this run could not make
    for f in sorted(stage.iterdir(), key=lambda f: f.name == "report.json"):
        os.replace(f, out / f.name)
    stage.rmdir()


def fn_metadata(loaded, ds, factors, tail: str) -> dict:
    """The metadata_props every model_fn.onnx carries."""
    from . import __version__

    return {
        "fnconvert.version": __version__, "fnconvert.factors": str(factors.d),
        "fnconvert.singular_values": [float(s) for s in factors.singular_values],
        "fnconvert.preprocessing": ds.train.pre.to_dict(), "fnconvert.output": tail,
        "fnconvert.source_sha256": loaded.sha256, "fnconvert.input_shape": list(ds.train.input_shape),
    }


def write_statistics(out: Path, factors, spectrum, history: list[dict], accuracy_before: float) -> None:
    """factors.safetensors, factors.npz, spectrum.png and curves.png."""
    from .export import plot_curves
    from .inspect import inspect_spectrum, plot_spectrum

    factors.save(out / "factors.safetensors")
    factors.save(out / "factors.npz")
    plot_spectrum(inspect_spectrum(spectrum, spectrum.d), out / "spectrum.png", chosen_d=factors.d)
    plot_curves(history, out / "curves.png", accuracy_before=accuracy_before)


def verify_and_finish(out: Path, stage: Path, opts, log: Log, *, deploy, spectrum, t_export: float, t_all: float,
                      **report_args) -> dict:
    """The steps after the model files, shared by PyTorch and ONNX sources: the statistics files, the onnxruntime
    check of model_fn.onnx against ``deploy`` on the test split, then :func:`finish` (``report_args``)."""
    from .verify import compare, open_session

    if report_args["pt2_skipped"]:
        log.info(f"model_fn.pt2 not written: {report_args['pt2_skipped']}")
    write_statistics(stage, report_args["factors"], spectrum, report_args["history"], report_args["accuracy_before"])
    timings = report_args["timings"]
    timings["export"] = time.perf_counter() - t_export
    t0 = time.perf_counter()
    check = compare(open_session(stage / "model_fn.onnx", opts.provider), deploy, report_args["ds"].test,
                    atol=opts.atol)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    return finish(out, stage, opts, log, check=check, **report_args)


def finish(out: Path, stage: Path, opts, log: Log, *, loaded, ds, factors, d_reason: str, cfg, calib_samples: int,
           accuracy_before: float, accuracy_calibrated: float, history: list[dict], check: dict, pt2_skipped,
           timings: dict, device: str, input_info: dict, output_info: dict, world_size: int = 1,
           barrier=lambda: None, source_extra: dict | None = None, reference: str = "torch FN model",
           also: tuple[str, ...] = ()) -> dict:
    """Write report.md and report.json (last: its presence marks a complete result), then apply the gate."""
    import onnxruntime
    import torch

    from . import __version__
    from .export import write_json, write_report_md
    from .finetune import adaptive_rates, train_config_dict

    rates = adaptive_rates(factors.singular_values, cfg.alpha)
    accuracy_after = history[-1]["test_accuracy"] if history else accuracy_calibrated
    report = {
        "fnconvert_version": __version__,
        "source": loaded.source_dict() | (source_extra or {}),
        "data": ds.source | {"name": ds.name, "train_samples": len(ds.train), "test_samples": len(ds.test)},
        "factors": factors.d,
        "factors_choice": d_reason,
        "factor_method": factors.method,
        "singular_values": [float(s) for s in factors.singular_values],
        "explained_variance_ratio": [float(s) for s in factors.explained_variance_ratio()],
        "lr": {"alpha": cfg.alpha, "residual": rates["residual"], "factor": rates["factor"],
               "optimizer": cfg.optimizer, "schedule": cfg.schedule},
        "preprocessing": ds.train.pre.to_dict(),
        "calibration_samples": int(calib_samples),
        "input": input_info,
        "output": output_info,
        "accuracy_before": accuracy_before,
        "accuracy_calibrated": accuracy_calibrated,
        "accuracy_after": accuracy_after,
        "accuracy_onnx": check["accuracy"],
        "epochs": history,
        "train": train_config_dict(cfg) | {"device": device},
        "onnx_max_abs_diff": check["max_abs_diff"],
        "verification": check | {"reference": reference},
        "artifacts": [a for a in ARTIFACTS if (stage / a).exists() or a in ("report.md", "report.json")],
        "pt2_skipped": pt2_skipped,
        "world_size": world_size,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "python": platform.python_version(), "device": device},
    }
    write_report_md(report, stage / "report.md")
    write_json(report, stage / "report.json")
    publish(stage, out, also)  # report.json last: its presence marks a complete result
    barrier()
    if not check["passed"]:
        raise VerificationError(
            f"model_fn.onnx differs from the {reference} by {check['max_abs_diff']:.3g} > --atol {opts.atol}; "
            f"the report in {out / 'report.json'} records the failure"
        )
    log.info(f"wrote {out}: accuracy {accuracy_before:.4f} → {accuracy_after:.4f}; onnx max |diff| "
             f"{check['max_abs_diff']:.2e}")
    return report


def fit_for_transform(calib, factors_opt, *, method: str, device: str, seed: int):
    """Fit once for both the chosen d and the spectrum: (factors with d, factors with K ≥ d, why this d).

    The top-K fit holds the top-d one: V_d, B̂_d and λ1..λ_{d+1} are its leading columns/rows (B̂'s rows decouple
    because the factor scores are orthogonal). So one pass serves --factors auto, the spectrum plot and the model.
    """
    from dataclasses import replace

    from .factors import fit_factors
    from .inspect import choose_factors

    d_auto = factors_opt == "auto"
    want = None if d_auto else int(factors_opt)
    try:
        spectrum = fit_factors(calib, max(SPECTRUM_FACTORS, want or 1), method=method, device=device, seed=seed)
    except (FnconvertError, RuntimeError):  # RuntimeError: torch.linalg errors on a rank-deficient sketch
        if d_auto:
            raise
        spectrum = None  # the data's rank is below K: fit exactly d (which reports d's own rank problem, if any)
    if d_auto:
        d, reason = choose_factors(spectrum, SPECTRUM_FACTORS)
    else:
        d, reason = want, "given by --factors"
    if spectrum is None:
        spectrum = fit_factors(calib, d, method=method, device=device, seed=seed)
    factors = replace(spectrum, V=spectrum.V[:, :d].copy(), B=spectrum.B[:d].copy(),
                      singular_values=spectrum.singular_values[: d + 1].copy())
    return factors, spectrum, reason


class _Reiter:
    """Turn a generator factory into a re-iterable."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def _check_labels(ds, num_classes: int) -> None:
    for name, split in (("train", ds.train), ("test", ds.test)):
        top = int(split.y.max(initial=0))
        if top >= num_classes:
            i = int(np.argmax(split.y >= num_classes))
            raise FnconvertError(
                f"{name} label {top} (sample {i}) is out of range for a model with {num_classes} outputs; "
                "labels must be 0 … classes-1: check the data matches the model"
            )



def write_factors(data, out, d: int, *, calib_samples=None, method="auto", device="auto", seed=0, normalize=None,
                  data_dir=None, log: Log = NULL_LOG) -> dict:
    """``fnconvert factors``: fit the factors of ``data``'s training inputs and write them to ``out``."""
    from .data import load_data
    from .factors import fit_factors

    out = Path(out)
    if out.suffix not in (".safetensors", ".npz"):
        raise FnconvertError(f"--out {out} must end in .safetensors or .npz")
    if not out.parent.is_dir():
        raise FnconvertError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    ds = load_data(data, data_dir=data_dir, normalize=normalize)
    idx = ds.calibration_indices(calib_samples, seed)
    factors = fit_factors(ds.train.flat_batches(512, idx), d, method=method, device=resolve_device(device), seed=seed)
    factors.save(out)
    log.info(f"wrote {out}: d={d}, {factors.method}, {factors.n_samples} samples")
    return {"path": str(out), "factors": d, "method": factors.method, "n_samples": factors.n_samples,
            "p": factors.p, "singular_values": [float(s) for s in factors.singular_values],
            "explained_variance_ratio": [float(s) for s in factors.explained_variance_ratio()],
            "preprocessing": ds.train.pre.to_dict()}


def inspect_source(source, *, max_factors=10, plot=None, calib_samples=None, device="auto", seed=0, normalize=None,
                   data_dir=None) -> dict:
    """``fnconvert inspect``: the spectrum of a data set's inputs, or of a saved factors file."""
    from .factors import Factors
    from .inspect import inspect_spectrum, plot_spectrum

    if max_factors < 1:
        raise FnconvertError(f"--max-factors {max_factors} must be ≥ 1")
    path = Path(str(source))
    if path.is_file() and path.suffix in (".safetensors", ".npz") and _is_factors_file(path):
        info = inspect_spectrum(Factors.load(path), max_factors)
    else:
        from .data import load_data

        ds = load_data(source, data_dir=data_dir, normalize=normalize)
        idx = ds.calibration_indices(calib_samples, seed)
        info = inspect_spectrum(ds.train.flat_batches(512, idx), max_factors, seed=seed, device=resolve_device(device))
    if plot is not None:
        plot_spectrum(info, plot, chosen_d=info.get("suggested_factors"))
        info["plot"] = str(plot)
    return info


def _is_factors_file(path: Path) -> bool:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return "V" in z.files and "singular_values" in z.files
        except Exception:  # not an npz at all: let the data loader report it
            return False
    return True
