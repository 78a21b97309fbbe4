"""fnconvert.verify: onnxruntime against torch, accuracy, the tolerance gate (exit 3), predict."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from conftest import numpy_factors, small_cnn
from fnconvert.data import load_data
from fnconvert.errors import FnconvertError, VerificationError
from fnconvert.export import export_onnx, export_pt2, export_torchscript
from fnconvert.surgery import build_fn_model
from fnconvert.verify import compare, open_session, predict, providers_for, verify_model
from fnconvert_cli.main import app

NORM = "0.49,0.48,0.45,0.25,0.24,0.26"


@pytest.fixture(scope="module")
def exported(cifar_tiny, tmp_path_factory):
    """An FN model of a small CNN on normalised CIFAR inputs, exported as .onnx (with metadata), .pt and .pt2."""
    ds = load_data(cifar_tiny, normalize=NORM)
    torch.manual_seed(0)
    model = small_cnn().eval()
    f = numpy_factors(np.concatenate([b.numpy() for b in ds.train.flat_batches(300)]), 1)
    fn, _ = build_fn_model(model, f, [x for x, _ in ds.train.batches(300)], next(ds.train.batches(2))[0])
    deploy = fn.deploy()
    out = tmp_path_factory.mktemp("verify")
    example = next(ds.test.batches(2))[0]
    meta = {"fnconvert.preprocessing": ds.train.pre.to_dict(), "fnconvert.output": "none"}
    export_onnx(deploy, example, out / "model_fn.onnx", metadata=meta)
    export_torchscript(deploy, example, out / "model_fn.pt")
    assert export_pt2(deploy, example, out / "model_fn.pt2") is None
    return SimpleNamespace(ds=ds, deploy=deploy, dir=out, onnx=out / "model_fn.onnx", data=cifar_tiny)


def _ort_logits(path, ds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs, ys = zip(*ds.test.batches(50))
    return np.concatenate([sess.run(None, {"input": x.numpy()})[0] for x in xs]), np.concatenate(ys)


def test_compare_against_independent_computation(exported):
    logits, y = _ort_logits(exported.onnx, exported.ds)
    with torch.no_grad():
        want = torch.cat([exported.deploy(x) for x, _ in exported.ds.test.batches(50)]).numpy()
    res = compare(open_session(exported.onnx, "cpu"), exported.deploy, exported.ds.test, atol=1e-4)
    assert res["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()), abs=0)
    assert res["samples"] == len(y) and res["batch_sizes"] == [1, 64]
    assert res["max_abs_diff"] == pytest.approx(float(np.abs(logits - want).max()), abs=2e-6)
    assert res["max_abs_diff"] <= 1e-4 and res["passed"] is True
    assert res["provider"] == "CPUExecutionProvider"
    strict = compare(open_session(exported.onnx, "cpu"), exported.deploy, exported.ds.test, atol=1e-12)
    assert strict["passed"] is (strict["max_abs_diff"] <= 1e-12)
    no_ref = compare(open_session(exported.onnx, "cpu"), None, exported.ds.test, atol=1e-4)
    assert "passed" not in no_ref and no_ref["accuracy"] == res["accuracy"]


def test_compare_catches_a_wrong_model(exported):
    other = small_cnn().eval()  # different weights
    res = compare(open_session(exported.onnx, "cpu"), other, exported.ds.test, atol=1e-4)
    assert res["passed"] is False and res["max_abs_diff"] > 1e-3


def test_verify_model_uses_stored_preprocessing_and_references(exported):
    logits, y = _ort_logits(exported.onnx, exported.ds)  # exported.ds is normalised like the model expects
    acc = float((logits.argmax(1) == y).mean())
    res = verify_model(exported.onnx, exported.data, reference=exported.dir / "model_fn.pt2", provider="cpu")
    assert res["accuracy"] == pytest.approx(acc, abs=0) and res["passed"] and res["max_abs_diff"] < 1e-4
    res_ts = verify_model(exported.onnx, exported.data, reference=exported.dir / "model_fn.pt",
                          trust_model_code=True, provider="cpu")
    assert res_ts["passed"] and res_ts["accuracy"] == res["accuracy"]
    # the gate is decided by atol: a tiny one fails
    tiny = verify_model(exported.onnx, exported.data, reference=exported.dir / "model_fn.pt2", atol=1e-12,
                        provider="cpu")
    assert tiny["passed"] is (tiny["max_abs_diff"] <= 1e-12)
    with pytest.raises(FnconvertError, match="--trust-model-code"):
        verify_model(exported.onnx, exported.data, reference=exported.dir / "model_fn.pt", provider="cpu")
    with pytest.raises(FnconvertError, match="does not exist"):
        verify_model(exported.dir / "missing.onnx", exported.data)


def test_verify_cli_gate_exit_codes(exported):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(exported.onnx), "--data", str(exported.data), "--reference",
                             str(exported.dir / "model_fn.pt2"), "--provider", "cpu", "--json"])
    assert ok.exit_code == 0, ok.output
    res = json.loads(ok.stdout)
    assert res["passed"] is True
    bad = runner.invoke(app, ["verify", str(exported.onnx), "--data", str(exported.data), "--reference",
                              str(exported.dir / "model_fn.pt2"), "--provider", "cpu", "--atol", "1e-12"])
    if res["max_abs_diff"] > 1e-12:  # onnxruntime and torch differ in the last bits for a CNN
        assert bad.exit_code == 3, bad.output
        assert bad.stderr.startswith("error: ") and "1e-12" in bad.stderr and "Traceback" not in bad.output


def test_predict_top_k_matches_softmax_of_onnx_logits(exported, tmp_path):
    logits, _ = _ort_logits(exported.onnx, exported.ds)
    res = predict(exported.onnx, exported.data, top_k=3, limit=12, provider="cpu")
    rows = res["predictions"]
    assert len(rows) == 12
    e = np.exp(logits[:12] - logits[:12].max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    for i, row in enumerate(rows):
        want = np.argsort(-probs[i])[:3]
        assert [c["class"] for c in row["top"]] == list(want)
        np.testing.assert_allclose([c["probability"] for c in row["top"]], probs[i, want], atol=1e-6)
        assert row["top"][0]["label"] == exported.ds.classes[want[0]]
    with pytest.raises(FnconvertError, match="--top-k 0"):
        predict(exported.onnx, exported.data, top_k=0)


def test_predict_on_a_folder_of_images(exported, tmp_path):
    from PIL import Image

    with np.load(exported.data) as z:
        imgs = z["x_test"][:4]
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"im{i}.png")
    res = predict(exported.onnx, tmp_path, top_k=1, provider="cpu")
    logits, _ = _ort_logits(exported.onnx, exported.ds)  # test split in file order: the same four images first
    assert [r["sample"] for r in res["predictions"]] == [f"im{i}.png" for i in range(4)]
    assert [r["top"][0]["class"] for r in res["predictions"]] == list(logits[:4].argmax(1))


def test_providers():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(FnconvertError, match="--provider 'tpu'"):
        providers_for("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(FnconvertError, match="onnxruntime-gpu"):
            providers_for("cuda")
        assert providers_for("auto") == ["CPUExecutionProvider"]


def test_verification_error_is_exit_3():
    assert VerificationError("x").exit_code == 3 and isinstance(VerificationError("x"), FnconvertError)


def test_transform_gate_fails_with_exit_3_and_records_it(cnn_pt2, cifar_tiny, tmp_path):
    """With a tolerance no float32 export can meet, transform writes everything, records the failure, exits 3."""
    out = tmp_path / "OUT"
    result = CliRunner().invoke(app, ["transform", str(cnn_pt2), "--data", str(cifar_tiny), "--out", str(out),
                                      "--no-finetune", "--atol", "1e-12", "--provider", "cpu", "--quiet"])
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert v["atol"] == 1e-12 and v["max_abs_diff"] == report["onnx_max_abs_diff"]
    assert v["max_abs_diff"] > 1e-12, "onnxruntime matched torch bit for bit; the gate cannot be exercised"
    assert v["passed"] is False
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "1e-12" in line and "report.json" in line
    assert (out / "model_fn.onnx").is_file()  # the artifacts stay for inspection
    # an independent recomputation of the recorded difference: onnxruntime vs the exported torch program
    ds = load_data(cifar_tiny)
    logits, _ = _ort_logits(out / "model_fn.onnx", ds)
    ep = torch.export.load(str(out / "model_fn.pt2"))
    with torch.no_grad():
        want = torch.cat([ep.module()(x) for x, _ in ds.test.batches(50)]).numpy()
    assert np.abs(logits - want).max() == pytest.approx(v["max_abs_diff"], abs=2e-6)
