"""``fnconvert transform``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import make_log, print_json, user_errors
from .config import apply_config

ExistingFile = dict(exists=True, file_okay=True, dir_okay=False, readable=True)


def transform(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file: TorchScript/.pt, torch.export .pt2, state_dict (+--arch), .safetensors or .onnx.")],
    data: Annotated[Optional[str], typer.Option(help=".npz file, ImageFolder tree (train/, test/) or cifar10|cifar100|mnist|fashion-mnist.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (must be empty unless --force).")] = Path("fnconvert-out"),
    factors: Annotated[str, typer.Option("--factors", help="Number of factors d, or 'auto' (Ahn–Horenstein).")] = "1",
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 3,
    no_finetune: Annotated[bool, typer.Option("--no-finetune", help="Surgery with the calibrated head only.")] = False,
    optimizer: Annotated[str, typer.Option(help="sgd | nag | adagrad | adam.")] = "adam",
    lr: Annotated[Optional[float], typer.Option(help="Base rate α (default: adam 1e-4; sgd, nag, adagrad 1e-3).")] = None,
    schedule: Annotated[str, typer.Option(help="constant | inv-sqrt (the paper's) | cosine.")] = "inv-sqrt",
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling, shuffling and initialisation.")] = 0,
    calib_samples: Annotated[Optional[int], typer.Option(help="Samples for the factor statistics (default: all).")] = None,
    method: Annotated[str, typer.Option(help="Factor method: auto | exact | randomized.")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    arch: Annotated[Optional[str], typer.Option(help="torchvision architecture of a state_dict, e.g. resnet18.")] = None,
    trust_model_code: Annotated[bool, typer.Option("--trust-model-code", help="Allow TorchScript / pickled modules, which run code.")] = False,
    normalize: Annotated[Optional[str], typer.Option(help="Per-channel MEAN,STD (or M1,M2,M3,S1,S2,S3) the model expects.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where torchvision data sets live or are downloaded.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    atol: Annotated[float, typer.Option(help="Max |onnxruntime − torch| allowed by the verification gate.")] = 1e-4,
    provider: Annotated[str, typer.Option(help="onnxruntime provider for verification: auto | cpu | cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints after a kill.")] = False,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="torch deterministic algorithms; names any op that refuses.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML file whose keys are these options; flags override it.", **ExistingFile)] = None,
    save_config: Annotated[Optional[Path], typer.Option(help="Write the effective configuration as TOML.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logs.")] = False,
) -> None:
    """Convert MODEL to its FN form, fine-tune it and export a drop-in model_fn.onnx.

    Example: fnconvert transform cnn.pt --trust-model-code --data cifar10-dev.npz --epochs 1 --out fn-out --json
    """
    from fnconvert.pipeline import TransformOptions, transform as run

    with user_errors():
        values = apply_config(ctx, config, save_config)
        if values.get("data") is None:
            raise _usage("--data is required (here or as `data` in --config)")
        fac = str(values.pop("factors"))
        values["factors"] = fac if fac == "auto" else _int_factors(fac)
        for key in ("out", "data_dir"):
            values[key] = None if values[key] is None else str(values[key])
        values["model"] = str(model)
        log = make_log(values.pop("quiet"), verbose)
        report = run(TransformOptions(**values), log)
        if json_out and report is not None:  # None on torchrun ranks other than 0
            print_json(report)


def _int_factors(text: str) -> int:
    from fnconvert.errors import FnconvertError

    try:
        d = int(text)
    except ValueError:
        raise FnconvertError(f"--factors {text!r} must be a positive integer or 'auto'")
    if d < 1:
        raise FnconvertError(f"--factors {d} must be ≥ 1 (or 'auto')")
    return d


def _usage(msg: str):
    from fnconvert.errors import EXIT_USAGE, FnconvertError

    return FnconvertError(msg, EXIT_USAGE)
