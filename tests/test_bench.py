"""``fnconvert bench``: the protocol (target, curves, selection per side, shared initialisation) and a quick CLI run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from fnconvert.bench import (
    AUTO_GRID,
    BenchOptions,
    first_reaching,
    make_model,
    next_grid_rate,
    parse_lr_grid,
    parse_optimizers,
    run_bench,
    select_best,
    step_rate,
    summarize_optimizer,
    target_accuracy,
)
from fnconvert.errors import FnconvertError


def curve(accs, losses=None, dt=1.0, start=0.0):
    losses = losses or [1.0 / (i + 1) for i in range(len(accs))]
    return [{"epoch": i + 1, "train_loss": l, "test_accuracy": a, "seconds": start + dt * (i + 1)}
            for i, (a, l) in enumerate(zip(accs, losses))]


def run(lr, accs, losses=None, diverged=None, unstable=False, **kw):
    return {"lr": lr, "curve": curve(accs, losses, **kw), "diverged_at_epoch": diverged, "unstable": unstable}


# ------------------------------------------------------------------------------------------------ pure protocol


def test_target_is_baseline_best_accuracy_minus_one_point_and_float_safe():
    runs = [run(0.1, [0.50, 0.853, 0.84]), run(0.03, [0.40, 0.60, 0.70])]
    best = select_best(runs)
    assert best["lr"] == 0.1
    target = target_accuracy(best)
    assert target == pytest.approx(0.843, abs=1e-12)
    # 0.853 - 0.01 is 0.8430000000000001 in floats: an accuracy of exactly 0.843 (1686/2000) must still count.
    assert first_reaching(curve([0.80, 1686 / 2000, 0.9]), target) == (2, 2.0)


def test_epochs_to_target_is_the_first_epoch_at_or_above_target_read_from_the_curve():
    c = curve([0.3, 0.7, 0.65, 0.9], dt=2.5, start=4.0)
    assert first_reaching(c, 0.7) == (2, 9.0)  # first, not best; seconds are the curve's cumulative ones
    assert first_reaching(c, 0.95) == (None, None)
    assert first_reaching(c, None) == (None, None)


def test_selection_ties_prefer_lower_final_loss_and_skip_diverged_runs():
    a = run(0.3, [0.5, 0.8], [1.0, 0.6])
    b = run(0.1, [0.8, 0.7], [1.0, 0.4])  # same best accuracy, lower final loss
    c = run(1.0, [0.9], diverged=2)  # best accuracy but diverged: not eligible
    u = run(0.5, [0.95], [40.0], unstable=True)  # a lucky spike of a blown-up run: not eligible either
    assert select_best([a, b, c, u])["lr"] == 0.1
    assert select_best([c, u]) is None


def test_each_side_picks_its_own_rate_and_fn_is_read_against_the_baseline_target():
    runs = {
        "baseline": [run(0.1, [0.60, 0.80, 0.81]), run(0.03, [0.50, 0.70, 0.79])],
        "fn": [run(0.1, [0.40, 0.55, 0.60]), run(0.03, [0.78, 0.82, 0.83], [0.5, 0.3, 0.2])],
    }
    e = summarize_optimizer(runs, [0.1, 0.03], {"baseline": 0.0, "fn": 0.5})
    assert e["baseline"]["best_lr"] == 0.1 and e["fn"]["best_lr"] == 0.03
    assert e["target_accuracy"] == pytest.approx(0.80)
    assert e["baseline"]["epochs_to_target"] == 2 and e["fn"]["epochs_to_target"] == 2
    assert e["fn"]["final_train_loss"] == 0.2 and e["fn"]["best_accuracy"] == 0.83
    assert [g["lr"] for g in e["fn"]["grid"]] == [0.1, 0.03] and e["fn"]["grid"][0]["epochs_to_target"] is None
    assert e["comparison"]["fn_no_later_epochs"] is True
    # never reaching the target is null, and is "later" than any baseline epoch
    runs["fn"] = [run(0.1, [0.1, 0.2, 0.3])]
    e = summarize_optimizer(runs, [0.1, 0.03])
    assert e["fn"]["epochs_to_target"] is None and e["fn"]["seconds_to_target"] is None
    assert e["comparison"]["fn_no_later_epochs"] is False


def test_grid_is_extended_past_an_edge_where_either_side_is_best_for_both_sides():
    assert [step_rate(0.3, +1), step_rate(0.3, -1), step_rate(1e-3, -1), step_rate(3e-4, -1)] == [1.0, 0.1, 3e-4, 1e-4]
    runs = {"baseline": [run(0.1, [0.5]), run(0.03, [0.4])], "fn": [run(0.1, [0.3]), run(0.03, [0.4])]}
    assert next_grid_rate(runs, []) == 0.3  # the baseline is best at the top edge
    runs["baseline"][0] = run(0.1, [0.39])
    assert next_grid_rate(runs, []) == 0.01  # FN is best at the bottom edge
    runs["fn"][1] = run(0.03, [0.2], diverged=1)
    runs["fn"][0] = run(0.1, [0.2], diverged=1)
    assert next_grid_rate(runs, []) == 0.01  # every FN rate diverged: go lower
    runs = {"baseline": [run(0.1, [0.3]), run(0.03, [0.5]), run(0.01, [0.4])], "fn": [run(0.1, [0.3]),
            run(0.03, [0.5]), run(0.01, [0.4])]}
    assert next_grid_rate(runs, []) is None  # both optima inside the grid
    runs["fn"] = [run(0.1, [0.6]), run(0.03, [0.5]), run(0.01, [0.4])]
    assert next_grid_rate(runs, [0.1], max_extend=1) is None  # capped: 0.1 was itself an extension upwards


def test_parsing_of_grids_and_optimizers():
    assert parse_lr_grid("auto", ["sgd", "adam"]) == {"sgd": list(AUTO_GRID["sgd"]), "adam": list(AUTO_GRID["adam"])}
    assert parse_lr_grid("0.1,0.01", ["sgd", "nag"]) == {"sgd": [0.1, 0.01], "nag": [0.1, 0.01]}
    assert parse_lr_grid("sgd:0.1,0.03;adam:1e-3", ["adam", "sgd"]) == {"adam": [0.001], "sgd": [0.1, 0.03]}
    assert parse_optimizers("SGD, adam,sgd") == ["sgd", "adam"]
    for bad in ("0.1,x", "-0.1", "sgd:0.1"):
        with pytest.raises(FnconvertError, match="--lr-grid"):
            parse_lr_grid(bad, ["sgd", "adam"])
    with pytest.raises(FnconvertError, match="rmsprop"):
        parse_optimizers("sgd,rmsprop")


def test_models_accept_mnist_and_cifar_shapes_and_cnn_refuses_tiny_images():
    import torch

    for shape in ((1, 28, 28), (3, 32, 32)):
        for name in ("logreg", "mlp", "cnn"):
            assert make_model(name, shape, 10)(torch.zeros(2, *shape)).shape == (2, 10)
    with pytest.raises(FnconvertError, match="cnn needs images"):
        make_model("cnn", (1, 4, 4), 10)


# ------------------------------------------------------------------------------------------------ on real data


def test_baseline_and_fn_start_from_the_same_weights_with_the_papers_rates(mnist_small, tmp_path, monkeypatch):
    """Capture every run's model and parameter groups before training: FN's body equals the baseline's init."""
    import torch

    import fnconvert.bench as bench
    from fnconvert.finetune import adaptive_rates

    seen = []
    real = bench.train_run

    def spy(model, groups, optimizer, train, test, **kw):
        x = next(test.batches(64))[0]
        with torch.no_grad():
            seen.append({"state": copy.deepcopy(model.state_dict()), "lrs": [g["lr"] for g in groups],
                         "out": model(x).clone(), "fn": hasattr(model, "factor_heads")})
        return real(model, groups, optimizer, train, test, **kw)

    monkeypatch.setattr(bench, "train_run", spy)
    res = run_bench(BenchOptions(data=str(mnist_small), out=str(tmp_path / "o"), model="logreg", optimizers="sgd",
                                 factors=2, epochs=1, lr_grid="0.1,0.03", threads=1,
                                 extend_grid=False))
    assert [s["fn"] for s in seen] == [False, True, False, True]  # interleaved: baseline, FN per rate
    sv = res["settings"]["singular_values"]
    for base, fn in zip(seen[0::2], seen[1::2]):
        body = {k[len("body."):]: v for k, v in fn["state"].items() if k.startswith("body.")}
        assert body.keys() == base["state"].keys()
        for k in body:
            assert torch.equal(body[k], base["state"][k]), k
        alpha = base["lrs"][0]
        rates = adaptive_rates(sv, alpha)
        assert fn["lrs"] == pytest.approx(rates["factor"] + [rates["residual"]])
        # for logistic regression the calibrated head makes the FN model the same function at the start
        torch.testing.assert_close(fn["out"], base["out"], atol=2e-4, rtol=1e-4)
    assert torch.equal(seen[0]["state"]["1.weight"], seen[2]["state"]["1.weight"])  # one init for every rate


def test_quick_cli_run_on_real_cifar_writes_results(cifar_npz, tmp_path):
    from typer.testing import CliRunner

    from fnconvert_cli.main import app

    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench", "--data", str(cifar_npz), "--model", "logreg", "--factors", "1",
                                 "--epochs", "2", "--quick", "--threads", "1", "--out", str(out), "--json",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.json", "results.md"]
    res = json.loads((out / "results.json").read_text())
    assert json.loads(r.stdout) == res
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sgd |" in (out / "results.md").read_text()
    s = res["settings"]
    assert s["quick"] and s["train_samples"] == 2000 and s["test_samples"] == 500 and s["epochs"] == 2
    assert set(res["optimizers"]) == {"sgd", "nag", "adagrad", "adam"}
    for opt, e in res["optimizers"].items():
        assert set(e) >= {"target_accuracy", "baseline", "fn"}
        assert e["target_accuracy"] == pytest.approx(e["baseline"]["best_accuracy"] - 0.01)
        for side in ("baseline", "fn"):
            d = e[side]
            assert set(d) >= {"best_lr", "epochs_to_target", "seconds_to_target", "final_train_loss",
                              "best_accuracy", "curve", "grid"}
            assert [g["lr"] for g in d["grid"]] == e["lr_grid"] and len(e["lr_grid"]) == 2
            best = select_best(d["grid"])  # None when every rate diverged or blew up (possible in 2 quick epochs)
            assert d["best_lr"] == (best["lr"] if best else None)
            assert [set(row) for row in d["curve"]] == [{"epoch", "train_loss", "test_accuracy", "seconds"}] * 2
            assert (d["epochs_to_target"], d["seconds_to_target"]) == first_reaching(d["curve"], e["target_accuracy"])
            assert np.all(np.diff([row["seconds"] for row in d["curve"]]) > 0)
        assert e["fn"]["curve"][0]["seconds"] > s["fn_setup_seconds"]["factors"]  # SVD time counted for FN

    # a non-empty --out is refused (one line, exit 1) unless --force
    r = CliRunner().invoke(app, ["bench", "--data", str(cifar_npz), "--quick", "--out", str(out)])
    assert r.exit_code == 1 and "not empty" in r.output and "--force" in r.output


def test_invalid_input_is_refused_before_out_is_created(mnist_npz, tmp_path):
    from typer.testing import CliRunner

    from fnconvert_cli.main import app

    out = tmp_path / "never"
    for args, needle in ((["--optimizers", "sgd,rmsprop"], "rmsprop"), (["--model", "resnet"], "resnet"),
                         (["--lr-grid", "0.1,abc"], "--lr-grid"), (["--epochs", "0"], "--epochs"),
                         (["--method", "svd"], "--method"),
                         (["--factors", "784"], "--factors")):
        r = CliRunner().invoke(app, ["bench", "--data", str(mnist_npz), "--out", str(out), *args])
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith("error: ") and needle in r.output and "Traceback" not in r.output
        assert not out.exists(), args
