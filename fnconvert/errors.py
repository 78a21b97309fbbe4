"""The one exception type for user errors.

A user error is a bad input, a refused file or a failed check: something the user can fix. The CLI prints its
message on one line and exits with its ``exit_code``; it never shows a traceback for it.
"""

from __future__ import annotations

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_BAD_INPUT = 1  # bad input, refused file, or a run that could not finish
EXIT_USAGE = 2  # Typer/Click usage errors
EXIT_VERIFY_FAILED = 3  # the exported model breached the tolerance


class FnconvertError(Exception):
    """A user error: the message names the offending value and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


class VerificationError(FnconvertError):
    """The exported ONNX model disagrees with the torch model beyond ``--atol``."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_VERIFY_FAILED)


def short_reason(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a user message (TorchScript's multi-line traceback reduced to its error)."""
    text = str(e)
    if "Traceback of TorchScript" in text:  # keep the error itself, not TorchScript's multi-line traceback
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines[-1].split(":", 1)[0].endswith("Error") else lines[-1]
    text = " ".join(text.split())
    return (text[:limit] + "…") if len(text) > limit else (text or type(e).__name__)
