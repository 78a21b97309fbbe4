"""Accuracy of the randomized factor solver beyond the headline benchmark: many seeds, many d, planted problems.

    python benchmarks/factors_robustness.py            # ~3 minutes on 2 cores
    python benchmarks/factors_robustness.py --planted 60 --large 10   # quicker

Three groups, each against a float64 reference computed here with numpy (independent of fnconvert):

1. CIFAR-10 dev (10,000 × 3,072, x/255 float32), seeds 0–3, d ∈ {1, 2, 3, 4, 5, 10, 12}.
2. ``--planted`` random low-rank + noise problems (k planted factors), N 30–400, p 8–200, float32 or float64.
   Two thirds fit d = k; a third fit d = k + 1, so λd is the top of the noise bulk and λd/λ_{d+1} is close to 1
   (the hardest case for the subspace). method="randomized" is forced (auto would pick exact here).
3. ``--large`` planted problems with N 4,096–8,192 and p 600–1,500, where the subsample warm start applies.

Per fit: sin θ of the top-d subspace (largest principal angle, float64) and max_j |λj/λ1 − λj*/λ1*| over
j = 1..d+1; the worst of each group is printed with the number of passes and of RuntimeWarnings (the solver's
"did not meet its tolerance" warning).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fnconvert.factors import fit_factors_with_spectrum  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-dev.npz"


def reference(X: np.ndarray):
    X = np.asarray(X, np.float64)
    Xc = X - X.mean(0)
    if X.shape[0] >= X.shape[1]:
        w, V = np.linalg.eigh(Xc.T @ Xc)
        w, V = w[::-1], V[:, ::-1]
        return np.sqrt(np.clip(w, 0, None)), V
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    return s, Vt.T


def sin_theta(V1, V2) -> float:
    Q1, _ = np.linalg.qr(np.asarray(V1, np.float64))
    Q2, _ = np.linalg.qr(np.asarray(V2, np.float64))
    return float(np.linalg.norm(Q1 - Q2 @ (Q2.T @ Q1), 2))


def planted(rng, n: int, p: int, k: int, dtype):
    F, _ = np.linalg.qr(rng.standard_normal((p, k)))
    strengths = np.sort(rng.uniform(1.0, 6.0, k))[::-1] * np.sqrt(p) / 4
    Z = rng.standard_normal((n, k)) * strengths
    X = Z @ F.T + 0.3 * rng.standard_normal((n, p)) + rng.uniform(-1, 1)
    return X.astype(dtype)


def fit_and_score(X, d, seed, s_ref, V_ref):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        f, spec = fit_factors_with_spectrum(X, d, method="randomized", seed=seed)
    sv = f.singular_values
    err_v = sin_theta(f.V, V_ref[:, :d])
    err_l = float(np.max(np.abs(sv / sv[0] - s_ref[: d + 1] / s_ref[0])))
    return err_v, err_l, spec.passes, sum(issubclass(w.category, RuntimeWarning) for w in caught)


def report(name, rows):
    v = max(r[0] for r in rows)
    lam = max(r[1] for r in rows)
    passes = sorted({r[2] for r in rows})
    warns = sum(r[3] for r in rows)
    print(f"| {name} | {len(rows)} | {v:.1e} | {lam:.1e} | {passes[0]}–{passes[-1]} | {warns} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--planted", type=int, default=300, help="small planted problems")
    ap.add_argument("--large", type=int, default=40, help="planted problems with N ≥ 4,096 (warm start)")
    args = ap.parse_args()
    t0 = time.time()
    print(f"# fit_factors robustness, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| group | fits | worst sin θ | worst λ error | passes | warnings |")
    print("|---|---:|---:|---:|---|---:|")

    with np.load(DATA) as z:
        x = z["x_train"]
    X = (x.reshape(len(x), -1).astype(np.float32) / 255).astype(np.float32)
    s_ref, V_ref = reference(X)
    rows = [fit_and_score(X, d, seed, s_ref, V_ref) for seed in range(4) for d in (1, 2, 3, 4, 5, 10, 12)]
    report("CIFAR-10 10k × 3,072, seeds 0–3, d ∈ {1,2,3,4,5,10,12}", rows)

    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.planted):
        n, p = int(rng.integers(30, 401)), int(rng.integers(8, 201))
        k = int(rng.integers(1, min(8, p // 2, n // 4) + 1))
        X = planted(rng, n, p, k, dtype=np.float32 if i % 2 else np.float64)
        s_ref, V_ref = reference(X)
        rows.append(fit_and_score(X, k + (i % 3 == 0), i, s_ref, V_ref))
    report(f"planted, N 30–400, p 8–200, d 1–8, float32/64 ({args.planted})", rows)

    rows = []
    for i in range(args.large):
        n, p = int(rng.integers(4096, 8193)), int(rng.integers(600, 1501))
        k = int(rng.integers(1, 9))
        X = planted(rng, n, p, k, dtype=np.float32)
        s_ref, V_ref = reference(X)
        rows.append(fit_and_score(X, k + (i % 3 == 0), i, s_ref, V_ref))
    report(f"planted, N 4,096–8,192, p 600–1,500 (warm start) ({args.large})", rows)
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
