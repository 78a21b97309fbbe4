"""fnconvert.finetune: the paper's rates as real parameter groups, optimizers, schedules, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import logreg, numpy_factors
from fnconvert.data import load_data
from fnconvert.errors import FnconvertError
from fnconvert.finetune import (TrainConfig, adaptive_rates, finetune, latest_checkpoint, make_optimizer,
                                make_scheduler, param_groups)
from fnconvert.log import Log
from fnconvert.surgery import FNModel, build_fn_model

SV = np.array([5.0, 2.0, 1.0])  # λ1, λ2, λ3 for d = 2


def _fn(d: int = 2, p: int = 12, k: int = 4):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(p, 8), nn.ReLU(), nn.Linear(8, k))
    rng = np.random.default_rng(0)
    V = np.linalg.qr(rng.normal(size=(p, d)))[0]
    return FNModel(body, rng.normal(size=p), V, V.T, rng.normal(size=(d, k)))


# ------------------------------------------------------------------------------------------------ groups and rates


def test_param_groups_have_the_exact_paper_rates():
    fn = _fn(d=2)
    alpha = 0.1
    groups = param_groups(fn, SV, alpha)
    assert [g["name"] for g in groups] == ["factor1", "factor2", "residual"]
    # α_j = α·λ1²/λj², α_ε = α·λ1²/λ_{d+1}²
    assert groups[0]["lr"] == pytest.approx(alpha * 25 / 25, rel=1e-15)
    assert groups[1]["lr"] == pytest.approx(alpha * 25 / 4, rel=1e-15)
    assert groups[2]["lr"] == pytest.approx(alpha * 25 / 1, rel=1e-15)
    assert groups[0]["params"] == [fn.factor_heads[0]] and groups[1]["params"] == [fn.factor_heads[1]]
    # every trainable parameter in exactly one group; the residual group is the whole original model
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in fn.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in fn.body.parameters()}
    rates = adaptive_rates(SV, alpha)
    assert rates == {"factor": [groups[0]["lr"], groups[1]["lr"]], "residual": groups[2]["lr"]}
    with pytest.raises(FnconvertError, match="2 factor heads but 1 rates"):
        param_groups(fn, SV[:2], alpha)


def test_frozen_parameters_are_left_out():
    fn = _fn(d=2)
    fn.body[1].weight.requires_grad_(False)
    groups = param_groups(fn, SV, 0.1)
    assert all(p is not fn.body[1].weight for g in groups for p in g["params"])


@pytest.mark.parametrize("name, cls, extra", [
    ("sgd", torch.optim.SGD, {"momentum": 0, "nesterov": False}),
    ("nag", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adagrad", torch.optim.Adagrad, {}),
    ("adam", torch.optim.Adam, {}),
])
def test_optimizers_keep_the_group_rates(name, cls, extra):
    fn = _fn()
    opt = make_optimizer(name, param_groups(fn, SV, 0.01))
    assert type(opt) is cls
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.0625, 0.25], rel=1e-15)
    for k, v in extra.items():
        assert all(g[k] == v for g in opt.param_groups)
    with pytest.raises(FnconvertError, match="rmsprop"):
        make_optimizer("rmsprop", param_groups(fn, SV, 0.01))


def test_one_sgd_step_moves_each_group_by_its_own_rate():
    fn = _fn()
    opt = make_optimizer("sgd", param_groups(fn, SV, 0.01))
    before = {n: p.detach().clone() for n, p in fn.named_parameters()}
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    loss = nn.functional.cross_entropy(fn(x), torch.arange(16) % 4)
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in fn.named_parameters()}
    opt.step()
    lr_of = {"factor_heads.0": 0.01, "factor_heads.1": 0.0625}
    for n, p in fn.named_parameters():
        lr = lr_of.get(n, 0.25)
        np.testing.assert_allclose((before[n] - p.detach()).numpy(), (lr * grads[n]).numpy(), atol=1e-7)


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule, factor", [
    ("inv-sqrt", lambda t, T: 1 / math.sqrt(t)),
    ("constant", lambda t, T: 1.0),
    ("cosine", lambda t, T: 0.5 * (1 + math.cos(math.pi * (t - 1) / T))),
])
def test_schedule_values_per_epoch(schedule, factor):
    fn = _fn()
    opt = make_optimizer("sgd", param_groups(fn, SV, 0.01))
    base = [g["lr"] for g in opt.param_groups]
    sched = make_scheduler(opt, schedule, epochs=5)
    for t in range(1, 6):  # epoch t (1-based) trains at base · factor(t)
        np.testing.assert_allclose([g["lr"] for g in opt.param_groups], [b * factor(t, 5) for b in base], rtol=1e-12)
        opt.step()
        sched.step()


def test_train_config_validation():
    assert TrainConfig(optimizer="adam").alpha == 1e-4 and TrainConfig(lr=0.5).alpha == 0.5
    for bad, needle in [(dict(optimizer="lbfgs"), "--optimizer"), (dict(schedule="step"), "--schedule"),
                        (dict(epochs=-1), "--epochs -1"), (dict(batch_size=0), "--batch-size 0"),
                        (dict(lr=-1.0), "--lr -1.0"), (dict(lr=float("inf")), "--lr inf")]:
        with pytest.raises(FnconvertError, match=needle):
            TrainConfig(**bad).validate()


# ------------------------------------------------------------------------------------------------ training loop


@pytest.fixture(scope="module")
def mnist_ds(mnist_small):
    return load_data(mnist_small)


@pytest.fixture(scope="module")
def mnist_factors(mnist_ds):
    """float64 numpy factors (d = 1) of the training inputs."""
    return numpy_factors(np.concatenate([b.numpy() for b in mnist_ds.train.flat_batches(500)]), 1)


def _mnist_fn(ds, f):
    """A logistic regression on MNIST in FN form."""
    torch.manual_seed(0)
    model = logreg(784).eval()
    fn, _ = build_fn_model(model, f, [x for x, _ in ds.train.batches(500)], next(ds.train.batches(2))[0])
    return fn, f.singular_values


class _Interrupt(Exception):
    pass


class _KillAt(Log):
    """A log that raises when epoch ``k`` starts: the run stops right after epoch k−1's checkpoint."""

    def __init__(self, k):
        super().__init__(quiet=True)
        self.k = k

    def progress(self, total, description):
        if description.startswith(f"epoch {self.k}/"):
            raise _Interrupt(description)
        return super().progress(total, description)


def test_checkpoints_and_resume_equal_an_uninterrupted_run(mnist_ds, mnist_factors, tmp_path):
    cfg = TrainConfig(epochs=3, optimizer="nag", lr=0.01, batch_size=100, seed=5)
    fn_a, sv = _mnist_fn(mnist_ds, mnist_factors)
    hist_a = finetune(fn_a, mnist_ds, cfg, sv, checkpoint_dir=tmp_path / "a", run_hash="h1")
    assert [r["epoch"] for r in hist_a] == [1, 2, 3]
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]  # no temporary files left behind
    assert latest_checkpoint(tmp_path / "a")[0] == 3
    state = torch.load(tmp_path / "a" / "epoch-2.pt", weights_only=True)  # loadable as plain data
    assert state["epoch"] == 2 and state["config_hash"] == "h1" and len(state["history"]) == 2
    # the optimizer state in the checkpoint has the inv-sqrt rates of the next epoch (3): base / √3
    base = adaptive_rates(sv, 0.01)
    np.testing.assert_allclose([g["lr"] for g in state["optimizer"]["param_groups"]],
                               np.array(base["factor"] + [base["residual"]]) / math.sqrt(3), rtol=1e-12)
    assert hist_a[-1]["test_accuracy"] > 0.5  # logistic regression on MNIST keeps learning

    fn_b, _ = _mnist_fn(mnist_ds, mnist_factors)
    with pytest.raises(_Interrupt):
        finetune(fn_b, mnist_ds, cfg, sv, checkpoint_dir=tmp_path / "b", run_hash="h1", log=_KillAt(2))
    assert sorted(f.name for f in (tmp_path / "b").iterdir()) == ["epoch-1.pt"]
    fn_c, _ = _mnist_fn(mnist_ds, mnist_factors)  # a fresh process would rebuild the model the same way
    hist_c = finetune(fn_c, mnist_ds, cfg, sv, checkpoint_dir=tmp_path / "b", run_hash="h1", resume=True)
    assert [r["epoch"] for r in hist_c] == [1, 2, 3]
    np.testing.assert_allclose([r["train_loss"] for r in hist_c], [r["train_loss"] for r in hist_a], atol=1e-6,
                               rtol=0)
    assert [r["test_accuracy"] for r in hist_c] == [r["test_accuracy"] for r in hist_a]
    for (n, p), (_, q) in zip(fn_a.state_dict().items(), fn_c.state_dict().items()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-6, err_msg=n)

    with pytest.raises(FnconvertError, match="another configuration"):
        finetune(_mnist_fn(mnist_ds, mnist_factors)[0], mnist_ds, cfg, sv, checkpoint_dir=tmp_path / "b", run_hash="h2",
                 resume=True)


def test_losses_are_reproducible_and_optimizers_train(mnist_ds, mnist_factors):
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, batch_size=200, seed=1)
    fn1, sv = _mnist_fn(mnist_ds, mnist_factors)
    fn2, _ = _mnist_fn(mnist_ds, mnist_factors)
    h1 = finetune(fn1, mnist_ds, cfg, sv)
    h2 = finetune(fn2, mnist_ds, cfg, sv)
    assert h1[0]["train_loss"] == h2[0]["train_loss"]
    # the reported loss is the sample-weighted mean cross-entropy over the epoch: recompute epoch 1 by hand
    fn3, _ = _mnist_fn(mnist_ds, mnist_factors)
    opt = make_optimizer("adam", param_groups(fn3, sv, 1e-3))
    total = 0.0
    fn3.train()
    for x, y in mnist_ds.train.batches(200, shuffle_seed=1 * 100_003 + 0):
        loss = nn.functional.cross_entropy(fn3(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
    assert h1[0]["train_loss"] == pytest.approx(total / len(mnist_ds.train), abs=1e-6)


def test_non_finite_loss_stops_with_a_clear_message(mnist_ds, mnist_factors, tmp_path):
    fn, sv = _mnist_fn(mnist_ds, mnist_factors)
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=1e38, batch_size=100)
    with pytest.raises(FnconvertError, match=r"loss became .* in epoch 1, batch \d+; lower --lr"):
        finetune(fn, mnist_ds, cfg, sv, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
