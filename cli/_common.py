"""What every command shares: one-line user errors, logging flags, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys

import typer

from fnconvert.errors import FnconvertError


@contextlib.contextmanager
def user_errors():
    """A user error becomes one line on stderr and its exit code; never a traceback."""
    try:
        yield
    except FnconvertError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; rerun with --resume to continue from the last checkpoint", err=True)
        raise typer.Exit(130)


def make_log(quiet: bool, verbose: bool):
    from fnconvert.log import Log

    return Log(quiet=quiet, verbose=verbose)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
