"""``fnconvert transform model.onnx``: end to end on real CIFAR-10 data, with the real onnxruntime.

Each result is checked as a user would: the drop-in's interface, the full ONNX check, onnxruntime accuracy against
report.json, and the FN formula recomputed independently in numpy (float64). External data is checked for
containment: a model whose data points outside its folder is refused before a byte of it is read.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from conftest import assert_one_line_error, logreg, to_nchw01, train_adam
from fnconvert.pipeline import TransformOptions, transform
from fnconvert_cli.main import app

pytestmark = pytest.mark.data


# ---- helpers -------------------------------------------------------------------------------------------------


def export(module: nn.Module, path: Path, *, dynamo: bool = False, shape=(2, 3, 32, 32), output="output") -> Path:
    module = module.eval()
    x = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            buf = io.StringIO()
            from contextlib import redirect_stdout

            with redirect_stdout(buf):  # the dynamo exporter prints progress lines
                torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["input"], output_names=[output],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"], output_names=[output],
                              dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}})
    return path


def cli(*args: str):
    return CliRunner().invoke(app, ["transform", *map(str, args)])


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def fn_constants(model: onnx.ModelProto) -> dict:
    """The FN initializers by their base names (V, neg_mean_V, B, C)."""
    return {i.name.split("/", 1)[1]: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer
            if i.name.startswith("fnconvert/")}


def load_factors(out: Path) -> dict:
    with np.load(out / "factors.npz") as z:
        return {k: z[k].astype(np.float64) for k in ("mean", "V", "B", "singular_values")}


def _subset(cifar_arrays, folder: Path, train_per_class: int, test_per_class: int) -> dict:
    """A stratified subset of cifar10-dev as an npz, plus its arrays preprocessed in numpy."""
    from conftest import stratified_indices

    tr = stratified_indices(cifar_arrays["y_train"], train_per_class, seed=0)
    te = stratified_indices(cifar_arrays["y_test"], test_per_class, seed=1)
    path = folder / f"cifar-{train_per_class}-{test_per_class}.npz"
    np.savez(path, x_train=cifar_arrays["x_train"][tr], y_train=cifar_arrays["y_train"][tr],
             x_test=cifar_arrays["x_test"][te], y_test=cifar_arrays["y_test"][te], classes=cifar_arrays["classes"])
    x_train = to_nchw01(cifar_arrays["x_train"][tr])
    return {"path": path, "x_test": to_nchw01(cifar_arrays["x_test"][te]), "y_test": cifar_arrays["y_test"][te],
            "x_train": x_train, "y_train": cifar_arrays["y_train"][tr]}


@pytest.fixture(scope="module")
def tiny(cifar_arrays, tmp_path_factory):
    """300 train / 100 test images."""
    return _subset(cifar_arrays, tmp_path_factory.mktemp("onnx-data"), 30, 10)


@pytest.fixture(scope="module")
def micro(cifar_arrays, tmp_path_factory):
    """100 train / 50 test images: ResNet-18 trains one step per epoch on them at --batch-size 100."""
    return _subset(cifar_arrays, tmp_path_factory.mktemp("onnx-data"), 10, 5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-models")


@pytest.fixture(scope="module")
def trained_logreg(tiny):
    torch.manual_seed(0)
    x, y = torch.from_numpy(tiny["x_train"]), torch.from_numpy(tiny["y_train"].astype(np.int64))
    return train_adam(logreg(3072), x, y, epochs=3, lr=1e-3)


@pytest.fixture(scope="module")
def logreg_onnx(trained_logreg, models):
    return export(trained_logreg, models / "logreg.onnx")


def assert_drop_in(out: Path, report: dict, tiny, *, output="output"):
    """The interface of the source, the full check, and onnxruntime's test accuracy equal to the report's."""
    model = onnx.load(str(out / "model_fn.onnx"))
    onnx.checker.check_model(model, full_check=True)
    sess = session(out / "model_fn.onnx")
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("input", ["batch", 3, 32, 32], "tensor(float)")
    assert (outp.name, outp.shape) == (output, ["batch", 10])
    for n in (1, 7):
        assert ort_run(sess, tiny["x_test"][:n]).shape == (n, 10)
    scores = ort_run(sess, tiny["x_test"])
    accuracy = float((scores.argmax(1) == tiny["y_test"]).mean())
    assert accuracy == report["accuracy_onnx"] == report["verification"]["accuracy"]
    assert abs(accuracy - report["accuracy_after"]) <= 0.02  # torch vs onnxruntime: at most a tie may flip
    assert report["verification"]["passed"] and report["verification"]["batch_sizes"] == [1, 64]
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy_onnx"] == accuracy and saved["source"]["format"] == "onnx"
    for key in ("fnconvert_version", "factors", "singular_values", "explained_variance_ratio", "lr", "preprocessing",
                "calibration_samples", "accuracy_before", "accuracy_after", "epochs", "onnx_max_abs_diff",
                "verification", "world_size"):
        assert key in saved, key
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("fnconvert.version", "fnconvert.factors", "fnconvert.singular_values", "fnconvert.preprocessing",
                "fnconvert.output", "fnconvert.source_sha256"):
        assert key in props, key
    assert props["fnconvert.source_sha256"] == report["source"]["sha256"]
    return model, sess, scores


# ---- must-hold 1: ResNet-18, surgery only and fine-tuned ----------------------------------------------------


@pytest.fixture(scope="module")
def resnet_onnx(models):
    import torchvision

    torch.manual_seed(0)
    return export(torchvision.models.resnet18(num_classes=10), models / "resnet18.onnx")


def test_resnet18_no_finetune_is_a_drop_in(resnet_onnx, micro, tmp_path):
    out = tmp_path / "fn"
    report = transform(TransformOptions(model=str(resnet_onnx), data=str(micro["path"]), out=str(out),
                                        no_finetune=True, calib_samples=100, factors=2))
    assert report["epochs"] == [] and report["factors"] == 2 and len(report["singular_values"]) == 3
    assert report["output"]["final_layer"].startswith("Gemm")
    assert report["onnx_max_abs_diff"] <= 1e-4
    assert not (out / "model_fn.pt").exists()  # pure surgery: no torch module is made
    assert_drop_in(out, report, micro)


def test_resnet18_one_epoch_through_the_cli_is_a_drop_in(resnet_onnx, micro, tmp_path):
    out = tmp_path / "fn"
    r = cli(resnet_onnx, "--data", micro["path"], "--out", out, "--epochs", "1", "--calib-samples", "100",
            "--batch-size", "100", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [e["epoch"] for e in report["epochs"]] == [1]
    _, sess, scores = assert_drop_in(out, report, micro)
    # the weights were trained: the source graph gives other scores on the same inputs
    source = ort_run(session(resnet_onnx), micro["x_test"][:8])
    assert np.abs(ort_run(sess, micro["x_test"][:8]) - source).max() > 1e-4
    # model_fn.pt is the same model in TorchScript, batch dynamic
    from fnconvert.log import jit_deprecation_silenced

    with jit_deprecation_silenced():
        ts = torch.jit.load(str(out / "model_fn.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(ts(torch.from_numpy(micro["x_test"][:3])).numpy(), scores[:3], atol=1e-4)


# ---- must-hold 2: an MLP ending in Softmax, exported by dynamo ---------------------------------------------


def test_dynamo_mlp_with_softmax_keeps_probabilities_and_the_fn_formula(tiny, models, tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3072, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=1))
    path = export(mlp, models / "mlp-dynamo.onnx", dynamo=True, output="probs")
    out = tmp_path / "fn"
    report = transform(TransformOptions(model=str(path), data=str(tiny["path"]), out=str(out), no_finetune=True,
                                        calib_samples=120, factors=2))
    assert report["output"]["activation"] == "softmax"
    model, sess, probs = assert_drop_in(out, report, tiny, output="probs")
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    # Independently in float64: softmax(body(r) + z·C) with the MLP's own weights and the saved factors.
    f, C = load_factors(out), fn_constants(model)["C"]
    W1, b1, W2, b2 = (t.detach().double().numpy() for t in (mlp[1].weight, mlp[1].bias, mlp[3].weight, mlp[3].bias))

    def body(flat):
        return np.maximum(flat @ W1.T + b1, 0) @ W2.T + b2

    def split(x):
        flat = x.reshape(len(x), -1).astype(np.float64)
        z = (flat - f["mean"]) @ f["V"]
        return z, flat - z @ f["B"]

    z, r = split(tiny["x_test"])
    pre = body(r) + z @ C
    want = np.exp(pre - pre.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), atol=1e-5)

    # C is the float64 least-squares fit of the original logits on the calibration rows.
    from fnconvert.data import load_data

    idx = load_data(str(tiny["path"])).calibration_indices(120, 0)
    zc, rc = split(tiny["x_train"][idx])
    target = body(tiny["x_train"][idx].reshape(len(idx), -1).astype(np.float64)) - body(rc)
    np.testing.assert_allclose(C, np.linalg.lstsq(zc, target, rcond=None)[0], atol=1e-4)


# ---- must-hold 3: logistic regression keeps its logits ------------------------------------------------------


def test_logistic_regression_keeps_its_logits(logreg_onnx, trained_logreg, tiny, tmp_path):
    out = tmp_path / "fn"
    r = cli(logreg_onnx, "--data", tiny["path"], "--out", out, "--no-finetune", "--calib-samples", "200",
            "--factors", "3", "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["reference"].startswith("onnxruntime")
    model, sess, fn_logits = assert_drop_in(out, report, tiny)
    original = ort_run(session(logreg_onnx), tiny["x_test"])
    np.testing.assert_allclose(fn_logits, original, atol=1e-3)
    # For a linear model the calibrated head is exactly B̂·Wᵀ (design notes: function-preserving start).
    W = trained_logreg[1].weight.detach().double().numpy()
    np.testing.assert_allclose(fn_constants(model)["C"], load_factors(out)["B"] @ W.T, atol=1e-4, rtol=1e-3)
    assert report["accuracy_before"] == float((original.argmax(1) == tiny["y_test"]).mean())


def test_a_failed_gate_exits_3_and_keeps_the_report(logreg_onnx, tiny, tmp_path):
    out = tmp_path / "fn"
    r = cli(logreg_onnx, "--data", tiny["path"], "--out", out, "--no-finetune", "--calib-samples", "50",
            "--atol", "1e-12", "--quiet")
    assert r.exit_code == 3, r.output
    assert_one_line_error(r.stderr, "model_fn.onnx differs from the", "--atol 1e-12")
    assert json.loads((out / "report.json").read_text())["verification"]["passed"] is False


def test_fine_tuning_a_dynamo_graph_writes_the_trained_weights_back(tiny, models, tmp_path):
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 10))
    path = export(cnn, models / "cnn-dynamo.onnx", dynamo=True)
    out = tmp_path / "fn"
    report = transform(TransformOptions(model=str(path), data=str(tiny["path"]), out=str(out), epochs=1,
                                        calib_samples=100, batch_size=50, lr=1e-2))
    model, sess, _ = assert_drop_in(out, report, tiny)
    assert report["onnx_max_abs_diff"] <= 1e-4 and report["pt2_skipped"] is None
    assert S_ops(model) >= S_ops(onnx.load(str(path)))  # the source graph, with FN nodes added
    assert report["verification"]["reference"] == "torch FN model"


def S_ops(model) -> set:
    return {n.op_type for n in model.graph.node}


# ---- must-hold 4: external data -------------------------------------------------------------------------------


_OPENED: list | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed; records only while a test sets _OPENED


@pytest.fixture
def opened():
    global _OPENED
    _OPENED = []
    yield _OPENED
    _OPENED = None


def save_external(model_path: Path, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    target = folder / "model.onnx"
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return target


def test_a_model_with_external_data_converts_and_the_result_is_inline(logreg_onnx, tiny, tmp_path):
    src = save_external(logreg_onnx, tmp_path / "model")
    assert (tmp_path / "model" / "weights.bin").stat().st_size > 3072 * 10 * 4
    out = tmp_path / "fn"
    r = cli(src, "--data", tiny["path"], "--out", out, "--no-finetune", "--calib-samples", "50", "--quiet")
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out / "model_fn.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert not list(out.glob("*.data")) and not list(out.glob("*.bin"))
    np.testing.assert_allclose(ort_run(session(out / "model_fn.onnx"), tiny["x_test"]),
                               ort_run(session(logreg_onnx), tiny["x_test"]), atol=1e-3)


def test_an_output_over_the_inline_limit_goes_to_one_data_file_beside_it(logreg_onnx, tmp_path, monkeypatch):
    import fnconvert.onnx_io as io_mod
    from fnconvert.models import load_model

    monkeypatch.setattr(io_mod, "INLINE_LIMIT", 0)  # stands in for a model over 2 GB
    final = tmp_path / "out" / "model_fn.onnx"
    final.parent.mkdir()
    io_mod.save_model(onnx.load(str(logreg_onnx)), final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["model_fn.onnx", "model_fn.onnx.data"]
    x = np.random.default_rng(0).uniform(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(ort_run(session(final), x), ort_run(session(logreg_onnx), x), atol=1e-6)
    assert load_model(final).onnx_model is not None  # and fnconvert reads its own output back


def _point_outside(src: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    """A copy of ``src`` (saved with external data) whose data is, in one way or another, outside its folder."""
    folder = src.parent
    outside = tmp_path / "outside.bin"
    os.replace(folder / "weights.bin", outside)  # the real bytes now live outside the model's folder
    model = onnx.load(str(src), load_external_data=False)
    tensors = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]

    def relocate(value: str):
        for t in tensors:
            next(e for e in t.external_data if e.key == "location").value = value

    if case == "dotdot":
        relocate("../outside.bin")
    elif case == "absolute":
        relocate(str(outside))
    elif case == "symlink":
        (folder / "weights.bin").symlink_to(outside)
    elif case == "hardlink":
        os.link(outside, folder / "weights.bin")
    elif case == "beyond":
        os.replace(outside, folder / "weights.bin")
        with open(folder / "weights.bin", "r+b") as f:
            f.truncate(100)  # the last tensor's offset + length now lie past the end
        outside = folder / "weights.bin"
    onnx.save_model(model, str(src))
    return src, outside


@pytest.mark.parametrize("case,needle", [
    ("dotdot", "outside the model's folder"), ("absolute", "outside the model's folder"),
    ("symlink", "a link that leads outside"), ("hardlink", "hard links"), ("beyond", "truncated"),
])
def test_external_data_outside_the_models_folder_is_refused_unread(logreg_onnx, tiny, tmp_path, opened, case,
                                                                  needle):
    src, outside = _point_outside(save_external(logreg_onnx, tmp_path / "model"), tmp_path, case)
    out = tmp_path / "fn"
    opened.clear()  # what the set-up above touched does not count
    r = cli(src, "--data", tiny["path"], "--out", out, "--no-finetune", "--quiet")
    assert r.exit_code == 1, r.output
    assert_one_line_error(r.stderr, needle)
    assert not out.exists(), "nothing may be written for a refused model"
    reads = {Path(p).resolve() for p in opened if Path(p).exists()}
    assert outside.resolve() not in reads, f"{outside} was opened"
    assert not any(p.name in ("weights.bin", "outside.bin") for p in reads), reads


# ---- refusals, through the CLI --------------------------------------------------------------------------------


def _graph_file(path: Path, nodes, inputs, outputs, inits=()) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))
    return path


def _vi(name, elem=TensorProto.FLOAT, shape=("N", 3, 32, 32)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _gemm_nodes(inp="x", p=3072):
    w = numpy_helper.from_array(np.zeros((10, p), np.float32), "W")
    return [helper.make_node("Flatten", [inp], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)], [w]


def test_refusals_name_the_value_and_the_fix(tiny, tmp_path):
    nodes, inits = _gemm_nodes()
    cases = {
        "two-inputs": (_graph_file(tmp_path / "two.onnx", nodes, [_vi("x"), _vi("mask")], [_vi("y", shape=("N", 10))],
                                   inits), ["2 inputs", "'x', 'mask'"]),
        "int-input": (_graph_file(tmp_path / "int.onnx", [helper.make_node("Cast", ["x"], ["xf"], to=1),
                                                           *_gemm_nodes("xf")[0]],
                                  [_vi("x", TensorProto.INT64)], [_vi("y", shape=("N", 10))], inits),
                      ["'x'", "non-float type INT64"]),
        "no-dense": (export(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                            tmp_path / "pool.onnx"), ["no final dense layer", "GlobalAveragePool", "Linear"]),
        # a valid MNIST-shaped model (it passes onnx.checker) given CIFAR-shaped data
        "data-shape": (_graph_file(tmp_path / "shape.onnx", *_gemm_nodes(p=784)[:1], [_vi("x", shape=("N", 1, 28, 28))],
                                   [_vi("y", shape=("N", 10))], _gemm_nodes(p=784)[1]),
                       ["[3, 32, 32]", "'batch', 1, 28, 28"]),
        "invalid-graph": (_graph_file(tmp_path / "bad.onnx", nodes, [_vi("x", shape=("N", 1, 28, 28))],
                                      [_vi("y", shape=("N", 10))], inits), ["fails onnx.checker", "re-export"]),
    }
    for name, (path, needles) in cases.items():
        out = tmp_path / f"out-{name}"
        r = cli(path, "--data", tiny["path"], "--out", out, "--no-finetune", "--quiet")
        assert r.exit_code == 1, (name, r.output)
        assert_one_line_error(r.stderr, *needles)
        assert not out.exists(), name


def test_unsupported_ops_refuse_fine_tuning_but_not_surgery(tiny, tmp_path):
    torch.manual_seed(0)
    path = export(nn.Sequential(nn.Flatten(), nn.Linear(3072, 16), nn.Hardswish(), nn.Linear(16, 10)),
                  tmp_path / "hardswish.onnx")
    r = cli(path, "--data", tiny["path"], "--out", tmp_path / "a", "--epochs", "1", "--quiet")
    assert r.exit_code == 1
    assert_one_line_error(r.stderr, "does not support HardSwish", "--no-finetune")
    assert not (tmp_path / "a").exists()
    r = cli(path, "--data", tiny["path"], "--out", tmp_path / "b", "--no-finetune", "--calib-samples", "50", "--quiet")
    assert r.exit_code == 0, r.output
