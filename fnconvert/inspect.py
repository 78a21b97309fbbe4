"""The spectrum of the calibration inputs, for choosing d: what ``fnconvert inspect`` and ``--factors auto`` use.

Everything here is derived from the singular values λ_j of the centred calibration matrix Xc (n_samples, p):
the covariance eigenvalues are μ_j = λ_j²/(N − 1), so every ratio below is a ratio of λ_j².
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from .errors import FnconvertError
from .factors import Factors, _write_atomic, fit_factors_with_spectrum

__all__ = ["inspect_spectrum", "plot_spectrum", "choose_factors", "eigenvalue_ratio_estimate"]

#: Inspecting data uses the exact solver (full spectrum, exact condition number) up to this many features: a
#: one-off diagnostic can afford the float64 Gram + eigh (MNIST, p = 784: ~0.2 s on 5,000 rows, ~1 s on 50,000).
INSPECT_EXACT_MAX_FEATURES = 1024


def inspect_spectrum(source, max_factors: int = 10, *, seed: int = 0, device="auto") -> dict:
    """Report the spectrum of ``source``: a :class:`Factors` (then what it holds: λ1..λ_{d+1}) or the data itself
    (an array or a re-iterable of batches, fitted internally with d = ``max_factors``).

    Returns a JSON-able dict; values that are undefined (a zero singular value in a denominator) are None.
    """
    if isinstance(max_factors, bool) or not isinstance(max_factors, (int, np.integer)) or max_factors < 1:
        raise FnconvertError(f"max_factors={max_factors!r} must be an integer ≥ 1")
    max_factors = int(max_factors)
    if isinstance(source, Factors):
        sv = np.asarray(source.singular_values, dtype=np.float64)
        K = min(max_factors, source.d)
        sv = sv[: K + 1]
        n, p, tss, method = source.n_samples, source.p, source.total_sum_squares, source.method
        complete, rank_tol, rank = False, 0.0, None
        cond_basis = (f"a factors file holds only λ1..λ{source.d + 1}, so λ_min is λ{source.d + 1}: the condition "
                      f"number is a lower bound")
        all_sv = sv
    else:
        d_fit = _fit_dimension(source, max_factors)
        factors, spectrum = fit_factors_with_spectrum(source, d_fit, seed=seed, device=device, check_rank=False,
                                                      exact_max_features=INSPECT_EXACT_MAX_FEATURES)
        n, p, tss, method = factors.n_samples, factors.p, factors.total_sum_squares, factors.method
        all_sv = np.asarray(spectrum.singular_values, dtype=np.float64)
        rank, rank_tol, complete = spectrum.rank, spectrum.rank_tolerance, spectrum.complete
        K = min(d_fit, max(all_sv.size - 1, 1))
        sv = all_sv[: K + 1]
        if complete:
            cond_basis = (f"full spectrum from the {method} solver; λ_min is the smallest singular value above "
                          f"{rank_tol:.0e}·λ1 (numerical rank {rank} of {min(n - 1, p)})")
        else:
            cond_basis = (f"the {method} solver determines only the leading {all_sv.size} singular values, so λ_min "
                          f"is the smallest of those above {rank_tol:.0e}·λ1 (Ritz values of the unconverged tail): "
                          f"usually a lower bound of the condition number, not an exact value; the exact solver "
                          f"(p ≤ {INSPECT_EXACT_MAX_FEATURES} here) gives the full spectrum")
    lam1 = float(sv[0])
    nonzero = all_sv[all_sv > max(rank_tol, 0.0) * lam1] if lam1 > 0 else all_sv[:0]
    lam_min = float(nonzero[-1]) if nonzero.size else 0.0
    s2 = np.where(sv > rank_tol * lam1, sv, 0.0) ** 2  # values below the rank tolerance are zeros: no ratio
    evr = (sv**2 / tss).tolist() if tss > 0 else [0.0] * len(sv)
    d_hat, reason = eigenvalue_ratio_estimate(sv, K, rank=rank, rank_tol=rank_tol)
    info = {
        "n_samples": int(n),
        "p": int(p),
        "method": method,
        "max_factors": int(K),
        "singular_values": [float(v) for v in sv],
        "explained_variance_ratio": [float(v) for v in evr],
        "cumulative_explained_variance": [float(v) for v in np.cumsum(evr)],
        "total_sum_squares": float(tss),
        "condition_number": _ratio(lam1**2, lam_min**2),
        "condition_number_note": cond_basis,
        "spectrum_complete": bool(complete),
        "residual_condition_number": [_ratio(float(s2[j]), lam_min**2) for j in range(1, K + 1)],
        "lr_multipliers": [_ratio(lam1**2, float(s2[j])) for j in range(1, K + 1)],
        "suggested_factors": int(d_hat),
        "suggested_factors_reason": reason,
    }
    if rank is not None:
        info["numerical_rank"] = int(rank)
    return info


def _fit_dimension(source, max_factors: int) -> int:
    """d for the internal fit: max_factors, capped below p and N − 1 where they are known without a pass."""
    shape = getattr(source, "shape", None)
    if shape is not None and len(shape) == 2:
        n, p = int(shape[0]), int(shape[1])
        cap = min(p - 1, n - 2)
        if cap < 1:
            raise FnconvertError(f"the calibration data has shape {tuple(shape)}; inspecting it needs at least 3 "
                                 f"samples and 2 features")
        return min(max_factors, cap)
    return max_factors


def eigenvalue_ratio_estimate(singular_values, max_factors: int, *, rank: int | None = None,
                              rank_tol: float = 0.0) -> tuple[int, str]:
    """Ahn & Horenstein (2013) eigenvalue-ratio estimator: k̂ = argmax_{1≤k≤kmax} μ_k/μ_{k+1}, with μ the
    covariance eigenvalues (∝ λ²). kmax is capped by max_factors, by the values known, and below the rank
    (a ratio against a zero eigenvalue is not a factor, and d must stay below the rank)."""
    sv = np.asarray(singular_values, dtype=np.float64)
    mu = sv**2
    kmax = min(int(max_factors), mu.size - 1)
    if rank is not None:
        kmax = min(kmax, rank - 1)
    positive = mu > (rank_tol * sv[0]) ** 2 if sv.size and sv[0] > 0 else np.zeros(mu.shape, bool)
    # μ_{k+1} must be a resolved, positive eigenvalue for the ratio to mean anything.
    while kmax >= 1 and not positive[kmax]:
        kmax -= 1
    if kmax < 1:
        return 1, "fewer than two resolved eigenvalues: d = 1 is the only choice"
    ratios = mu[:kmax] / mu[1 : kmax + 1]
    k = int(np.argmax(ratios)) + 1
    second = np.sort(ratios)[-2] if ratios.size > 1 else None
    margin = f" (next best {second:.2f})" if second is not None else ""
    return k, (f"eigenvalue ratio (Ahn & Horenstein 2013): μ{k}/μ{k + 1} = {ratios[k - 1]:.2f} is the largest "
               f"μk/μk+1 for k = 1..{kmax}{margin}")


def choose_factors(source_or_info, max_factors: int = 10) -> tuple[int, str]:
    """(d, reason) for ``--factors auto``: the eigenvalue-ratio estimate from an inspect dict, a Factors object
    (e.g. a probe fitted with d = 10) or the data itself."""
    if isinstance(source_or_info, dict):
        info = source_or_info
        if "suggested_factors" not in info:
            raise FnconvertError("choose_factors got a dict without 'suggested_factors'; pass inspect_spectrum's "
                                 "result, a Factors object or the data")
    else:
        info = inspect_spectrum(source_or_info, max_factors)
    return int(info["suggested_factors"]), str(info["suggested_factors_reason"])


def plot_spectrum(info: dict, path, chosen_d: int | None = None) -> None:
    """Scree plot of ``info`` (from :func:`inspect_spectrum`) as a PNG at ``path``, written atomically."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # headless; leave an interactive session's backend alone
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FnconvertError(f"plot path {path} must end in .png")
    sv = np.asarray(info.get("singular_values", []), dtype=np.float64)
    evr = np.asarray(info.get("explained_variance_ratio", []), dtype=np.float64)
    if sv.size == 0:
        raise FnconvertError("plot_spectrum got no singular values; pass the dict from inspect_spectrum")
    j = np.arange(1, sv.size + 1)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(j, 100 * evr, "o-", color="tab:blue", label="explained variance (%)")
    ax.set_yscale("log")
    ax.set_xlabel("j")
    ax.set_ylabel("λj² / ‖Xc‖² (%)", color="tab:blue")
    ax.set_xticks(j)
    ax2 = ax.twinx()
    ax2.plot(j, 100 * np.cumsum(evr), "s--", color="tab:gray", label="cumulative (%)")
    ax2.set_ylabel("cumulative (%)", color="tab:gray")
    if chosen_d is not None:
        ax.axvline(chosen_d + 0.5, color="tab:red", linestyle=":", label=f"d = {chosen_d}")
        ax.annotate(f"d = {chosen_d}", xy=(chosen_d + 0.5, ax.get_ylim()[1]), xytext=(4, -14),
                    textcoords="offset points", color="tab:red")
    ax.set_title(f"Spectrum of the calibration inputs (N = {info.get('n_samples')}, p = {info.get('p')})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _write_atomic(path, buf.getvalue())


def _ratio(num: float, den: float) -> float | None:
    if den <= 0 or not np.isfinite(num / den):
        return None
    return float(num / den)
