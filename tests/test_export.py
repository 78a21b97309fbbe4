"""fnconvert.export: ONNX interface (names, dynamic batch, opset, metadata), full checker, TorchScript / .pt2
round trips against the torch FN model, onnxruntime parity, and atomic writes that leave no temporary files."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fnconvert.errors import FnconvertError
from fnconvert.export import (TMP_PREFIX, atomic_path, clean_stale_tmp, export_onnx, export_pt2, export_torchscript,
                              write_json)
from fnconvert.surgery import build_fn_model

SHAPE = (3, 8, 8)


def _cnn(softmax: bool = False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
              nn.Linear(64, 6)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    m = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, *SHAPE, generator=g) + torch.rand(64, 1, 1, 1, generator=g)


def _deploy(model, x, d=2):
    X = x.reshape(len(x), -1).double().numpy()
    mean = X.mean(0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    f = SimpleNamespace(d=d, mean=mean, V=vt[:d].T, B=vt[:d], singular_values=s[: d + 1])
    fn, _ = build_fn_model(model, f, [x], x[:2])
    return fn.deploy()


def _script(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(m)


@pytest.fixture(scope="module", params=["eager", "torchscript"])
def deploy(request, x):
    model = _cnn()
    return _deploy(model if request.param == "eager" else _script(model), x)


def _no_tmp(folder):
    left = [f.name for f in folder.iterdir() if f.name.startswith(TMP_PREFIX) or ".tmp" in f.name]
    assert left == [], f"temporary files left behind: {left}"


# ------------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("opset", [13, 17])
def test_onnx_interface_metadata_and_checker(deploy, x, tmp_path, opset):
    path = tmp_path / "model_fn.onnx"
    meta = {"fnconvert.version": "0.1.0", "fnconvert.singular_values": [3.5, 1.25], "fnconvert.output": "none"}
    export_onnx(deploy, x[:2], path, opset=opset, metadata=meta)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model_fn.onnx"]
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)  # the full checker, with shape inference, on the written file
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, out.name) == ("input", "output")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[0].dim_param
    props = {p.key: p.value for p in m.metadata_props}
    assert props["fnconvert.version"] == "0.1.0" and props["fnconvert.output"] == "none"
    assert json.loads(props["fnconvert.singular_values"]) == [3.5, 1.25]
    # onnxruntime equals the torch FN model at several batch sizes
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):
        got = sess.run(None, {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            want = deploy(x[:n]).numpy()
        assert got.shape == (n, 6)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_onnx_export_of_a_softmax_model_keeps_the_softmax(x, tmp_path):
    deploy = _deploy(_cnn(softmax=True), x)
    export_onnx(deploy, x[:2], tmp_path / "m.onnx")
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(got, deploy(x).numpy(), atol=1e-6)


def test_failed_onnx_export_leaves_nothing(deploy, x, tmp_path):
    with pytest.raises(FnconvertError, match="opset 99"):
        export_onnx(deploy, x[:2], tmp_path / "bad.onnx", opset=99)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ TorchScript, .pt2


def test_torchscript_round_trip(deploy, x, tmp_path):
    export_torchscript(deploy, x[:2], tmp_path / "model_fn.pt")
    _no_tmp(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(tmp_path / "model_fn.pt"))
    with torch.no_grad():
        for n in (1, 5, 64):  # a traced graph must not have the example's batch size baked in
            np.testing.assert_allclose(loaded(x[:n]).numpy(), deploy(x[:n]).numpy(), atol=1e-6)


def test_pt2_round_trip_or_reason(deploy, x, tmp_path):
    reason = export_pt2(deploy, x[:2], tmp_path / "model_fn.pt2")
    if isinstance(deploy.body, torch.jit.ScriptModule):
        assert reason and "TorchScript" in reason
        assert not (tmp_path / "model_fn.pt2").exists()
        return
    assert reason is None
    _no_tmp(tmp_path)
    ep = torch.export.load(str(tmp_path / "model_fn.pt2"))
    with torch.no_grad():
        for n in (1, 9):
            np.testing.assert_allclose(ep.module()(x[:n]).numpy(), deploy(x[:n]).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ atomic writes


def test_atomic_path_renames_only_on_success(tmp_path):
    final = tmp_path / "report.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("new, incomplete")
            raise RuntimeError("killed mid-write")
    assert final.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_json({"a": [1, 2.5], "b": None}, final)
    assert json.loads(final.read_text()) == {"a": [1, 2.5], "b": None}
    _no_tmp(tmp_path)


def test_clean_stale_tmp_removes_only_temporary_files(tmp_path):
    (tmp_path / f"{TMP_PREFIX}123-model_fn.onnx").write_bytes(b"partial")
    (tmp_path / "model_fn.onnx").write_bytes(b"complete")
    (tmp_path / "checkpoints").mkdir()
    clean_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model_fn.onnx"]
    clean_stale_tmp(tmp_path / "missing")  # no folder yet: nothing to do
