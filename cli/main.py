"""``fnconvert``: the Typer app. Each command parses, calls one library function and prints.

Nothing here imports torch at module level, so ``fnconvert --help`` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fnconvert import __version__

from . import bench_cmd, factors_cmd, transform_cmd, verify_cmd

app = typer.Typer(
    name="fnconvert",
    help="Turn a trained classifier into its Factor Normalization (FN) form, fine-tune it, ship it as ONNX.\n\n"
    "Example: fnconvert transform model.pt --data cifar10 --out fn-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fnconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Exit codes: 0 ok, 1 bad input or refused file, 2 usage error, 3 verification failed."""


app.command("transform")(transform_cmd.transform)
app.command("factors")(factors_cmd.factors)
app.command("inspect")(factors_cmd.inspect)
app.command("verify")(verify_cmd.verify)
app.command("predict")(verify_cmd.predict)
app.command("bench")(bench_cmd.bench)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
