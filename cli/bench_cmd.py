"""``fnconvert bench``: the paper's experiments, baseline against FN, per optimizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import make_log, print_json, user_errors


def bench(
    data: Annotated[str, typer.Option(help=".npz file, ImageFolder tree (train/, test/) or cifar10|cifar100|mnist|fashion-mnist.")],
    out: Annotated[Path, typer.Option(help="Output folder for results.json, results.md, curves.png (must be empty unless --force).")],
    model: Annotated[str, typer.Option(help="logreg (§4.1) | mlp (2×1,000 ReLU, §4.2) | cnn (small AlexNet-style, §4.3).")] = "logreg",
    optimizers: Annotated[str, typer.Option(help="Comma list from sgd,nag,adagrad,adam.")] = "sgd,nag,adagrad,adam",
    n_factors: Annotated[int, typer.Option("--factors", help="Number of factors d of the FN model.")] = 1,
    epochs: Annotated[int, typer.Option(help="Epochs per run (1/√t decay per epoch).")] = 8,
    lr_grid: Annotated[str, typer.Option(help="Initial rates: auto (per optimizer) | a,b,c (all optimizers) | 'sgd:a,b;adam:c,d'.")] = "auto",
    extend_grid: Annotated[bool, typer.Option("--extend-grid/--no-extend-grid", help="Add rates past a grid edge where a side's best rate lies (≤3 per direction; never with --quick).")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch size (the paper's 200).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for the initial weights, the data order and subsets.")] = 0,
    method: Annotated[str, typer.Option(help="Factor method: auto | exact | randomized.")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default). 1 avoids thrashing on a busy machine.")] = 0,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where torchvision data sets live.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: ≤2,000/500 samples, ≤2 epochs, 2 rates per optimizer with auto.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress logs.")] = False,
) -> None:
    """Train MODEL on raw inputs (baseline) and in FN form from the same initial weights, per optimizer and rate.

    Example: fnconvert bench --data cifar10-dev.npz --model logreg --factors 1 --epochs 8 --out bench-out
    """
    from fnconvert.bench import BenchOptions, render_markdown, run_bench

    with user_errors():
        results = run_bench(
            BenchOptions(data=data, out=str(out), model=model, optimizers=optimizers, factors=n_factors,
                         epochs=epochs, lr_grid=lr_grid, batch_size=batch_size, seed=seed, quick=quick,
                         force=force, method=method, device=device, threads=threads, extend_grid=extend_grid,
                         data_dir=None if data_dir is None else str(data_dir)),
            make_log(quiet, False),
        )
        if json_out:
            print_json(results)
        else:
            typer.echo(render_markdown(results).split("\n## Grid")[0].rstrip())
