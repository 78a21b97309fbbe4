"""fnconvert: turn a trained classifier into its Factor Normalization (FN) form, fine-tune it, ship it as ONNX.

The public API is small and imported lazily, so ``import fnconvert`` (and ``fnconvert --help``) stays instant:
torch is loaded only when a function that needs it is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import FnconvertError, VerificationError

__version__ = "0.1.0"

_LAZY = {
    "fit_factors": "factors",
    "Factors": "factors",
    "load_data": "data",
    "load_model": "models",
    "build_fn_model": "surgery",
    "FNModel": "surgery",
    "finetune": "finetune",
    "TrainConfig": "finetune",
    "param_groups": "finetune",
    "transform": "pipeline",
    "TransformOptions": "pipeline",
    "verify_model": "verify",
    "inspect_spectrum": "inspect",
    "run_bench": "bench",
    "BenchOptions": "bench",
}

__all__ = ["__version__", "FnconvertError", "VerificationError", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .data import load_data
    from .factors import Factors, fit_factors
    from .finetune import TrainConfig, finetune, param_groups
    from .bench import BenchOptions, run_bench
    from .inspect import inspect_spectrum
    from .models import load_model
    from .pipeline import TransformOptions, transform
    from .surgery import FNModel, build_fn_model
    from .verify import verify_model


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fnconvert' has no attribute {name!r}")
