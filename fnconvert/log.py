"""Logging to stderr: a progress bar on a terminal, plain lines elsewhere (CI logs stay free of ANSI codes)."""

from __future__ import annotations

import contextlib
import sys
import time


class Log:
    def __init__(self, quiet: bool = False, verbose: bool = False, stream=None, rank: int = 0):
        self.quiet = quiet or rank != 0  # only rank 0 talks under torchrun
        self.verbose = verbose and not self.quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(f"[fnconvert {time.perf_counter() - self._t0:7.1f}s] {msg}", file=self.stream, flush=True)

    def debug(self, msg: str) -> None:
        if self.verbose:
            self.info(msg)

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        """Yields ``advance(n=1)``. A rich bar on a TTY; nothing at all otherwise (the caller logs a line per epoch)."""
        if self.quiet or not self.tty:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(file=self.stream), transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


NULL_LOG = Log(quiet=True)


@contextlib.contextmanager
def jit_deprecation_silenced():
    """torch 2.14 marks torch.jit.* deprecated with a FutureWarning on every call.

    fnconvert reads TorchScript and writes model_fn.pt because users ask for it; the README says to prefer
    model_fn.pt2 / model_fn.onnx. Only that one known message is silenced, nothing else.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield
