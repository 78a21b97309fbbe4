"""The issue's end-to-end contracts, on the real files: ``fnconvert transform`` checked against independent numbers
(float64 numpy eigenvectors, the original model's logits, onnxruntime)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import logreg, to_nchw01
from fnconvert_cli.main import app

runner = CliRunner()


def _transform(*args):
    result = runner.invoke(app, ["transform", *map(str, args)])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def _ort(path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


# ------------------------------------------------------------------------------------------------ must-hold 1


@pytest.mark.slow
@pytest.mark.data
def test_torchscript_cnn_on_cifar10_dev(cnn_ts, cifar_npz, cifar_arrays, tmp_path):
    """A CNN trained on cifar10-dev, saved as TorchScript, through transform --epochs 1 on the real file."""
    out = tmp_path / "OUT"
    report = _transform(cnn_ts, "--data", cifar_npz, "--epochs", 1, "--out", out, "--trust-model-code", "--json",
                        "--quiet")
    for name in ("model_fn.onnx", "model_fn.pt", "factors.safetensors", "factors.npz", "report.json",
                 "checkpoints/epoch-1.pt"):
        assert (out / name).is_file(), name
    assert not (out / "model_fn.pt2").exists()
    assert "TorchScript" in report["pt2_skipped"]
    assert json.loads((out / "report.json").read_text()) == report  # --json prints report.json
    assert report["source"]["format"] == "torchscript" and report["factors"] == 1
    assert report["data"]["train_samples"] == 10_000 and report["calibration_samples"] == 10_000
    assert report["verification"]["passed"] is True and len(report["epochs"]) == 1

    # onnxruntime and TorchScript (model_fn.pt) agree on the whole test split
    x_test = to_nchw01(cifar_arrays["x_test"])
    got = _ort(out / "model_fn.onnx", x_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(out / "model_fn.pt"))
    with torch.no_grad():
        want = torch.cat([ts(torch.from_numpy(x_test[i : i + 500])) for i in range(0, len(x_test), 500)]).numpy()
    assert np.abs(got - want).max() <= 1e-4
    acc = float((got.argmax(1) == cifar_arrays["y_test"]).mean())
    assert report["accuracy_onnx"] == pytest.approx(acc, abs=1e-12)

    # V's first column against the exact float64 top eigenvector of the centred training inputs
    import scipy.sparse.linalg as sla
    from safetensors.numpy import load_file

    X = to_nchw01(cifar_arrays["x_train"]).reshape(10_000, -1).astype(np.float64)
    X -= X.mean(0)
    G = X.T @ X
    w, v = sla.eigsh(G, k=2, which="LA", tol=0)  # Lanczos to machine precision on the float64 Gram matrix
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    assert np.linalg.norm(G @ v - v * w) / w[0] < 1e-10  # converged: these are the exact eigenpairs
    stored = load_file(str(out / "factors.safetensors"))
    V1 = stored["V"][:, 0]
    cos = abs(V1 @ v[:, 0]) / np.linalg.norm(V1)
    assert cos >= 0.999, cos
    np.testing.assert_allclose(np.load(out / "factors.npz")["V"], stored["V"])  # both files hold the same factors
    lam = np.sqrt(w)  # singular values of the centred data
    sv = np.array(report["singular_values"])
    assert abs(sv[1] / sv[0] - lam[1] / lam[0]) <= 1e-3
    # the residual rate over the factor rate is (λ1/λ2)²
    ratio = report["lr"]["residual"] / report["lr"]["factor"][0]
    assert ratio == pytest.approx((sv[0] / sv[1]) ** 2, rel=1e-12)
    assert ratio == pytest.approx((lam[0] / lam[1]) ** 2, rel=2e-3)


# ------------------------------------------------------------------------------------------------ must-hold 2


@pytest.mark.data
def test_logistic_regression_on_mnist_keeps_accuracy_without_finetuning(mnist_npz, mnist_arrays, tmp_path):
    torch.manual_seed(0)
    x_tr = torch.from_numpy(to_nchw01(mnist_arrays["x_train"]))
    y_tr = torch.from_numpy(mnist_arrays["y_train"].astype(np.int64))
    model = logreg(784)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=20, history_size=10)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_tr), y_tr) + 1e-4 * model[1].weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)  # 20 full-batch L-BFGS iterations
    model.eval()
    path = tmp_path / "logreg.pt2"  # a torch.export program: data, loads without --trust-model-code
    ep = torch.export.export(model, (x_tr[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, str(path))

    W = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    x_te = to_nchw01(mnist_arrays["x_test"])
    y_te = mnist_arrays["y_test"]
    logits_before = x_te.reshape(len(x_te), -1).astype(np.float64) @ W.T + b
    acc_before = float((logits_before.argmax(1) == y_te).mean())
    assert acc_before > 0.8  # a real classifier

    out = tmp_path / "out"
    report = _transform(path, "--data", mnist_npz, "--no-finetune", "--out", out, "--json", "--quiet")
    assert report["epochs"] == [] and report["accuracy_before"] == pytest.approx(acc_before, abs=1e-12)
    got = _ort(out / "model_fn.onnx", x_te)
    acc_after = float((got.argmax(1) == y_te).mean())
    assert abs(acc_after - acc_before) <= 0.002
    assert np.abs(got - logits_before).max() <= 1e-3
    assert (out / "model_fn.pt2").is_file() and report["pt2_skipped"] is None
    assert not (out / "checkpoints").exists()
    # the other two exports of the FN model agree with onnxruntime
    x = torch.from_numpy(x_te[:200])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(torch.export.load(str(out / "model_fn.pt2")).module()(x).numpy(), got[:200],
                                   atol=1e-4)
        np.testing.assert_allclose(torch.jit.load(str(out / "model_fn.pt"))(x).numpy(), got[:200], atol=1e-4)


@pytest.mark.data
def test_factors_auto_takes_the_eigenvalue_ratio_choice_and_reports_why(mnist_npz, mnist_arrays, tmp_path):
    """--factors auto: d is Ahn & Horenstein's argmax of μk/μk+1 (k ≤ 10), checked against numpy's float64 SVD."""
    torch.manual_seed(0)
    model = logreg(784).eval()
    x_tr = to_nchw01(mnist_arrays["x_train"])
    path = tmp_path / "logreg.pt2"
    ep = torch.export.export(model, (torch.from_numpy(x_tr[:2]),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, str(path))

    X = x_tr.reshape(len(x_tr), -1).astype(np.float64)
    mu = np.linalg.svd(X - X.mean(0), compute_uv=False) ** 2
    ratios = mu[:10] / mu[1:11]
    k = int(np.argmax(ratios)) + 1
    assert np.sort(ratios)[-1] > 1.01 * np.sort(ratios)[-2]  # a clear winner, so the check is meaningful

    out = tmp_path / "out"
    report = _transform(path, "--data", mnist_npz, "--factors", "auto", "--no-finetune", "--out", out, "--json",
                        "--quiet")
    assert report["factors"] == k
    assert "Ahn & Horenstein" in report["factors_choice"] and f"μ{k}/μ{k + 1}" in report["factors_choice"]
    np.testing.assert_allclose(report["singular_values"], np.sqrt(mu[: k + 1]), rtol=1e-4)


# ------------------------------------------------------------------------------------------------ must-hold 3


@pytest.mark.data
def test_resnet18_state_dict_with_arch(cifar_tiny, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "out"
    report = _transform(path, "--arch", "resnet18", "--data", cifar_tiny, "--calib-samples", 512, "--no-finetune",
                        "--out", out, "--json", "--quiet")
    assert report["source"] == {**report["source"], "format": "state_dict", "arch": "resnet18"}
    assert report["calibration_samples"] == 512 and report["output"]["classes"] == 10
    assert report["verification"]["passed"] is True
    for name in ("model_fn.onnx", "model_fn.pt", "model_fn.pt2", "factors.safetensors", "factors.npz", "report.json"):
        assert (out / name).is_file(), name
    with np.load(cifar_tiny) as z:
        x_te, y_te = to_nchw01(z["x_test"]), z["y_test"]
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    assert report["accuracy_before"] == pytest.approx(acc, abs=1e-12)
    got = _ort(out / "model_fn.onnx", x_te, batch=100)
    ep = torch.export.load(str(out / "model_fn.pt2"))
    with torch.no_grad():
        want = ep.module()(torch.from_numpy(x_te[:50])).numpy()
    np.testing.assert_allclose(got[:50], want, atol=1e-4)
    assert report["accuracy_onnx"] == pytest.approx(float((got.argmax(1) == y_te).mean()), abs=1e-12)
