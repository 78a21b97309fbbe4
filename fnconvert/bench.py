"""``fnconvert bench``: the paper's experiments (§4), baseline against FN, for SGD, NAG, Adagrad and Adam.

Protocol, per optimizer (paper §4; every choice is recorded in ``results.json["settings"]``):

* One initialisation (``torch.manual_seed(seed)``) of the model on raw inputs: the **baseline**. The **FN** model is a
  deep copy of the same initial weights, converted by the library itself (:func:`fit_factors` on the training inputs,
  :func:`~fnconvert.surgery.build_fn_model` with its least-squares factor head) and trained with the paper's
  adaptive rates as optimizer parameter groups (:func:`~fnconvert.finetune.param_groups`). Nothing of the method is
  re-implemented here.
* A grid over the initial rate α, run for each side separately (same grid, same data order, interleaved so that
  machine noise hits both sides alike). Each side keeps its own best α: highest test accuracy over the epochs, ties
  broken by the lower final training loss, then by the lower α. Runs whose loss becomes NaN/Inf (diverged) or ends
  above 1.5·ln(classes) (unstable) are not eligible. Where either side's best α lies at an edge of the grid, the grid
  is extended past that edge (≤ 3 rates per direction), for both sides. As in the paper, the rate is chosen on the
  test split (there is no third split).
* 1/√t decay per epoch (``make_scheduler(..., "inv-sqrt")``), batch size 200 by default.
* Per epoch: the mean training loss over the epoch's batches, test accuracy, and cumulative wall seconds of training
  (evaluation excluded). FN's seconds start at its set-up time (factor fit + head calibration), as in the paper.
* Target accuracy = the baseline's best accuracy (best epoch of its best-α run) − 0.01. ``epochs_to_target`` and
  ``seconds_to_target`` are read from each side's best-α curve: the first epoch whose test accuracy ≥ target; null
  when never reached.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FnconvertError
from .log import NULL_LOG, Log

MODELS = ("logreg", "mlp", "cnn")
FACTOR_METHODS = ("auto", "exact", "randomized")  # fit_factors' methods
OPTIMIZERS = ("sgd", "nag", "adagrad", "adam")
#: ``--lr-grid auto``: where each grid starts, in steps of ~3. The best rate moves with the input scale (SGD on
#: logreg: ~1 for MNIST in [0, 1], ~0.03 for CIFAR-10 in [0, 1]) and FN's residual group runs at α·(λ1/λ_{d+1})²
#: (×1.3 … ×22 here), so FN's best α sits lower than the baseline's: the grid is then extended past any edge where
#: either side's best rate lies (:func:`next_grid_rate`). NAG uses momentum 0.9 (an effective step ≈ 10·α), hence
#: its grid sits lower than SGD's; Adam's and Adagrad's steps do not scale with the gradient.
AUTO_GRID = {
    "sgd": (0.3, 0.1, 0.03, 0.01),
    "nag": (0.1, 0.03, 0.01, 0.003),
    "adagrad": (0.1, 0.03, 0.01),
    "adam": (0.003, 0.001, 0.0003),
}
#: ``--quick`` with ``--lr-grid auto``: two rates from the middle of each grid (a smoke test, not a measurement).
QUICK_GRID = {"sgd": (0.03, 0.01), "nag": (0.01, 0.003), "adagrad": (0.01, 0.003), "adam": (0.001, 0.0003)}
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 2000, 500, 2
MAX_EXTEND = 3  # rates added beyond each edge of the grid at most
#: A run ending with a training loss above UNSTABLE_FACTOR·ln(classes) (far worse than predicting uniform
#: probabilities, ln(classes)) blew up without reaching NaN: it is "unstable" and, like a diverged run, not eligible.
#: Otherwise a lucky accuracy spike of such a run could win the grid and hide a better rate past the grid's edge.
UNSTABLE_FACTOR = 1.5
TARGET_GAP = 0.01  # the paper's "1 % lower than the optimal accuracy of baseline models"
SCHEDULE = "inv-sqrt"
#: Splits up to this size (as float32) are preprocessed once and held in memory; larger ones are streamed per batch.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
RESULT_FILES = ("results.json", "results.md", "curves.png")
_EPS = 1e-9  # accuracies are count/total; the target is a float difference: compare with a tolerance


@dataclass
class BenchOptions:
    data: str
    out: str
    model: str = "logreg"
    optimizers: str | tuple = "sgd,nag,adagrad,adam"
    factors: int = 1
    epochs: int = 8
    lr_grid: str = "auto"
    batch_size: int = 200
    seed: int = 0
    quick: bool = False
    force: bool = False
    method: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    threads: int = 0  # torch CPU threads for the run; 0 keeps torch's default
    extend_grid: bool = True  # extend the grid past an edge where a side's best rate lies (not with --quick)


# ----------------------------------------------------------------------------------------------------------------
# The protocol's pure parts (no torch): parsing, selection, target, reading the curves


def parse_optimizers(spec) -> list[str]:
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not names:
        raise FnconvertError(f"--optimizers {spec!r} is empty; give a comma list from {','.join(OPTIMIZERS)}")
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        raise FnconvertError(
            f"--optimizers: {bad[0]!r} is not one of {', '.join(OPTIMIZERS)}; e.g. sgd,nag,adagrad,adam")
    return list(dict.fromkeys(names))


def parse_lr_grid(spec: str, optimizers: list[str], *, quick: bool = False) -> dict[str, list[float]]:
    """``auto`` | ``a,b,c`` (the same grid for every optimizer) | ``sgd:a,b;adam:c,d`` (one grid per optimizer)."""
    text = str(spec).strip()
    if text.lower() == "auto":
        table = QUICK_GRID if quick else AUTO_GRID
        return {o: list(table[o]) for o in optimizers}
    if ":" in text:
        grids: dict[str, list[float]] = {}
        for part in (p for p in text.split(";") if p.strip()):
            name, _, values = part.partition(":")
            name = name.strip().lower()
            if name not in OPTIMIZERS:
                raise FnconvertError(f"--lr-grid {spec!r}: {name!r} is not one of {', '.join(OPTIMIZERS)}; "
                                     "write e.g. 'sgd:0.1,0.03;adam:0.001'")
            grids[name] = _rates(values, spec)
        missing = [o for o in optimizers if o not in grids]
        if missing:
            raise FnconvertError(f"--lr-grid {spec!r} has no rates for {', '.join(missing)}; add "
                                 f"'{missing[0]}:RATE,…' or use --lr-grid auto")
        return {o: grids[o] for o in optimizers}
    rates = _rates(text, spec)
    return {o: list(rates) for o in optimizers}


def _rates(text: str, spec) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FnconvertError(f"--lr-grid {spec!r} is not a comma list of numbers; write e.g. 0.1,0.03,0.01 or auto")
    if not vals:
        raise FnconvertError(f"--lr-grid {spec!r} holds no rate; write e.g. 0.1,0.03,0.01 or auto")
    for v in vals:
        if not (v > 0 and math.isfinite(v)):
            raise FnconvertError(f"--lr-grid {spec!r}: rate {v} must be a positive finite number")
    return list(dict.fromkeys(vals))


def step_rate(lr: float, direction: int) -> float:
    """The next rate of the 1–3–10 series up (+1) or down (−1); other values move by a factor √10."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = lr / 10**e
    if abs(m - 1) < 1e-6:
        out = lr * (3 if direction > 0 else 0.3)
    elif abs(m - 3) < 1e-5:
        out = lr * (10 / 3 if direction > 0 else 1 / 3)
    else:
        out = lr * math.sqrt(10) ** direction
    return float(f"{out:.6g}")


def next_grid_rate(runs: dict[str, list[dict]], extended: list[float], max_extend: int | None = None) -> float | None:
    """The rate to add when a side's best rate lies at an edge of the grid run so far (None: no edge to extend).

    A side whose every run diverged (or is unstable) asks for a lower rate. Each direction is extended at most
    ``max_extend`` times; both sides then run the added rate, so the grid stays one grid.
    """
    max_extend = MAX_EXTEND if max_extend is None else max_extend
    rates = sorted({r["lr"] for side in runs.values() for r in side})
    lo, hi = rates[0], rates[-1]
    original = [x for x in rates if x not in extended] or rates
    ups = sum(1 for x in extended if x > max(original))
    downs = sum(1 for x in extended if x < min(original))
    wanted = []
    for side in ("baseline", "fn"):
        best = select_best(runs[side])
        if best is None:
            wanted.append(-1)
        elif len(rates) > 1 and best["lr"] == hi:
            wanted.append(+1)
        elif len(rates) > 1 and best["lr"] == lo:
            wanted.append(-1)
    for direction in wanted:
        if direction > 0 and ups < max_extend:
            return step_rate(hi, +1)
        if direction < 0 and downs < max_extend:
            return step_rate(lo, -1)
    return None


def best_of_curve(curve: list[dict]) -> tuple[float | None, int | None]:
    """(best test accuracy, first epoch reaching it)."""
    if not curve:
        return None, None
    best = max(r["test_accuracy"] for r in curve)
    return best, next(r["epoch"] for r in curve if r["test_accuracy"] >= best)


def select_best(runs: list[dict]) -> dict | None:
    """The run with the best test accuracy (over its epochs); ties → lower final train loss, then lower rate.

    Diverged and unstable runs and runs without a curve are not eligible; None when no run is.
    """
    ok = [r for r in runs if r["curve"] and not r.get("diverged_at_epoch") and not r.get("unstable")]
    if not ok:
        return None
    return min(ok, key=lambda r: (-round(best_of_curve(r["curve"])[0], 12), r["curve"][-1]["train_loss"], r["lr"]))


def target_accuracy(baseline_best: dict | None, gap: float = TARGET_GAP) -> float | None:
    """The benchmark accuracy: the baseline's best accuracy (best epoch of its best run) − ``gap``."""
    if baseline_best is None:
        return None
    return round(best_of_curve(baseline_best["curve"])[0] - gap, 10)


def first_reaching(curve: list[dict], target: float | None) -> tuple[int | None, float | None]:
    """(epoch, cumulative seconds) of the first epoch whose test accuracy ≥ target; (None, None) if none."""
    if target is None:
        return None, None
    for r in curve:
        if r["test_accuracy"] >= target - _EPS:
            return r["epoch"], r["seconds"]
    return None, None


def _no_later(a, b) -> bool | None:
    """a ≤ b with None meaning "never"; None when b (the baseline) never got there either."""
    if b is None:
        return None if a is None else True
    return a is not None and a <= b


# ----------------------------------------------------------------------------------------------------------------
# Models


def make_model(name: str, input_shape: tuple[int, ...], num_classes: int):
    """The paper's models on raw inputs of ``input_shape`` (C, H, W) (or any shape for logreg and mlp)."""
    from torch import nn

    p = int(np.prod(input_shape))
    if name == "logreg":  # §4.1
        return nn.Sequential(nn.Flatten(), nn.Linear(p, num_classes))
    if name == "mlp":  # §4.2: two hidden layers of 1,000 ReLU units
        return nn.Sequential(nn.Flatten(), nn.Linear(p, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                             nn.Linear(1000, num_classes))
    if name == "cnn":  # §4.3: a small AlexNet-style network (5 conv + 3 dense layers, ReLU, max-pooling)
        return _small_alexnet(input_shape, num_classes)
    raise FnconvertError(f"--model {name!r} is not one of {', '.join(MODELS)}")


def _small_alexnet(input_shape: tuple[int, ...], num_classes: int):
    """AlexNet's layout scaled to 32×32 inputs and a 2-core CPU budget (~1.4 M multiply-adds per image).

    A strided 5×5 first convolution (AlexNet's is 11×11 stride 4 on 224 px), max-pooling after conv 1, 2 and 5,
    three 3×3 convolutions in a row, then three dense layers. Weights are Kaiming-normal (ReLU gain), biases zero:
    with PyTorch's default init this plain (normalisation-free) stack barely moves under SGD in a few epochs.
    Any C×H×W input of at least 16×16 works (28×28 greyscale MNIST ends in 1×1 feature maps).
    """
    import torch
    from torch import nn

    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise FnconvertError(
            f"--model cnn needs images of at least 16×16 pixels (C×H×W); the data's samples have shape "
            f"{tuple(input_shape)}; use --model logreg or mlp for these inputs"
        )
    c, c1, c2, c3, fc = input_shape[0], 16, 32, 48, 128
    features = nn.Sequential(
        nn.Conv2d(c, c1, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).shape[1]
    model = nn.Sequential(*features, nn.Linear(flat, fc), nn.ReLU(), nn.Linear(fc, fc), nn.ReLU(),
                          nn.Linear(fc, num_classes))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Data held for the grid


class InMemorySplit:
    """A split preprocessed once into float32 tensors (held once), batched by slicing.

    The grid trains 2 × |grid| × |optimizers| runs over the same small split; converting the uint8 samples per batch
    would redo the same conversion dozens of times and add its cost (and noise) to every timing. Larger splits than
    :data:`IN_MEMORY_LIMIT_BYTES` are streamed from the :class:`~fnconvert.data.Split` instead.
    The shuffle is the one ``Split.batches`` uses (``torch.randperm`` seeded by ``shuffle_seed``).
    """

    def __init__(self, split, indices: np.ndarray, device: str = "cpu", chunk: int = 4096):
        import torch

        shape = (len(indices), *split.input_shape)
        self.x = torch.empty(shape, dtype=torch.float32)
        for s in range(0, len(indices), chunk):  # chunked: no full-size float64/int temporaries
            self.x[s : s + chunk] = split.pre.apply(split.raw(indices[s : s + chunk]))
        self.y = torch.from_numpy(split.y[indices].copy())
        self.x, self.y = self.x.to(device), self.y.to(device)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, indices=None, *, shuffle_seed: int | None = None):
        import torch

        n = len(self.y)
        order = None
        if shuffle_seed is not None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(shuffle_seed))).to(self.x.device)
        for s in range(0, n, batch_size):
            if order is None:
                yield self.x[s : s + batch_size], self.y[s : s + batch_size]
            else:
                b = order[s : s + batch_size]
                yield self.x[b], self.y[b]


class StreamedSplit:
    """A (subset of a) split converted per batch, for data too large to hold as float32."""

    def __init__(self, split, indices: np.ndarray, device: str = "cpu"):
        self.split, self.indices, self.device = split, indices, device

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, indices=None, *, shuffle_seed: int | None = None):
        for x, y in self.split.batches(batch_size, self.indices, shuffle_seed=shuffle_seed):
            yield x.to(self.device), y.to(self.device)


def hold_split(split, indices: np.ndarray, device: str = "cpu"):
    nbytes = len(indices) * split.n_features * 4
    if nbytes <= IN_MEMORY_LIMIT_BYTES:
        return InMemorySplit(split, indices, device)
    return StreamedSplit(split, indices, device)


def _subset(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


# ----------------------------------------------------------------------------------------------------------------
# Building the pair and training one run


def convert_to_fn(init_model, factors, train, example):
    """The FN form of a deep copy of ``init_model`` (the library's surgery); returns (fn, seconds)."""
    from .surgery import build_fn_model

    t0 = time.perf_counter()
    calib = _Reiter(lambda: (x for x, _ in train.batches(1000)))
    fn, _ = build_fn_model(copy.deepcopy(init_model), factors, calib, example)
    return fn, time.perf_counter() - t0


def train_run(model, groups: list[dict], optimizer: str, train, test, *, epochs: int, batch_size: int, seed: int,
              tail: str = "none", start_seconds: float = 0.0, device: str = "cpu",
              unstable_loss: float | None = None) -> dict:
    """Train ``model`` in place; one curve row per epoch. The same loop serves both sides.

    A run stops at the first epoch whose loss is NaN/Inf (``diverged_at_epoch``); a run that ends with a training loss
    above ``unstable_loss`` is marked ``unstable``. Neither is eligible as a side's best run.
    """
    import torch

    from .finetune import evaluate, loss_for, make_optimizer, make_scheduler

    opt = make_optimizer(optimizer, groups)
    sched = make_scheduler(opt, SCHEDULE, epochs)
    cuda = str(device).startswith("cuda")
    curve: list[dict] = []
    elapsed, diverged = float(start_seconds), None
    for epoch in range(epochs):
        model.train()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for x, y in train.batches(batch_size, shuffle_seed=seed * 100_003 + epoch):
            loss = loss_for(model(x), y, tail)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            count += len(y)
        sched.step()
        train_loss = float(total) / max(count, 1)  # syncs the device
        elapsed += time.perf_counter() - t0
        if not math.isfinite(train_loss):
            diverged = epoch + 1
            break
        acc = evaluate(model, test, batch_size=1000, device=device)
        curve.append({"epoch": epoch + 1, "train_loss": train_loss, "test_accuracy": acc, "seconds": round(elapsed, 4)})
    unstable = bool(unstable_loss is not None and curve and curve[-1]["train_loss"] > unstable_loss)
    return {"curve": curve, "diverged_at_epoch": diverged, "unstable": unstable}


class _Reiter:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def _validate(opts: BenchOptions) -> dict:
    if opts.model not in MODELS:
        raise FnconvertError(f"--model {opts.model!r} is not one of {', '.join(MODELS)}")
    optimizers = parse_optimizers(opts.optimizers)
    grids = parse_lr_grid(opts.lr_grid, optimizers, quick=opts.quick)
    if opts.epochs < 1:
        raise FnconvertError(f"--epochs {opts.epochs} must be ≥ 1")
    if opts.batch_size < 1:
        raise FnconvertError(f"--batch-size {opts.batch_size} must be ≥ 1")
    if opts.factors < 1:
        raise FnconvertError(f"--factors {opts.factors} must be ≥ 1")
    if opts.threads < 0:
        raise FnconvertError(f"--threads {opts.threads} must be ≥ 0 (0 keeps torch's default)")
    if opts.method not in FACTOR_METHODS:
        raise FnconvertError(f"--method {opts.method!r} is not one of {', '.join(FACTOR_METHODS)}")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise FnconvertError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise FnconvertError(f"--out {out} is not empty; pass --force to overwrite, or choose another folder")
    epochs = min(opts.epochs, QUICK_EPOCHS) if opts.quick else opts.epochs
    extend = opts.extend_grid and not opts.quick
    return {"optimizers": optimizers, "grids": grids, "epochs": epochs, "out": out, "extend": extend}


def run_bench(opts: BenchOptions, log: Log = NULL_LOG) -> dict:
    """Run the protocol; write ``results.json``, ``results.md`` and ``curves.png`` to ``opts.out``; return them."""
    import torch

    v = _validate(opts)
    before = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _run_bench(opts, v, log)
    finally:
        torch.set_num_threads(before)


def _run_bench(opts: BenchOptions, v: dict, log: Log) -> dict:
    import torch

    from . import __version__
    from .data import load_data
    from .export import clean_stale_tmp, write_json
    from .factors import fit_factors
    from .finetune import adaptive_rates, param_groups
    from .pipeline import resolve_device

    t_all, cpu_all = time.perf_counter(), time.process_time()
    optimizers, grids, epochs, out = v["optimizers"], v["grids"], v["epochs"], v["out"]
    device = resolve_device(opts.device)
    ds = load_data(opts.data, data_dir=opts.data_dir)
    input_shape = tuple(ds.train.input_shape)
    p, num_classes = int(np.prod(input_shape)), ds.num_classes
    tr_idx = _subset(len(ds.train), QUICK_TRAIN if opts.quick else None, opts.seed)
    te_idx = _subset(len(ds.test), QUICK_TEST if opts.quick else None, opts.seed + 1)
    if opts.factors >= min(p, len(tr_idx)):
        raise FnconvertError(f"--factors {opts.factors} must be below min(features {p}, training samples "
                             f"{len(tr_idx)}); the paper uses 1, 2 or 10")
    torch.manual_seed(opts.seed)
    init_model = make_model(opts.model, input_shape, num_classes).to(device)  # refuses unsuitable shapes
    init_state = copy.deepcopy(init_model.state_dict())

    t0 = time.perf_counter()
    train, test = hold_split(ds.train, tr_idx, device), hold_split(ds.test, te_idx, device)
    log.info(f"data: {ds.name}, {len(train)} train / {len(test)} test samples of shape {input_shape} "
             f"({'in memory' if isinstance(train, InMemorySplit) else 'streamed'}, {time.perf_counter() - t0:.1f}s)")
    example = next(train.batches(2))[0]

    t0 = time.perf_counter()
    factors = fit_factors(ds.train.flat_batches(1000, tr_idx), opts.factors, method=opts.method, device=device,
                          seed=opts.seed)
    factor_seconds = time.perf_counter() - t0
    fn_init, calib_seconds = convert_to_fn(init_model, factors, train, example)
    fn_init = fn_init.to(device)
    setup_seconds = factor_seconds + calib_seconds
    sv = [float(s) for s in factors.singular_values]
    mult = adaptive_rates(sv, 1.0)
    log.info(f"factors: d={opts.factors} ({factors.method}, {factor_seconds:.2f}s), head calibration "
             f"{calib_seconds:.2f}s; rate multipliers: factor {_fmt_list(mult['factor'])}, residual "
             f"{mult['residual']:.3g}")

    # ---- inputs are valid (data, model, factors): from here on the output folder exists --------------------------
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    for name in RESULT_FILES:  # --force: no stale result may survive a failed rerun
        (out / name).unlink(missing_ok=True)

    _warmup([(init_model, "none"), (fn_init, fn_init.tail)], train, opts.batch_size)
    results: dict = {"optimizers": {}}
    unstable_loss = UNSTABLE_FACTOR * math.log(num_classes)
    extended: dict[str, list[float]] = {}
    for opt_name in optimizers:
        runs: dict[str, list[dict]] = {"baseline": [], "fn": []}

        def run_rate(lr: float) -> None:  # baseline then FN: interleaved, so machine noise hits both sides alike
            base = copy.deepcopy(init_model)
            r = train_run(base, [{"params": list(base.parameters()), "lr": lr, "name": "all"}], opt_name, train,
                          test, epochs=epochs, batch_size=opts.batch_size, seed=opts.seed, device=device,
                          unstable_loss=unstable_loss)
            runs["baseline"].append({"lr": lr, **r})
            _log_run(log, opt_name, "baseline", lr, r)
            fn = copy.deepcopy(fn_init)
            r = train_run(fn, param_groups(fn, sv, lr), opt_name, train, test, epochs=epochs,
                          batch_size=opts.batch_size, seed=opts.seed, tail=fn.tail, start_seconds=setup_seconds,
                          device=device, unstable_loss=unstable_loss)
            runs["fn"].append({"lr": lr, **r})
            _log_run(log, opt_name, "fn", lr, r)

        for lr in grids[opt_name]:
            run_rate(lr)
        extended[opt_name] = []
        while v["extend"]:
            lr = next_grid_rate(runs, extended[opt_name])
            if lr is None:
                break
            log.info(f"{opt_name:>7}: a best rate lies at the edge of the grid; extending it with lr={lr:g}")
            extended[opt_name].append(lr)
            run_rate(lr)
        grid = sorted((r["lr"] for r in runs["baseline"]), reverse=True)
        for side in runs:
            runs[side].sort(key=lambda r: -r["lr"])
        results["optimizers"][opt_name] = summarize_optimizer(runs, grid, {"baseline": 0.0, "fn": setup_seconds})
        results["optimizers"][opt_name]["lr_grid_extended_with"] = extended[opt_name]

    results["summary"] = _summary(results["optimizers"])
    results["settings"] = {
        "data": str(opts.data), "dataset": ds.name, "model": opts.model, "optimizers": optimizers,
        "factors": opts.factors, "epochs": epochs, "lr_grid": grids, "lr_grid_spec": str(opts.lr_grid),
        "lr_grid_extension": (f"up to {MAX_EXTEND} rates beyond an edge where a side's best rate lies, per direction"
                              if v["extend"] else "off"), "lr_grid_extended_with": extended,
        "batch_size": opts.batch_size, "seed": opts.seed, "quick": opts.quick, "schedule": SCHEDULE + " (per epoch)",
        "train_samples": len(train), "test_samples": len(test), "input_shape": list(input_shape),
        "num_classes": num_classes, "model_parameters": int(sum(t.numel() for t in init_state.values())),
        "factor_method": factors.method, "singular_values": sv,
        "rate_multipliers": {"factor": mult["factor"], "residual": mult["residual"]},
        "fn_setup_seconds": {"factors": round(factor_seconds, 4), "calibration": round(calib_seconds, 4)},
        "selection": "per side: best test accuracy over epochs; ties → lower final train loss, then lower lr; "
                     f"diverged runs (NaN/Inf) and unstable runs (final train loss > {UNSTABLE_FACTOR}·ln(classes) "
                     f"= {unstable_loss:.3f}) not eligible",
        "target": f"baseline best accuracy − {TARGET_GAP}",
        "seconds": "cumulative wall seconds of training (evaluation excluded); FN's include factor fit + calibration",
        "device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.platform(), "fnconvert_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results["settings"]["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["settings"]["total_cpu_seconds"] = round(time.process_time() - cpu_all, 1)
    _plot(results, out / "curves.png")
    from .export import atomic_path

    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(render_markdown(results))
    write_json(results, out / "results.json")  # last: its presence marks a complete result
    log.info(f"wrote {out}/results.json, results.md, curves.png in {results['settings']['total_seconds']:.0f}s")
    return results


def summarize_optimizer(runs: dict[str, list[dict]], grid: list[float], setup_seconds: dict | None = None) -> dict:
    """Per optimizer: each side's best run, the target from the baseline, and what each side's curve reached.

    Besides the measured ``seconds_to_target`` each side gets ``seconds_to_target_steady`` = set-up + epochs to target
    × the median epoch time over all of that side's runs: the same quantity with the machine's load spikes removed.
    """
    setup_seconds = setup_seconds or {}
    best = {side: select_best(runs[side]) for side in ("baseline", "fn")}
    target = target_accuracy(best["baseline"])
    entry: dict = {"target_accuracy": target, "lr_grid": list(grid)}
    for side in ("baseline", "fn"):
        b = best[side]
        grid_rows = []
        for r in runs[side]:
            acc, ep = best_of_curve(r["curve"])
            e, s = first_reaching(r["curve"], target)
            grid_rows.append({"lr": r["lr"], "best_accuracy": acc, "best_epoch": ep,
                              "final_train_loss": r["curve"][-1]["train_loss"] if r["curve"] else None,
                              "final_accuracy": r["curve"][-1]["test_accuracy"] if r["curve"] else None,
                              "epochs_to_target": e, "seconds_to_target": s,
                              "diverged_at_epoch": r.get("diverged_at_epoch"), "unstable": bool(r.get("unstable")),
                              "curve": r["curve"]})
        if b is None:
            entry[side] = {"best_lr": None, "epochs_to_target": None, "seconds_to_target": None,
                           "seconds_to_target_steady": None, "setup_seconds": round(setup_seconds.get(side, 0.0), 4),
                           "final_train_loss": None, "best_accuracy": None, "best_epoch": None,
                           "best_lr_at_grid_edge": None, "curve": [], "grid": grid_rows,
                           "note": "every rate of the grid diverged or was unstable"}
            continue
        acc, ep = best_of_curve(b["curve"])
        e, s = first_reaching(b["curve"], target)
        setup = float(setup_seconds.get(side, 0.0))
        med = median_epoch_seconds(runs[side], setup)
        entry[side] = {
            "best_lr": b["lr"], "epochs_to_target": e, "seconds_to_target": s,
            "seconds_to_target_steady": None if e is None else round(setup + e * med, 4),
            "median_epoch_seconds": round(med, 4), "setup_seconds": round(setup, 4),
            "final_train_loss": b["curve"][-1]["train_loss"], "best_accuracy": acc, "best_epoch": ep,
            "final_accuracy": b["curve"][-1]["test_accuracy"], "total_seconds": b["curve"][-1]["seconds"],
            "best_lr_at_grid_edge": len(grid) > 1 and b["lr"] in (max(grid), min(grid)),
            "curve": b["curve"], "grid": grid_rows,
        }
    fb, bb = entry["fn"], entry["baseline"]
    entry["comparison"] = {
        "fn_no_later_epochs": _no_later(fb["epochs_to_target"], bb["epochs_to_target"]),
        "fn_no_later_seconds": _no_later(fb["seconds_to_target"], bb["seconds_to_target"]),
        "fn_final_loss_no_higher": (None if fb["final_train_loss"] is None or bb["final_train_loss"] is None
                                    else fb["final_train_loss"] <= bb["final_train_loss"]),
    }
    return entry


def median_epoch_seconds(runs: list[dict], setup: float = 0.0) -> float:
    """The median training time of one epoch over all runs (curves hold cumulative seconds from ``setup``)."""
    times = []
    for r in runs:
        prev = setup
        for row in r["curve"]:
            times.append(row["seconds"] - prev)
            prev = row["seconds"]
    return float(np.median(times)) if times else float("nan")


def _warmup(models, train, batch_size: int) -> None:
    """One untimed forward/backward per model (on copies): first-call overheads must not land in a timed run."""
    from .finetune import loss_for

    x, y = next(train.batches(batch_size))
    for m, tail in models:
        loss_for(copy.deepcopy(m)(x), y, tail).backward()


def _summary(per_opt: dict) -> dict:
    ok_ep = [o for o, e in per_opt.items() if e["comparison"]["fn_no_later_epochs"]
             and e["comparison"]["fn_final_loss_no_higher"]]
    ok_s = [o for o, e in per_opt.items() if e["comparison"]["fn_no_later_seconds"]
            and e["comparison"]["fn_final_loss_no_higher"]]
    return {"fn_no_later_epochs_and_loss_no_higher": ok_ep, "fn_no_later_seconds_and_loss_no_higher": ok_s,
            "optimizers": len(per_opt)}


def _log_run(log: Log, opt: str, side: str, lr: float, r: dict) -> None:
    if r["diverged_at_epoch"]:
        log.info(f"{opt:>7} {side:>8} lr={lr:g}: diverged in epoch {r['diverged_at_epoch']}")
        return
    acc, ep = best_of_curve(r["curve"])
    last = r["curve"][-1]
    log.info(f"{opt:>7} {side:>8} lr={lr:g}: best acc {acc:.4f} (epoch {ep}), final loss {last['train_loss']:.4f}, "
             f"{last['seconds']:.1f}s{' (unstable: not eligible)' if r.get('unstable') else ''}")


def _fmt_list(xs) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# fnconvert bench: {s['model']} on {s['dataset']}, d = {s['factors']}",
        "",
        f"{s['train_samples']} train / {s['test_samples']} test samples, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, "
        f"seed {s['seed']}, {s['schedule']} decay{', --quick' if s['quick'] else ''}; {s['device']}, "
        f"{s['torch_threads']} threads, {s['date']}.",
        f"Rate multipliers (λ1/λj)²: factors {_fmt_list(s['rate_multipliers']['factor'])}, residual "
        f"{s['rate_multipliers']['residual']:.3g}. FN set-up (factor fit + calibration) "
        f"{s['fn_setup_seconds']['factors'] + s['fn_setup_seconds']['calibration']:.2f} s, counted in FN's seconds.",
        "Target = baseline's best accuracy − 0.01. Epochs/seconds to target: first epoch of each side's best-lr run "
        "at or above the target (— = never). Steady seconds = set-up + epochs × the side's median epoch time "
        "(load spikes of a shared machine removed).",
        "",
        "| optimizer | target | lr base / FN | epochs→target base / FN | seconds→target base / FN "
        "| steady seconds→target base / FN | final loss base / FN | best acc base / FN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for opt, e in results["optimizers"].items():
        b, f = e["baseline"], e["fn"]
        lines.append(
            f"| {opt} | {_f(e['target_accuracy'], '.4f')} "
            f"| {_f(b['best_lr'], 'g')}{'*' if b['best_lr_at_grid_edge'] else ''}"
            f" / {_f(f['best_lr'], 'g')}{'*' if f['best_lr_at_grid_edge'] else ''} "
            f"| {_f(b['epochs_to_target'], 'd')} / {_f(f['epochs_to_target'], 'd')} "
            f"| {_f(b['seconds_to_target'], '.1f')} / {_f(f['seconds_to_target'], '.1f')} "
            f"| {_f(b.get('seconds_to_target_steady'), '.1f')} / {_f(f.get('seconds_to_target_steady'), '.1f')} "
            f"| {_f(b['final_train_loss'], '.4f')} / {_f(f['final_train_loss'], '.4f')} "
            f"| {_f(b['best_accuracy'], '.4f')} / {_f(f['best_accuracy'], '.4f')} |"
        )
    summ = results["summary"]
    lines += [
        "",
        "\\* best rate at an edge of the grid: widen the grid before drawing conclusions.",
        "",
        f"FN reached the target in no more epochs and ended with no higher training loss for "
        f"{len(summ['fn_no_later_epochs_and_loss_no_higher'])} of {summ['optimizers']} optimizers "
        f"({', '.join(summ['fn_no_later_epochs_and_loss_no_higher']) or 'none'}); in no more seconds: "
        f"{len(summ['fn_no_later_seconds_and_loss_no_higher'])} "
        f"({', '.join(summ['fn_no_later_seconds_and_loss_no_higher']) or 'none'}).",
        "",
        "## Grid",
        "",
        "| optimizer | side | lr | best acc (epoch) | final loss | epochs→target |",
        "|---|---|---|---|---|---|",
    ]
    for opt, e in results["optimizers"].items():
        for side in ("baseline", "fn"):
            for g in e[side]["grid"]:
                acc = "diverged" if g["diverged_at_epoch"] else f"{_f(g['best_accuracy'], '.4f')} ({g['best_epoch']})"
                acc += " unstable" if g.get("unstable") else ""
                lines.append(f"| {opt} | {side} | {g['lr']:g} | {acc} | {_f(g['final_train_loss'], '.4f')} "
                             f"| {_f(g['epochs_to_target'], 'd')} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, final: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    from .export import atomic_path

    opts = list(results["optimizers"])
    fig, axes = plt.subplots(4, len(opts), figsize=(3.6 * len(opts) + 0.6, 11), squeeze=False)
    rows = [("epoch", "train_loss", "training loss (log)"), ("epoch", "test_accuracy", "test accuracy"),
            ("seconds", "train_loss", "training loss (log)"), ("seconds", "test_accuracy", "test accuracy")]
    for j, opt in enumerate(opts):
        e = results["optimizers"][opt]
        for i, (xk, yk, ylabel) in enumerate(rows):
            ax = axes[i][j]
            for side, style, color, label in (("baseline", "--", "tab:blue", "baseline"), ("fn", "-", "tab:red", "FN")):
                curve = e[side]["curve"]
                if curve:
                    ax.plot([r[xk] for r in curve], [r[yk] for r in curve], style, color=color, marker=".",
                            label=f"{label} (lr {e[side]['best_lr']:g})")
            if yk == "train_loss":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
                ax.tick_params(axis="y", which="minor", labelsize=7)
            elif e["target_accuracy"] is not None:
                ax.axhline(e["target_accuracy"], color="grey", lw=0.8, ls=":", label="target")
            ax.set_xlabel("epoch" if xk == "epoch" else "seconds (FN incl. SVD)")
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(opt.upper() if opt != "adagrad" else "AdaGrad")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    s = results["settings"]
    fig.suptitle(f"{s['model']} on {s['dataset']}, d = {s['factors']}: baseline (dashed blue) vs FN (solid red)")
    fig.tight_layout()
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
