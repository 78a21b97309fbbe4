"""Inference and training overhead of the FN form, measured against the original model.

(a) onnxruntime latency of the FN drop-in (``onnx_surgery.insert_fn`` on the exported graph) ÷ the original graph.
(b) one torch training step of ``surgery.FNModel`` with ``finetune.param_groups`` ÷ one plain training step.

The machine is shared and noisy, so A and B alternate run by run (ABBA order, so neither side always runs first)
and the figure quoted is the median of the per-pair ratios, next to each side's median time.

    python benchmarks/overhead.py                       # ResNet-18 and a small CNN, batch 1 and 32
    python benchmarks/overhead.py --models resnet18 --batches 32 --pairs 400 --factors 1,3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10-dev.npz"


def small_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def build(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    return (torchvision.models.resnet18(num_classes=10) if name == "resnet18" else small_cnn()).eval()


def real_factors(d: int, n: int = 2000):
    """Factors of real CIFAR-10 inputs (random orthonormal ones when the shared data is absent)."""
    from fnconvert.factors import fit_factors

    if DATA.is_file():
        with np.load(DATA) as z:
            x = z["x_train"][:n].transpose(0, 3, 1, 2).reshape(n, -1).astype(np.float32) / 255
        return fit_factors(x, d, method="exact", device="cpu"), "cifar10-dev"
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 3072)).astype(np.float32)
    return fit_factors(x, d, method="exact", device="cpu"), "uniform noise (shared data absent)"


def export_onnx(model, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def interleaved(run_a, run_b, pairs: int, clock=time.perf_counter, block: int = 1) -> dict:
    """Alternate A and B (ABBA), ``block`` runs each per sample; medians of each side and of the ratios B/A.

    ``clock`` is wall time, or ``time.thread_time`` (this thread's CPU time) for single-threaded runs: on a loaded
    machine the CPU time a run needed is far steadier than the wall time it took.
    """
    ta, tb = [], []
    for i in range(pairs):
        order = (run_a, run_b) if i % 2 == 0 else (run_b, run_a)
        for f in order:
            t0 = clock()
            for _ in range(block):
                f()
            dt = (clock() - t0) / block
            (ta if f is run_a else tb).append(dt)
    ratios = [b / a for a, b in zip(ta, tb)]
    q = np.quantile(ratios, [0.25, 0.75])
    return {"a": statistics.median(ta), "b": statistics.median(tb), "ratio": statistics.median(ratios),
            "q1": float(q[0]), "q3": float(q[1])}


def onnx_pair(name: str, batch: int, factors):
    """(original, FN) ONNX models for ``name``; the FN one made by the same surgery ``transform`` does."""
    import onnx

    from fnconvert import onnx_surgery as S

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        export_onnx(build(name), src)
        model = onnx.load(str(src))
    spec, head = S.analyze(model)
    C = np.random.default_rng(0).normal(scale=0.1, size=(factors.d, 10))
    fn = S.insert_fn(model, spec, head, factors.mean, factors.V, factors.B, C)
    S.check(fn)
    return model, fn


def onnx_latency(model, fn, batch: int, pairs: int, threads: int) -> dict:
    import onnxruntime as ort

    def session(m):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if threads == 1:  # every kernel runs on this thread, so thread_time measures the whole run
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    a, b = session(model), session(fn)
    x = np.random.default_rng(1).uniform(size=(batch, 3, 32, 32)).astype(np.float32)
    feed = {"input": x}
    for s in (a, b):  # warm-up: allocations, kernel selection
        for _ in range(5):
            s.run(None, feed)
    t_one = time.perf_counter()
    a.run(None, feed)
    block = max(1, int(2e-3 / max(time.perf_counter() - t_one, 1e-6)))  # ≥ 2 ms per sample: timer resolution
    clock = time.thread_time if threads == 1 else time.perf_counter
    return interleaved(lambda: a.run(None, feed), lambda: b.run(None, feed), pairs, clock, block)


def train_step_ratio(name: str, batch: int, factors, pairs: int, threads: int) -> dict:
    import copy

    import torch

    from fnconvert.finetune import param_groups
    from fnconvert.surgery import FNModel

    torch.set_num_threads(threads)
    plain = build(name).train()
    fn = FNModel(copy.deepcopy(plain), factors.mean, factors.V, factors.B, np.zeros((factors.d, 10))).train()
    opt_a = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_b = torch.optim.SGD(param_groups(fn, factors.singular_values, 1e-3), momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step(model, opt):
        def run():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    a, b = step(plain, opt_a), step(fn, opt_b)
    for _ in range(3):
        a(), b()
    clock = time.thread_time if threads == 1 else time.perf_counter
    return interleaved(a, b, pairs, clock)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,cnn")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--factors", default="1", help="comma-separated d values")
    p.add_argument("--pairs", type=int, default=200, help="interleaved A/B samples per onnxruntime figure")
    p.add_argument("--train-pairs", type=int, default=30, help="interleaved A/B training steps (0: skip)")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--threads", default=f"{os.cpu_count() or 1},1",
                   help="thread counts to measure; 1 is timed in CPU time of the calling thread, others in wall time")
    args = p.parse_args(argv)
    import onnxruntime
    import torch

    models = args.models.split(",")
    ds = [int(v) for v in args.factors.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    print(f"<!-- {datetime.date.today()}  {os.cpu_count()} cores  load {os.getloadavg()[0]:.1f}  python "
          f"{platform.python_version()}  torch {torch.__version__}  onnxruntime {onnxruntime.__version__} -->")
    print("| what | model | batch | d | threads (clock) | original (ms) | FN (ms) | FN ÷ original (median of ratios) "
          "| IQR of ratios |")
    print("|---|---|---|---|---|---|---|---|---|")
    fits = {d: real_factors(d) for d in ds}

    def row(what, name, batch, d, t, r):
        clock = "CPU" if t == 1 else "wall"
        print(f"| {what} | {name} | {batch} | {d} | {t} ({clock}) | {r['a'] * 1e3:.3f} | {r['b'] * 1e3:.3f} | "
              f"**{r['ratio']:.4f}** | {r['q1']:.3f}–{r['q3']:.3f} |", flush=True)

    for name in models:
        for d in ds:
            for batch in (int(v) for v in args.batches.split(",")):
                model, fn = onnx_pair(name, batch, fits[d][0])
                for t in threads:
                    row("onnxruntime latency", name, batch, d, t, onnx_latency(model, fn, batch, args.pairs, t))
    if args.train_pairs > 0:
        for name in models:
            for d in ds:
                for t in threads:
                    r = train_step_ratio(name, args.train_batch, fits[d][0], args.train_pairs, t)
                    row("torch training step", name, args.train_batch, d, t, r)
    print(f"\nfactors fitted on {fits[ds[0]][1]}; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
