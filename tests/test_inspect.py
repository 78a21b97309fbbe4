"""inspect_spectrum / choose_factors / plot_spectrum: the spectrum report that picks d."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fnconvert.errors import FnconvertError
from fnconvert.factors import Factors, fit_factors
from fnconvert.inspect import choose_factors, eigenvalue_ratio_estimate, inspect_spectrum, plot_spectrum

KEYS = {
    "singular_values", "explained_variance_ratio", "cumulative_explained_variance", "condition_number",
    "residual_condition_number", "lr_multipliers", "suggested_factors", "suggested_factors_reason", "n_samples",
    "p", "method",
}


def planted(n=1500, p=200, k=3, noise=1.0, seed=0):
    """k strong factors (well above the noise bulk) plus isotropic noise."""
    rng = np.random.default_rng(seed)
    F, _ = np.linalg.qr(rng.standard_normal((p, k)))
    Z = rng.standard_normal((n, k)) * np.array([12.0, 9.0, 7.0, 5.0][:k])
    return Z @ F.T + noise * rng.standard_normal((n, p)) + 3.0


def test_report_keys_and_values_match_numpy():
    X = planted()
    info = inspect_spectrum(X, 10)
    assert KEYS <= set(info)
    json.dumps(info, allow_nan=False)  # JSON-able, no NaN/inf
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    np.testing.assert_allclose(info["singular_values"], s[:11], rtol=1e-8)
    np.testing.assert_allclose(info["explained_variance_ratio"], s[:11] ** 2 / np.sum(s**2), rtol=1e-8)
    np.testing.assert_allclose(info["cumulative_explained_variance"], np.cumsum(s[:11] ** 2) / np.sum(s**2), rtol=1e-8)
    np.testing.assert_allclose(info["lr_multipliers"], (s[0] / s[1:11]) ** 2, rtol=1e-8)
    # The exact solver (p = 200) has the whole spectrum: the condition number is λ1²/λp².
    assert info["spectrum_complete"] is True
    assert info["condition_number"] == pytest.approx((s[0] / s[-1]) ** 2, rel=1e-6)
    np.testing.assert_allclose(info["residual_condition_number"], (s[1:11] / s[-1]) ** 2, rtol=1e-6)
    assert (info["n_samples"], info["p"], info["method"]) == (1500, 200, "gram-eigh")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_suggested_factors_finds_planted_k(k):
    info = inspect_spectrum(planted(k=k, seed=k), 10)
    assert info["suggested_factors"] == k, info["suggested_factors_reason"]
    assert "Ahn & Horenstein" in info["suggested_factors_reason"]
    assert choose_factors(info)[0] == k


def test_randomized_source_reports_lower_bound_condition_number(cifar_arrays):
    x = cifar_arrays["x_train"][:2000]
    X = x.reshape(len(x), -1).astype(np.float32) / 255
    info = inspect_spectrum(X, 5)
    assert info["method"].startswith("randomized") and info["spectrum_complete"] is False
    assert "not an exact value" in info["condition_number_note"]
    assert len(info["singular_values"]) == 6 and len(info["lr_multipliers"]) == 5
    # CIFAR-10: one dominant factor (design notes: (λ1/λ2)² ≈ 2.6), so the ratio estimator picks d = 1.
    assert info["suggested_factors"] == 1
    assert info["lr_multipliers"][0] == pytest.approx(2.6, rel=0.1)


def test_factors_object_reports_what_it_holds(tmp_path):
    X = planted(k=2, seed=4)
    f = fit_factors(X, 4)
    info = inspect_spectrum(f, 10)
    assert info["max_factors"] == 4 and len(info["singular_values"]) == 5
    np.testing.assert_allclose(info["singular_values"], f.singular_values)
    assert info["spectrum_complete"] is False and "lower bound" in info["condition_number_note"]
    assert info["suggested_factors"] == 2
    f.save(tmp_path / "f.safetensors")
    assert choose_factors(Factors.load(tmp_path / "f.safetensors")) == (2, info["suggested_factors_reason"])


def test_rank_deficient_data_is_reported_not_refused():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 50)) * [[1.0]] * np.array([5.0] * 50)
    X[:, :5] = 1.0  # constant columns
    info = inspect_spectrum(X, 10)
    assert info["numerical_rank"] == 3
    assert info["suggested_factors"] <= 2  # d must stay below the rank
    assert info["lr_multipliers"][-1] is None  # λ_{d+1} = 0: no rate, reported as null
    json.dumps(info, allow_nan=False)


def test_eigenvalue_ratio_estimate_direct():
    k, reason = eigenvalue_ratio_estimate(np.sqrt([100.0, 90.0, 10.0, 9.0, 8.0]), 3)
    assert k == 2 and "μ2/μ3 = 9.00" in reason


def test_plot_is_a_valid_png(tmp_path):
    import matplotlib.image

    info = inspect_spectrum(planted(), 8)
    path = tmp_path / "spectrum.png"
    plot_spectrum(info, path, chosen_d=info["suggested_factors"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [q for q in tmp_path.iterdir() if q.name != "spectrum.png"]  # atomic write left nothing else
    with pytest.raises(FnconvertError, match=r"\.png"):
        plot_spectrum(info, tmp_path / "spectrum.jpg")


def test_bad_max_factors():
    with pytest.raises(FnconvertError, match="max_factors=0"):
        inspect_spectrum(planted(), 0)


def test_mnist_full_spectrum_and_condition_number(mnist_arrays):
    """Real MNIST: inspect takes the exact solver at p = 784, so the condition number is λ1²/λ_min² over the whole
    spectrum, λ_min the smallest singular value above the rank tolerance (constant border pixels are zeros)."""
    x = mnist_arrays["x_train"][:2000]
    X = x.reshape(len(x), -1).astype(np.float64) / 255
    info = inspect_spectrum(X, 10)
    assert info["method"] == "gram-eigh" and info["spectrum_complete"] is True
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    tol = info["condition_number_note"]  # names the tolerance used
    assert "numerical rank" in tol
    rank = info["numerical_rank"]
    assert rank == int(np.sum(s > 1e-5 * s[0])) and rank < 784
    assert info["condition_number"] == pytest.approx((s[0] / s[rank - 1]) ** 2, rel=1e-6)
    np.testing.assert_allclose(info["singular_values"], s[:11], rtol=1e-8)
