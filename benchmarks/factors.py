"""Benchmark fit_factors against the usual ways of getting the top principal directions, on real CIFAR-10 inputs.

    python benchmarks/factors.py --repeats 5 --rows 10000,50000

Inputs: cifar10-dev x_train / 255 as float32, flattened to 3,072 features (10,000 rows). The 50,000-row set stacks
the 10k five times; copies 2–5 get N(0, 0.01²) noise so no row repeats exactly (seeded). Every method sees the
same float32 array already in memory.

Errors are against the float64 exact answer (float64 Gram + eigh of the centred data): the sine of the largest
principal angle between the top-d subspaces, ‖(I − Q2Q2ᵀ)Q1‖₂ computed in float64, and max_j |λj/λ1 − λj*/λ1*|
over j = 1..d+1. Timings are medians over ``--repeats`` interleaved runs (methods in rotating order, so a busy
machine hits all of them alike); "fn/sk" is the median of per-round ratios fnconvert/sklearn, measured side by
side in the same process. Each timed call starts after ``--settle`` seconds of idle: the BLAS thread pool of the
method before (OpenBLAS under sklearn, MKL/OpenMP under torch) keeps spinning for a moment after it returns and
slows whatever runs next (measured: fnconvert at d = 10 on 10k rows took 0.26 s right after sklearn, 0.19 s
after a 0.5 s pause or alone). ``--settle 0`` measures back to back.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fnconvert.factors import fit_factors_with_spectrum  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-dev.npz"


def load_cifar(rows: int, seed: int = 0) -> np.ndarray:
    with np.load(DATA) as z:
        x = z["x_train"]
    base = (x.reshape(len(x), -1).astype(np.float32) / 255).astype(np.float32)
    if rows <= len(base):
        return np.ascontiguousarray(base[:rows])
    rng = np.random.default_rng(seed)
    copies = -(-rows // len(base))
    parts = [base] + [base + rng.standard_normal(base.shape, dtype=np.float32) * np.float32(0.01)
                      for _ in range(copies - 1)]
    return np.ascontiguousarray(np.concatenate(parts)[:rows])


# ------------------------------------------------------------------------------------------------ the methods
# Each returns (V (p, d) float64, singular values (d+1,) float64) for the centred data.


def centred_gram(Xt: torch.Tensor, dtype, chunk: int = 4096):
    mean = Xt.mean(0, dtype=torch.float64)
    G = torch.zeros(Xt.shape[1], Xt.shape[1], dtype=dtype)
    m = mean.to(dtype)
    for i in range(0, Xt.shape[0], chunk):
        c = Xt[i : i + chunk].to(dtype) - m
        G.addmm_(c.T, c)
    return G


def gram_eigh(Xt: torch.Tensor, k: int, dtype):
    G = centred_gram(Xt, dtype)
    w, V = torch.linalg.eigh(G)
    w, V = w.flip(0)[:k], V.flip(1)[:, :k]
    return V.double().numpy(), w.double().clamp_min(0).sqrt().numpy()


def sklearn_randomized(X: np.ndarray, d: int, seed: int):
    from sklearn.decomposition import PCA

    pca = PCA(n_components=d + 1, svd_solver="randomized", random_state=seed).fit(X)
    return pca.components_[:d].T.astype(np.float64), pca.singular_values_.astype(np.float64)


def torch_lowrank(Xt: torch.Tensor, d: int, seed: int):
    torch.manual_seed(seed)
    mean = Xt.mean(0, keepdim=True)
    U, S, V = torch.svd_lowrank(Xt, q=d + 1 + 10, niter=2, M=mean)
    return V[:, :d].double().numpy(), S[: d + 1].double().numpy()


def fnconvert_auto(X: np.ndarray, d: int, seed: int):
    f, spec = fit_factors_with_spectrum(X, d, seed=seed)
    fnconvert_auto.last = (f.method, spec.passes)
    return f.V, f.singular_values


# ------------------------------------------------------------------------------------------------ measuring


def sin_theta(V1, V2) -> float:
    Q1, _ = np.linalg.qr(np.asarray(V1, np.float64))
    Q2, _ = np.linalg.qr(np.asarray(V2, np.float64))
    return float(np.linalg.norm(Q1 - Q2 @ (Q2.T @ Q1), 2))


def errors(V, s, V_ref, s_ref, d):
    return sin_theta(V[:, :d], V_ref[:, :d]), float(np.max(np.abs(s[: d + 1] / s[0] - s_ref[: d + 1] / s_ref[0])))


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per (rows, d); medians reported")
    ap.add_argument("--rows", default="10000,50000", help="comma-separated row counts (>10k stacks with noise)")
    ap.add_argument("--d", default="1,10", help="comma-separated factor counts")
    ap.add_argument("--gram-repeats", type=int, default=1, help="runs of the (slow, d-independent) Gram methods")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="idle seconds before each timed call, so no method pays for the previous one's threads")
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing; see ../shared/data/README.md")
    rows_list = [int(r) for r in args.rows.split(",")]
    d_list = [int(v) for v in args.d.split(",")]
    load0 = os.getloadavg()
    print(f"# fit_factors benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average at start {load0[0]:.2f}\n")
    table = ["| rows | d | method | median time (s) | sin θ vs float64 | max abs λj/λ1 err | fn/sk time |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for rows in rows_list:
        X = load_cifar(rows)
        Xt = torch.from_numpy(X)
        kmax = max(d_list) + 1
        # Float64 Gram + eigh: the reference, and a timed method in its own right.
        g64 = [timed(gram_eigh, Xt, kmax, torch.float64) for _ in range(args.gram_repeats)]
        V_ref, s_ref = g64[0][1]
        g32 = [timed(gram_eigh, Xt, kmax, torch.float32) for _ in range(args.gram_repeats)]
        for d in d_list:
            methods = {
                "fnconvert auto": lambda r: fnconvert_auto(X, d, r),
                "sklearn PCA randomized": lambda r: sklearn_randomized(X, d, r),
                "torch.svd_lowrank q=d+11 niter=2": lambda r: torch_lowrank(Xt, d, r),
            }
            times = {m: [] for m in methods}
            errs = {}
            names = list(methods)
            fn_meta = None
            for r in range(args.repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for m in order:
                    time.sleep(args.settle)
                    t, (V, s) = timed(methods[m], r)
                    times[m].append(t)
                    errs.setdefault(m, errors(V, s, V_ref, s_ref, d))
                    if m == "fnconvert auto":
                        fn_meta = fnconvert_auto.last
            ratios = [a / b for a, b in zip(times["fnconvert auto"], times["sklearn PCA randomized"])]
            ratio = statistics.median(ratios)
            for m in names:
                label = m if m != "fnconvert auto" else f"fnconvert auto ({fn_meta[0]}, {fn_meta[1]} passes)"
                extra = f"{ratio:.2f}" if m == "fnconvert auto" else ""
                table.append(f"| {rows:,} | {d} | {label} | {statistics.median(times[m]):.3f} | "
                             f"{errs[m][0]:.1e} | {errs[m][1]:.1e} | {extra} |")
            for name, runs in (("float64 Gram + eigh (reference)", g64), ("float32 Gram + eigh", g32)):
                V, s = runs[0][1]
                e = errors(V, s, V_ref, s_ref, d)
                table.append(f"| {rows:,} | {d} | {name} | {statistics.median(t for t, _ in runs):.3f} | "
                             f"{e[0]:.1e} | {e[1]:.1e} | |")
            print("\n".join(table[-5:]), flush=True)
    load1 = os.getloadavg()
    print("\n" + "\n".join(table))
    print(f"\nload average at end {load1[0]:.2f}; the Gram rows are d-independent (one fit of the top "
          f"{max(d_list) + 1}, {args.gram_repeats} run(s)); {args.settle:g} s idle before each timed call.")


if __name__ == "__main__":
    main()
