"""Adaptive learning: the paper's rates as real optimizer parameter groups, the training loop, checkpoints, resume.

Factor j learns at α_j = α·λ1²/λ_j²; everything else (the whole original model) at α_ε = α·λ1²/λ_{d+1}².
These are separate parameter groups, not gradient scaling: Adam and Adagrad normalise every coordinate and would
undo a scaled gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FnconvertError
from .log import NULL_LOG, Log

OPTIMIZERS = ("sgd", "nag", "adagrad", "adam")
SCHEDULES = ("constant", "inv-sqrt", "cosine")
#: Defaults for fine-tuning an already *trained* model, small enough not to wreck it under the residual multiplier.
#: Measured on the bundled sample CNN (samples/cnn_cifar10.pt2):
#:   fnconvert transform samples/cnn_cifar10.pt2 --data samples/cifar10-sample.npz --epochs 1 --optimizer sgd --lr 0.01
#:   → epoch train loss 3.28, test accuracy 0.493 → 0.293 (the residual rate 0.026 is too high for a trained net);
#:   ... --data ../shared/data/cifar10-dev.npz --calib-samples 2000 --epochs 2 --optimizer adam --lr 1e-4 → 0.5145 → 0.5385,
#:   the same with --optimizer sgd --lr 1e-3 → 0.5145 → 0.5360.
DEFAULT_LR = {"sgd": 1e-3, "nag": 1e-3, "adagrad": 1e-3, "adam": 1e-4}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    optimizer: str = "adam"
    lr: float | None = None  # α; None picks DEFAULT_LR[optimizer]
    schedule: str = "inv-sqrt"
    batch_size: int = 128
    seed: int = 0

    @property
    def alpha(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def validate(self) -> "TrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise FnconvertError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise FnconvertError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.epochs < 0:
            raise FnconvertError(f"--epochs {self.epochs} must be ≥ 0 (0 or --no-finetune: surgery only)")
        if self.batch_size < 1:
            raise FnconvertError(f"--batch-size {self.batch_size} must be ≥ 1")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise FnconvertError(f"--lr {self.lr} must be a positive finite number")
        return self


def adaptive_rates(singular_values, alpha: float) -> dict:
    """{"factor": [α·λ1²/λj² for j ≤ d], "residual": α·λ1²/λ_{d+1}²} from λ1..λ_{d+1}."""
    s = np.asarray(singular_values, dtype=np.float64)
    mult = (s[0] / s) ** 2
    return {"factor": [float(alpha * m) for m in mult[:-1]], "residual": float(alpha * mult[-1])}


def param_groups(fn: nn.Module, singular_values, alpha: float) -> list[dict]:
    """One group per factor row of C at α_j, one group for every other trainable parameter at α_ε."""
    rates = adaptive_rates(singular_values, alpha)
    heads = list(fn.factor_heads)
    if len(heads) != len(rates["factor"]):
        raise FnconvertError(f"the FN model has {len(heads)} factor heads but {len(rates['factor'])} rates")
    head_ids = {id(p) for p in heads}
    rest = [p for p in fn.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": [p], "lr": lr, "name": f"factor{j + 1}"} for j, (p, lr) in enumerate(zip(heads, rates["factor"]))]
    groups.append({"params": rest, "lr": rates["residual"], "name": "residual"})
    return groups


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups)
    if name == "nag":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    if name == "adagrad":
        return torch.optim.Adagrad(groups)
    if name == "adam":
        return torch.optim.Adam(groups)
    raise FnconvertError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int):
    """Stepped once per epoch. inv-sqrt is the paper's 1/√t decay with t the epoch (1-based)."""
    if schedule == "constant":
        f = lambda e: 1.0  # noqa: E731
    elif schedule == "inv-sqrt":
        f = lambda e: 1.0 / math.sqrt(e + 1)  # noqa: E731
    else:
        f = lambda e: 0.5 * (1 + math.cos(math.pi * e / max(epochs, 1)))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def loss_for(out: torch.Tensor, y: torch.Tensor, tail: str) -> torch.Tensor:
    """Cross-entropy on logits; NLL on log-probabilities; NLL on log(p) for a softmax output."""
    if tail == "log_softmax":
        return nn.functional.nll_loss(out, y)
    if tail == "softmax":
        return nn.functional.nll_loss(torch.log(out.clamp_min(1e-38)), y)
    return nn.functional.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 256, device: str = "cpu", indices=None) -> float:
    """Top-1 accuracy on a data split (model put in eval mode, restored afterwards).

    Under torchrun each rank passes its shard as ``indices``; the counts are all-reduced, so every rank returns
    the accuracy on the whole split.
    """
    from .distributed import all_reduce_sum_

    was = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in split.batches(batch_size, indices):
        pred = model(x.to(device)).argmax(dim=1)
        counts[0] += (pred == y.to(device)).sum()
        counts[1] += len(y)
    model.train(was)
    correct, total = all_reduce_sum_(counts).tolist()
    return correct / max(total, 1)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    best = None
    if ckpt_dir.is_dir():
        for f in ckpt_dir.iterdir():
            m = re.fullmatch(r"epoch-(\d+)\.pt", f.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), f)
    return best


def finetune(
    fn: nn.Module,
    data,
    cfg: TrainConfig,
    singular_values,
    *,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    run_hash: str = "",
    resume: bool = False,
    log: Log = NULL_LOG,
    dist_ctx=None,
) -> list[dict]:
    """Train ``fn`` on ``data.train`` with the adaptive groups; evaluate on ``data.test`` each epoch.

    Returns one dict per epoch: {epoch, train_loss, test_accuracy, seconds}. After each epoch a checkpoint
    ``checkpoint_dir/epoch-K.pt`` is written atomically (model, optimizer, scheduler, RNG state, history).
    """
    from .distributed import DistContext, all_reduce_sum_

    cfg.validate()
    ctx = dist_ctx or DistContext()
    fn.to(device)
    # Groups are built on the FN module's own parameters; DDP shares those tensors, so the rates stay intact.
    opt = make_optimizer(cfg.optimizer, param_groups(fn, singular_values, cfg.alpha))
    model = fn
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(fn, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs)
    history: list[dict] = []
    start = 0
    if resume and checkpoint_dir is not None:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            k, path = found
            state = torch.load(path, map_location="cpu", weights_only=True)  # RNG state must stay on the CPU
            if state.get("config_hash") != run_hash:
                raise FnconvertError(
                    f"checkpoint {path} was written under another configuration (hash {state.get('config_hash')} "
                    f"≠ {run_hash}); rerun with the same options, or drop --resume and use --force"
                )
            fn.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            history = list(state["history"])
            start = k
            log.info(f"resuming after epoch {k} from {path}")
    tail = getattr(fn, "tail", "none")
    n_batches = -(-(len(data.train) // ctx.world_size) // cfg.batch_size)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        fn.train()
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        # One permutation per epoch, the same on every rank; each rank then trains on its (equal-sized) shard.
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = ctx.shard(torch.randperm(len(data.train), generator=g).numpy(), equal=True)
        with log.progress(n_batches, f"epoch {epoch + 1}/{cfg.epochs}") as advance:
            for b, (x, y) in enumerate(data.train.batches(cfg.batch_size, order)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = loss_for(model(x), y, tail)
                if not torch.isfinite(loss):
                    raise FnconvertError(
                        f"the training loss became {float(loss)} in epoch {epoch + 1}, batch {b + 1}; lower --lr "
                        f"(now {cfg.alpha}) or pick another --optimizer. The last good checkpoint is kept"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double() * len(y)  # no .item() per batch: no device sync on the hot path
                count += len(y)
                advance()
        sched.step()
        seconds = time.perf_counter() - t0
        acc = evaluate(fn, data.test, device=device, indices=ctx.shard(np.arange(len(data.test))))
        sums = all_reduce_sum_(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)]))
        row = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[1].clamp_min(1)), "test_accuracy": acc,
               "seconds": round(seconds, 3)}
        history.append(row)
        log.info(f"epoch {epoch + 1}/{cfg.epochs}: train_loss {row['train_loss']:.4f}  "
                 f"test_accuracy {acc:.4f}  ({seconds:.1f}s)")
        if checkpoint_dir is not None and ctx.is_main:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save({"model": fn.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history,
                          "config_hash": run_hash}, checkpoint_dir / f"epoch-{epoch + 1}.pt")
    return history


def train_config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["lr"] = cfg.alpha
    return d
