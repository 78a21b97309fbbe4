"""The command line: bad input ends in one clear ``error:`` line naming the value and the fix, a non-zero exit, no
traceback and no --out folder. Most cases run in-process through Typer's CliRunner; a few run as a real process
without a TTY to check exit codes and that stderr holds no ANSI escape codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import assert_one_line_error, deny_reading, run_cli
from fnconvert_cli.main import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_refused(result, out, *needles, code=1):
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output!r} {result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    line = assert_one_line_error(result.stderr, *needles)
    assert not out.exists(), f"{out} was created for a refused run"
    return line


@pytest.fixture(scope="module")
def bad(tmp_path_factory, cifar_tiny, cifar_cnn):
    """Bad inputs built on disk once: each is a real file of the kind a user could pass."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("this is not a model\n" * 20)
    torch.save(cifar_cnn, d / "whole_module.pt")  # a pickled nn.Module
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "r18_state.pth")
    with np.load(cifar_tiny) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(d / "no_test_keys.npz", x_train=arrays["x_train"], y_train=arrays["y_train"])
    y = arrays["y_train"].copy()
    y[7] = 10  # a tenth class for a ten-class model
    np.savez(d / "label10.npz", **{**arrays, "y_train": y})
    xf = (arrays["x_train"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    xf[13, 1, 4, 4] = np.inf
    np.savez(d / "inf.npz", x_train=xf, y_train=arrays["y_train"],
             x_test=(arrays["x_test"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32), y_test=arrays["y_test"])
    x3 = np.concatenate([arrays["x_train"][i % 3 : i % 3 + 1] for i in range(60)])  # centred rank 2
    np.savez(d / "rank2.npz", x_train=x3, y_train=np.arange(60) % 10, x_test=arrays["x_test"],
             y_test=arrays["y_test"])
    return d


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("case", [
    "missing_model", "unknown_format", "torchscript_untrusted", "pickled_module_untrusted", "state_dict_no_arch",
    "state_dict_wrong_arch", "missing_keys", "label_out_of_range", "shape_mismatch", "d_above_p", "d_at_rank",
    "too_few_samples", "non_finite", "bad_factors", "bad_opset", "bad_optimizer",
])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path, bad, cnn_ts, cnn_pt2, cifar_tiny, mnist_small):
    out = tmp_path / "OUT"
    data = cifar_tiny
    model, extra = cnn_pt2, []
    needles: tuple = ()
    if case == "missing_model":
        model, needles = tmp_path / "nope.pt", ("nope.pt", "does not exist", "check the path")
    elif case == "unknown_format":
        model, needles = bad / "notes.txt", ("notes.txt", "unknown format")
    elif case == "torchscript_untrusted":
        model, needles = cnn_ts, ("cnn.pt", "TorchScript", "--trust-model-code")
    elif case == "pickled_module_untrusted":
        model, needles = bad / "whole_module.pt", ("whole_module.pt", "nn.Module", "--trust-model-code")
    elif case == "state_dict_no_arch":
        model, needles = bad / "r18_state.pth", ("r18_state.pth", "--arch NAME")
    elif case == "state_dict_wrong_arch":
        model, extra, needles = bad / "r18_state.pth", ["--arch", "resnet34"], ("--arch resnet34", "does not match")
    elif case == "missing_keys":
        data, needles = bad / "no_test_keys.npz", ("no_test_keys.npz", "x_test", "y_test")
    elif case == "label_out_of_range":
        data, needles = bad / "label10.npz", ("label 10", "sample 7", "10 outputs")
    elif case == "shape_mismatch":
        data, needles = mnist_small, ("rejects inputs of shape (2, 1, 28, 28)", "shape the model was trained on")
    elif case == "d_above_p":
        extra, needles = ["--factors", "4000"], ("d=4000", "p=3072", "--factors")
    elif case == "d_at_rank":
        data, extra, needles = bad / "rank2.npz", ["--factors", "2"], ("d=2", "rank 2", "--factors")
    elif case == "too_few_samples":
        extra, needles = ["--calib-samples", "2"], ("2 samples", "d=1")
    elif case == "non_finite":
        data, needles = bad / "inf.npz", ("inf.npz", "sample 13", "NaN or Inf")
    elif case == "bad_factors":
        extra, needles = ["--factors", "0"], ("--factors 0",)
    elif case == "bad_opset":
        extra, needles = ["--opset", "5"], ("--opset 5",)
    elif case == "bad_optimizer":
        extra, needles = ["--optimizer", "rmsprop"], ("--optimizer 'rmsprop'", "adam")
    result = _invoke("transform", model, "--data", data, "--out", out, "--no-finetune", *extra)
    _assert_refused(result, out, *needles)


def test_unreadable_model_file(tmp_path, cifar_tiny, cnn_pt2, monkeypatch):
    locked = tmp_path / "locked.pt2"
    locked.write_bytes(cnn_pt2.read_bytes())
    deny_reading(monkeypatch, locked)
    out = tmp_path / "OUT"
    result = _invoke("transform", locked, "--data", cifar_tiny, "--out", out)
    _assert_refused(result, out, "locked.pt2", "cannot be read", "permissions")


def test_non_empty_out_is_refused_and_left_alone(tmp_path, cifar_tiny, cnn_pt2):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke("transform", cnn_pt2, "--data", cifar_tiny, "--out", out)
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, str(out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_config_file_keys_and_flag_precedence(tmp_path, cifar_tiny):
    cfg = tmp_path / "fn.toml"
    cfg.write_text(f'data = "{cifar_tiny}"\nepochs = 5\noptimizer = "nag"\n')
    saved = tmp_path / "saved.toml"
    out = tmp_path / "OUT"
    # the model is missing, so the run stops after the configuration is merged and saved
    result = _invoke("transform", tmp_path / "missing.pt2", "--config", cfg, "--epochs", 2, "--out", out,
                     "--save-config", saved)
    _assert_refused(result, out, "missing.pt2", "does not exist")
    import tomllib

    values = tomllib.loads(saved.read_text())
    assert values["data"] == str(cifar_tiny) and values["optimizer"] == "nag"
    assert values["epochs"] == 2  # the flag wins over the file
    (tmp_path / "typo.toml").write_text("epoch = 3\n")
    result = _invoke("transform", tmp_path / "missing.pt2", "--config", tmp_path / "typo.toml", "--out", out)
    _assert_refused(result, out, "unknown key(s) epoch", "epochs")


def test_missing_data_is_a_usage_error(tmp_path, cnn_pt2):
    out = tmp_path / "OUT"
    result = _invoke("transform", cnn_pt2, "--out", out)
    _assert_refused(result, out, "--data is required", code=2)


# ------------------------------------------------------------------------------------------------ real processes


@pytest.mark.parametrize("args, needles, code", [
    (["transform", "{tmp}/absent.pt", "--data", "{data}", "--out", "{tmp}/OUT"], ("absent.pt", "does not exist"), 1),
    (["transform", "{ts}", "--data", "{data}", "--out", "{tmp}/OUT"], ("TorchScript", "--trust-model-code"), 1),
    (["transform", "{ts}", "--data", "{mnist}", "--out", "{tmp}/OUT", "--trust-model-code"],
     ("(2, 1, 28, 28)", "3 channels"), 1),
    (["transform", "{pt2}", "--out", "{tmp}/OUT"], ("--data is required",), 2),
])
def test_subprocess_exit_codes_and_plain_stderr(tmp_path, cnn_ts, cnn_pt2, cifar_tiny, mnist_small, args, needles,
                                                code):
    fill = dict(tmp=tmp_path, ts=cnn_ts, pt2=cnn_pt2, data=cifar_tiny, mnist=mnist_small)
    proc = run_cli(*[a.format(**fill) for a in args])
    assert proc.returncode == code, proc.stderr
    line = assert_one_line_error(proc.stderr, *needles)
    assert proc.stderr.rstrip("\n").splitlines()[-1] == line  # the run ends in the error line
    assert proc.stdout == ""
    assert not (tmp_path / "OUT").exists()


def test_version_and_help_without_a_tty():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("fnconvert ")
    proc = run_cli("transform", "--help")
    assert proc.returncode == 0 and "--trust-model-code" in proc.stdout and "\x1b[" not in proc.stdout


def test_factors_command_writes_what_numpy_computes(tmp_path, mnist_small):
    """``fnconvert factors`` on MNIST (p = 784): V and λ against float64 numpy."""
    from safetensors.numpy import load_file

    from conftest import numpy_factors, to_nchw01

    out = tmp_path / "f.safetensors"
    result = _invoke("factors", mnist_small, "--out", out, "--factors", 2, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with np.load(mnist_small) as z:
        ref = numpy_factors(to_nchw01(z["x_train"]), 2)
    got = load_file(str(out))
    np.testing.assert_allclose(got["mean"], ref.mean, atol=1e-7)
    np.testing.assert_allclose(got["singular_values"], ref.singular_values, rtol=1e-6)
    np.testing.assert_allclose(summary["singular_values"], ref.singular_values, rtol=1e-6)
    for j in range(2):
        assert abs(got["V"][:, j] @ ref.V[:, j]) >= 1 - 1e-8
