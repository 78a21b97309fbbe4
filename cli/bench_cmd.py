"""``fnconvert bench`` (placeholder: the paper's protocol)."""

from __future__ import annotations

import typer


def bench() -> None:
    """Reproduce the paper's baseline-vs-FN experiments (not implemented yet)."""
    typer.echo("error: bench is not implemented yet", err=True)
    raise typer.Exit(1)
