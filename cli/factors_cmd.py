"""``fnconvert factors`` and ``fnconvert inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import make_log, print_json, user_errors


def factors(
    data: Annotated[str, typer.Argument(help=".npz file, ImageFolder tree or torchvision name.")],
    out: Annotated[Path, typer.Option(help="FILE.safetensors or FILE.npz.")],
    n_factors: Annotated[int, typer.Option("--factors", help="Number of factors d.")] = 1,
    calib_samples: Annotated[Optional[int], typer.Option(help="Training samples to use (default: all).")] = None,
    method: Annotated[str, typer.Option(help="auto | exact | randomized.")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for sampling and the randomized method.")] = 0,
    normalize: Annotated[Optional[str], typer.Option(help="Per-channel MEAN,STD applied before the statistics.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where torchvision data sets live.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a summary as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Fit the factors (mean, V, B, singular values) of DATA's training inputs and write them alone.

    Example: fnconvert factors cifar10-dev.npz --factors 2 --out factors.safetensors --json
    """
    from fnconvert.pipeline import write_factors

    with user_errors():
        summary = write_factors(data, out, n_factors, calib_samples=calib_samples, method=method, device=device,
                                seed=seed, normalize=normalize, data_dir=data_dir, log=make_log(quiet, False))
        if json_out:
            print_json(summary)


def inspect(
    source: Annotated[str, typer.Argument(help="DATA (.npz, folder, torchvision name) or a FACTORS file.")],
    max_factors: Annotated[int, typer.Option(help="How many factors to examine (K).")] = 10,
    plot: Annotated[Optional[Path], typer.Option(help="Write a scree plot PNG here.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="Training samples to use (default: all).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    normalize: Annotated[Optional[str], typer.Option(help="Per-channel MEAN,STD.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Report the spectrum: singular values, explained variance, condition numbers, rate multipliers, suggested d.

    Example: fnconvert inspect cifar10-dev.npz --max-factors 10 --plot spectrum.png --json
    """
    from fnconvert.pipeline import inspect_source

    with user_errors():
        info = inspect_source(source, max_factors=max_factors, plot=plot, calib_samples=calib_samples,
                              device=device, seed=seed, normalize=normalize, data_dir=data_dir)
        if json_out:
            print_json(info)
        else:
            _print_table(info)


def _print_table(info: dict) -> None:
    sv, evr = info["singular_values"], info["explained_variance_ratio"]
    mult = info.get("lr_multipliers", [])
    typer.echo(f"samples {info.get('n_samples')}  features {info.get('p')}  method {info.get('method')}")
    typer.echo(f"{'j':>3} {'singular value':>15} {'explained':>10} {'(λ1/λj+1)²':>12}")
    for j, (s, e) in enumerate(zip(sv, evr), start=1):
        m = mult[j - 1] if j - 1 < len(mult) else None
        m = f"{m:12.3f}" if m is not None else ("  (λ zero)" if j - 1 < len(mult) else "")
        typer.echo(f"{j:>3} {s:15.4f} {e:10.4%} {m}")
    typer.echo(f"suggested_factors: {info['suggested_factors']} ({info.get('suggested_factors_reason', '')})")
