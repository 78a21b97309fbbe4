"""ONNX models as input (placeholder until ONNX surgery lands)."""

from __future__ import annotations

from .errors import FnconvertError


def load_onnx_model(path, digest):
    raise FnconvertError(f"{path} is an ONNX model; ONNX input is not supported yet: export the PyTorch model instead")


def transform_onnx(opts, ds, loaded, log):  # pragma: no cover - replaced by the ONNX surgery module
    raise FnconvertError("ONNX input is not supported yet")
