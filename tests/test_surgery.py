"""fnconvert.surgery against hand-computed references (numpy, float64).

The factors here come from numpy's float64 SVD, not from fnconvert.factors, so surgery is checked on its own.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fnconvert.errors import FnconvertError
from fnconvert.surgery import FNModel, analyze_output, build_fn_model

N, SHAPE, K = 96, (3, 2, 4), 5
P = int(np.prod(SHAPE))


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    # correlated inputs with a dominant direction, like images
    base = torch.randn(N, 1, generator=g) * 3 + torch.randn(N, P, generator=g) * 0.5
    return (base + torch.linspace(0, 1, P)).reshape(N, *SHAPE)


def numpy_factors(x: torch.Tensor, d: int, *, other_B: bool = False):
    X = x.reshape(len(x), -1).double().numpy()
    mean = X.mean(0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    V = vt[:d].T
    B = vt[:d]
    if other_B:  # loadings fitted on other rows, as in the paper's code: B̂ ≠ Vᵀ
        B = B + np.random.default_rng(0).normal(scale=0.05, size=B.shape)
    return SimpleNamespace(d=d, mean=mean, V=V, B=B, singular_values=s[: d + 1])


def linear_model(tail: str):
    torch.manual_seed(1)
    layers = [nn.Flatten(), nn.Linear(P, K)]
    if tail == "softmax":
        layers.append(nn.Softmax(dim=1))
    elif tail == "log_softmax":
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers).eval()


def as_kind(model, kind: str, example):
    if kind == "eager":
        return model
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(model)
    from fnconvert.models import exported_module

    return exported_module(torch.export.export(model, (example,),
                                               dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)))


def hand_fn(x, f, W, b, C, tail):
    """z = (x − μ)V, r = x − zB, out = tail(r·Wᵀ + b + z·C), all in float64 numpy."""
    X = x.reshape(len(x), -1).double().numpy()
    z = (X - f.mean) @ f.V
    r = X - z @ f.B
    pre = r @ W.T + b + z @ C
    if tail == "none":
        return pre
    e = np.exp(pre - pre.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    return p if tail == "softmax" else np.log(p)


def _np(t):
    return t.detach().double().numpy()


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kind", ["eager", "torchscript", "pt2"])
@pytest.mark.parametrize("d, other_B", [(1, False), (3, False), (2, True)])
def test_linear_model_fn_equals_original_and_C_is_BWt(x, kind, d, other_B):
    model = linear_model("none")
    f = numpy_factors(x, d, other_B=other_B)
    fn, analysis = build_fn_model(as_kind(model, kind, x[:2]), f, [x[:40], x[40:]], x[:2])
    assert (analysis.tail, analysis.num_classes) == ("none", K)
    W, b = _np(model[1].weight), _np(model[1].bias)
    np.testing.assert_allclose(_np(fn.C), f.B @ W.T, atol=2e-5)  # C = B̂·Wᵀ, found by least squares
    with torch.no_grad():
        want = _np(model(x))
        np.testing.assert_allclose(_np(fn(x)), want, atol=1e-4)
        np.testing.assert_allclose(_np(fn.deploy()(x)), want, atol=1e-4)
    np.testing.assert_allclose(_np(fn(x)), hand_fn(x, f, W, b, _np(fn.C), "none"), atol=1e-4)
    assert len(fn.factor_heads) == d and all(p.shape == (1, K) for p in fn.factor_heads)


def test_split_matches_numpy(x):
    f = numpy_factors(x, 2)
    fn = FNModel(nn.Identity(), f.mean, f.V, f.B, np.zeros((2, 3)))
    z, r = fn.split(x)
    X = x.reshape(N, -1).double().numpy()
    z_want = (X - f.mean) @ f.V
    np.testing.assert_allclose(_np(z), z_want, atol=1e-4)
    np.testing.assert_allclose(_np(r).reshape(N, -1), X - z_want @ f.B, atol=1e-4)
    assert r.shape == x.shape


# ------------------------------------------------------------------------------------------------ softmax tails


@pytest.mark.parametrize("kind", ["eager", "torchscript", "pt2"])
@pytest.mark.parametrize("tail", ["softmax", "log_softmax"])
def test_softmax_tails_get_the_term_before_the_softmax(x, kind, tail):
    model = linear_model(tail)
    f = numpy_factors(x, 2)
    fn, analysis = build_fn_model(as_kind(model, kind, x[:2]), f, [x], x[:2])
    assert analysis.tail == tail and analysis.dim == 1
    W, b = _np(model[1].weight), _np(model[1].bias)
    C = _np(fn.C)
    # logits are known only up to a per-row shift: C is B̂·Wᵀ with each row centred over the classes
    BWt = f.B @ W.T
    np.testing.assert_allclose(C, BWt - BWt.mean(1, keepdims=True), atol=2e-5)
    want = hand_fn(x, f, W, b, C, tail)
    with torch.no_grad():
        np.testing.assert_allclose(_np(fn(x)), want, atol=1e-5)
        np.testing.assert_allclose(_np(fn.deploy()(x)), want, atol=1e-5)
        np.testing.assert_allclose(_np(fn(x)), _np(model(x)), atol=1e-5)  # linear model: exact
    if tail == "softmax":  # the term is not added after the softmax: the outputs are probabilities
        np.testing.assert_allclose(_np(fn(x)).sum(1), 1.0, atol=1e-6)


def test_uncut_torchscript_softmax_body_uses_log_probabilities(x):
    """A TorchScript softmax cannot be cut off: body(r) gives p, and softmax(log p + z·C) = softmax(l + z·C)."""
    model = linear_model("softmax")
    f = numpy_factors(x, 1)
    fn, _ = build_fn_model(as_kind(model, "torchscript", x[:2]), f, [x], x[:2])
    assert isinstance(fn.body, torch.jit.ScriptModule) and fn.pre == "log"
    z, r = fn.split(x[:8])
    with torch.no_grad():
        hand = torch.softmax(torch.log(fn.body(r)) + z @ fn.C, dim=1)
        np.testing.assert_allclose(_np(fn(x[:8])), _np(hand), atol=1e-6)


def test_deep_model_calibration_is_the_least_squares_fit(x):
    """For a non-linear model C minimises ‖t − body(r) − z·C‖ over the calibration rows (numpy lstsq)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(P, 16), nn.Tanh(), nn.Linear(16, K)).eval()
    f = numpy_factors(x, 2)
    fn, _ = build_fn_model(model, f, [x], x[:2])
    z, r = fn.split(x)
    with torch.no_grad():
        target = _np(model(x)) - _np(model(r))
    C_ref, *_ = np.linalg.lstsq(_np(z), target, rcond=None)
    np.testing.assert_allclose(_np(fn.C), C_ref, atol=1e-4)


# ------------------------------------------------------------------------------------------------ refusals


class _Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x)


@pytest.mark.parametrize("model, op", [
    (nn.Sequential(nn.Flatten(), nn.Linear(P, K), nn.ReLU()), "aten::relu"),
    (nn.Sequential(nn.Conv2d(3, K, (2, 4)), nn.Flatten()), "aten::_convolution"),
    (nn.Sequential(nn.Flatten(), nn.Linear(P, K), nn.Sigmoid()), "aten::sigmoid"),
    (nn.Sequential(nn.Flatten()), "the input"),
])
def test_model_without_final_dense_layer_is_refused_naming_the_op(x, model, op):
    with pytest.raises(FnconvertError, match="no final dense layer") as e:
        analyze_output(model.eval(), x[:2])
    assert repr(op) in str(e.value) or op in str(e.value)
    with pytest.raises(FnconvertError, match="no final dense layer"):
        analyze_output(torch.jit.script(model.eval()), x[:2])


def test_passthrough_after_dense_layer_is_accepted(x):
    model = nn.Sequential(nn.Flatten(), nn.Linear(P, K), nn.Dropout(0.5), nn.Flatten()).eval()
    analysis = analyze_output(model, x[:2])
    assert analysis.dense_op == "aten::linear" and analysis.tail == "none"


def test_softmax_over_the_wrong_dim_and_bad_outputs_are_refused(x):
    class WrongDim(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(P, K)

        def forward(self, x):
            return torch.softmax(self.fc(x.flatten(1)), dim=0)

    with pytest.raises(FnconvertError, match="dim 0"):
        analyze_output(WrongDim().eval(), x[:2])
    with pytest.raises(FnconvertError, match=r"rejects inputs of shape \(2, 3, 3, 3\)"):
        analyze_output(linear_model("none"), torch.zeros(2, 3, 3, 3))
    with pytest.raises(FnconvertError, match="batch, classes"):
        analyze_output(nn.Sequential(nn.Identity()).eval(), x[:2])  # 4-D output
