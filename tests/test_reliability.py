"""Reliability (issue 6): hostile files run no code, damaged files give the documented error, a killed run resumes to
the same numbers, and the same seed gives the same bytes."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import ROOT, assert_one_line_error, run_cli, to_nchw01
from fnconvert.errors import FnconvertError
from fnconvert.models import load_model
from fnconvert_cli.main import app


class Sentinel:
    """Unpickling this object runs ``touch PATH``: a stand-in for any code a hostile file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Hostile model files, each of which creates ``sentinels/NAME`` if anything unpickles or evaluates it."""
    d = tmp_path_factory.mktemp("hostile")
    s = d / "sentinels"
    s.mkdir()
    files = {}
    files["state_dict_zip.pt"] = _torch_bytes({"fc.weight": torch.zeros(2, 2), "x": Sentinel(s / "state_dict_zip")})
    files["legacy_torch.pt"] = None
    torch.save({"w": Sentinel(s / "legacy_torch")}, d / "legacy_torch.pt", _use_new_zipfile_serialization=False)
    files["raw_pickle_p2.pkl"] = pickle.dumps(Sentinel(s / "raw_pickle_p2"), protocol=2)
    files["raw_pickle_p5.bin"] = pickle.dumps(Sentinel(s / "raw_pickle_p5"), protocol=5)
    for name, data in files.items():
        if data is not None:
            (d / name).write_bytes(data)

    # torch.export programs: torch.export.load unpickles payloads marked use_pickle, falls back to
    # weights_only=False for sample inputs, sympify()s shape expressions and execs guard code.
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    ep = torch.export.export(m, (torch.zeros(2, 12),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    base = d / "base.pt2"
    torch.export.save(ep, str(base))

    def weights(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            cfg["config"]["1.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith(f"weights/{_weight_file(base, '1.weight')}"):
            return _torch_bytes(Sentinel(s / "pt2_pickled_weight"))
        return data

    def sample(name, data):
        return _torch_bytes(Sentinel(s / "pt2_sample_inputs")) if name.endswith("sample_inputs/model.pt") else data

    def expr(name, data):
        if name.endswith("models/model.json"):
            return data.decode().replace(
                "Symbol('s", f"__import__('os').system('touch {s / 'pt2_sympy'}') + Symbol('s", 1).encode()
        return data

    def guard(name, data):
        if name.endswith("models/model.json"):
            j = json.loads(data)
            j["guards_code"] = [f"__import__('os').system('touch {s / 'pt2_guard'}') == 0"]
            return json.dumps(j).encode()
        return data

    for name, edit in [("pt2_pickled_weight", weights), ("pt2_sample_inputs", sample), ("pt2_sympy", expr),
                       ("pt2_guard", guard)]:
        _rewrite_zip(base, d / f"{name}.pt2", edit)
    names = ["state_dict_zip.pt", "legacy_torch.pt", "raw_pickle_p2.pkl", "raw_pickle_p5.bin", "pt2_pickled_weight.pt2",
             "pt2_sample_inputs.pt2", "pt2_sympy.pt2", "pt2_guard.pt2"]
    return d, s, names


def _weight_file(pt2: Path, fqn: str) -> str:
    with zipfile.ZipFile(pt2) as z:
        cfg = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        return json.loads(z.read(cfg))["config"][fqn]["path_name"]


_LOAD_ALL = """
import json, sys
from fnconvert.errors import FnconvertError
from fnconvert.models import load_model
out = {}
for path in sys.argv[1:]:
    try:
        load_model(path)
        out[path] = "loaded"
    except FnconvertError as e:
        out[path] = "error: " + str(e)
print(json.dumps(out))
"""

_UNSAFE_CONTROL = """
import pickle, sys, torch
for path in sys.argv[1:]:
    try:
        if path.endswith(".pt2"):
            torch.export.load(path).module()(torch.zeros(2, 12))  # guard code runs on the first call
        elif path.endswith((".pkl", ".bin")):
            pickle.load(open(path, "rb"))
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass
"""


@pytest.mark.parametrize("env", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}], ids=["default", "force_no_wo"])
def test_hostile_files_run_no_code(hostile, env, tmp_path):
    d, sentinels, names = hostile
    for f in sentinels.iterdir():
        f.unlink()
    full_env = {**os.environ, **env}
    paths = [str(d / n) for n in names]
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALL, *paths], capture_output=True, text=True, env=full_env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    created = sorted(f.name for f in sentinels.iterdir())
    assert created == [], f"code ran while loading: {created}"
    for path, res in results.items():
        assert res.startswith("error: ") and ("--trust-model-code" in res or "corrupt" in res), (path, res)
    if not env:
        return
    # the CLI, end to end, with the environment override
    out = tmp_path / "OUT"
    data = tmp_path / "d.npz"
    np.savez(data, x_train=np.zeros((4, 3, 4), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((2, 3, 4), np.uint8), y_test=np.zeros(2, np.int64))
    for name in ("state_dict_zip.pt", "pt2_sample_inputs.pt2"):
        cli = run_cli("transform", str(d / name), "--data", str(data), "--out", str(out), env=env)
        assert cli.returncode == 1
        assert_one_line_error(cli.stderr, name, "--trust-model-code")
        assert not out.exists() and sorted(f.name for f in sentinels.iterdir()) == []


def test_hostile_files_are_real_exploits(hostile):
    """Control: loaded the unsafe way, every hostile file does run its code (so the test above means something)."""
    d, sentinels, names = hostile
    for f in sentinels.iterdir():
        f.unlink()
    subprocess.run([sys.executable, "-c", _UNSAFE_CONTROL, *[str(d / n) for n in names]], capture_output=True,
                   timeout=300)
    want = sorted(n.split(".")[0] for n in names)
    assert sorted(f.name for f in sentinels.iterdir()) == want
    for f in sentinels.iterdir():
        f.unlink()


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    torch.save(net.state_dict(), d / "state.pt")
    save_file(net.state_dict(), str(d / "state.safetensors"))
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    ep = torch.export.export(small, (torch.zeros(2, 3, 8, 8),))
    torch.export.save(ep, str(d / "prog.pt2"))
    return d


def _load_or_documented_error(path, **kw):
    try:
        load_model(path, **kw)
        return "loaded"
    except FnconvertError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        assert e.exit_code == 1
        return msg


def test_truncated_files_give_the_documented_error(valid_files, tmp_path):
    for name, kw in [("state.pt", {"arch": "shufflenet_v2_x0_5"}), ("state.safetensors", {"arch": "shufflenet_v2_x0_5"}),
                     ("prog.pt2", {})]:
        data = (valid_files / name).read_bytes()
        assert _load_or_documented_error(valid_files / name, **kw) == "loaded"
        for frac in (0.02, 0.5, 0.97):
            cut = tmp_path / f"cut{int(frac * 100)}-{name}"
            cut.write_bytes(data[: int(len(data) * frac)])
            msg = _load_or_documented_error(cut, **kw)
            assert msg != "loaded" and ("corrupt" in msg or "damaged" in msg or "unknown" in msg
                                        or "cannot be loaded" in msg), msg


def test_damaged_pt2_through_the_cli_is_one_line_without_traceback(valid_files, tmp_path):
    """torch.export.load logs a traceback for a damaged archive; the CLI must still show one clean line."""
    data = bytearray((valid_files / "prog.pt2").read_bytes())
    with zipfile.ZipFile(valid_files / "prog.pt2") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_1"))
    data[info.header_offset : info.header_offset + 4] = b"\0\0\0\0"  # break one record's local header
    bad = tmp_path / "damaged.pt2"
    bad.write_bytes(bytes(data))
    # the data is read first: give a valid (tiny) data set so the model file is reached
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, np.int64))
    proc = run_cli("transform", str(bad), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "OUT"))
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "damaged.pt2", "re-export")
    assert proc.stderr.count("\n") == 1, proc.stderr  # nothing else on stderr
    assert not (tmp_path / "OUT").exists()


def test_fuzz_load_model_accepts_only_fnconvert_errors(valid_files, tmp_path):
    """Random bytes and mutated valid files: load_model either loads or raises FnconvertError, nothing else."""
    rng = np.random.default_rng(2024)
    cases = []
    for prefix in (b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"\x8a\x0a", b"\x40\x00\x00\x00\x00\x00\x00\x00{"):
        for n in (1, 9, 64, 4096):
            cases.append((f"random{len(cases)}", {}, prefix + rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    for name, kw in [("state.pt", {"arch": "shufflenet_v2_x0_5"}), ("state.safetensors", {"arch": "shufflenet_v2_x0_5"}),
                     ("prog.pt2", {})]:
        data = np.frombuffer((valid_files / name).read_bytes(), dtype=np.uint8)
        for i in range(10):
            mutated = data.copy()
            k = int(rng.integers(1, 9))
            if i % 3 == 0:  # flip a few bytes anywhere
                pos = rng.integers(0, len(data), k)
                mutated[pos] ^= rng.integers(1, 256, k, dtype=np.uint8)
            elif i % 3 == 1:  # flip bytes in the header / zip directory at the ends
                pos = np.concatenate([rng.integers(0, 200, k), rng.integers(len(data) - 400, len(data), k)])
                mutated[pos] ^= rng.integers(1, 256, len(pos), dtype=np.uint8)
            else:  # zero a chunk
                start = int(rng.integers(0, len(data) - 64))
                mutated[start : start + int(rng.integers(8, 64))] = 0
            cases.append((f"{name}-mut{i}", kw, mutated.tobytes()))
    outcomes = {}
    for label, kw, blob in cases:
        path = tmp_path / label
        path.write_bytes(blob)
        try:
            outcomes[label] = _load_or_documented_error(path, **kw)
        except Exception as e:  # noqa: BLE001 - exactly what the test looks for
            pytest.fail(f"{label}: load_model raised {type(e).__name__}: {e}")
    assert sum(v != "loaded" for v in outcomes.values()) >= len(cases) // 2


# ------------------------------------------------------------------------------------------------ kill and resume


def _args(model, data, out, *extra):
    return ["transform", str(model), "--data", str(data), "--out", str(out), "--trust-model-code", "--epochs", "3",
            "--batch-size", "16", "--calib-samples", "300", "--seed", "3", "--optimizer", "nag", *extra]


def _onnx_logits(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(cnn_ts, cifar_tiny, tmp_path):
    out = tmp_path / "killed"
    ckpt = out / "checkpoints" / "epoch-1.pt"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "fnconvert_cli.main", *_args(cnn_ts, cifar_tiny, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():
            assert proc.poll() is None, f"transform ended before epoch 1: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists() and not (out / "checkpoints" / "epoch-3.pt").exists()

    resumed = run_cli(*_args(cnn_ts, cifar_tiny, out, "--resume", "--quiet"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report_r = json.loads((out / "report.json").read_text())

    ref_out = tmp_path / "uninterrupted"
    result = CliRunner().invoke(app, _args(cnn_ts, cifar_tiny, ref_out, "--quiet"))
    assert result.exit_code == 0, result.output
    report_u = json.loads((ref_out / "report.json").read_text())

    assert [e["epoch"] for e in report_r["epochs"]] == [1, 2, 3]
    np.testing.assert_allclose([e["train_loss"] for e in report_r["epochs"]],
                               [e["train_loss"] for e in report_u["epochs"]], rtol=0, atol=1e-6)
    with np.load(cifar_tiny) as z:
        x = to_nchw01(z["x_test"])
    np.testing.assert_allclose(_onnx_logits(out / "model_fn.onnx", x), _onnx_logits(ref_out / "model_fn.onnx", x),
                               rtol=0, atol=1e-5)
    assert [f.name for f in out.iterdir() if f.name.startswith(".")] == []  # no temporary files left


# ------------------------------------------------------------------------------------------------ determinism


_VOLATILE = {"seconds", "environment"}


def _numbers(report: dict) -> dict:
    r = {k: v for k, v in report.items() if k not in _VOLATILE}
    r["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in report["epochs"]]
    return r


def test_same_seed_same_bytes_and_numbers(cnn_pt2, cifar_tiny, tmp_path):
    reports = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = CliRunner().invoke(app, ["transform", str(cnn_pt2), "--data", str(cifar_tiny), "--out", str(out),
                                          "--epochs", "1", "--seed", "11", "--calib-samples", "400", "--quiet"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((out / "report.json").read_text()))
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "factors.safetensors").read_bytes() == (b / "factors.safetensors").read_bytes()
    assert (a / "factors.npz").read_bytes() == (b / "factors.npz").read_bytes()
    assert _numbers(reports[0]) == _numbers(reports[1])
    # another seed picks other calibration rows: other factors
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["transform", str(cnn_pt2), "--data", str(cifar_tiny), "--out", str(out),
                                      "--no-finetune", "--seed", "12", "--calib-samples", "400", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "factors.safetensors").read_bytes() != (a / "factors.safetensors").read_bytes()


def test_a_failed_rerun_keeps_the_previous_complete_result(tmp_path, monkeypatch):
    """--force over a finished result, then a crash mid-export: the old result stays whole, nothing half-new leaks."""
    from typer.testing import CliRunner

    import fnconvert.export as export
    from fnconvert_cli.main import app

    root = Path(__file__).resolve().parents[1] / "samples"
    out = tmp_path / "OUT"
    args = ["transform", str(root / "cnn_cifar10.pt2"), "--data", str(root / "cifar10-sample.npz"), "--out", str(out),
            "--no-finetune", "--calib-samples", "300", "--quiet"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert "report.json" in before and "model_fn.onnx" in before

    def crash(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill after model_fn.onnx was staged

    monkeypatch.setattr(export, "export_torchscript", crash)
    r = CliRunner().invoke(app, [*args, "--force", "--factors", "2"])
    assert r.exit_code == 130
    after = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert after == before  # the previous complete result, byte for byte
    assert not list(out.glob(".fnconvert-tmp-*"))
    # The next successful run cleans what the crashed one staged.
    monkeypatch.undo()
    assert CliRunner().invoke(app, [*args, "--force", "--factors", "2"]).exit_code == 0
    assert not (out / ".fnconvert-stage").exists()
    import json

    assert json.loads((out / "report.json").read_text())["factors"] == 2


def test_deterministic_flag_gives_identical_runs(tmp_path):
    """--deterministic turns on torch's deterministic algorithms for the run (and off after it)."""
    import json

    import torch
    from typer.testing import CliRunner

    from fnconvert_cli.main import app

    root = Path(__file__).resolve().parents[1] / "samples"
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = CliRunner().invoke(app, ["transform", str(root / "cnn_cifar10.pt2"), "--data",
                                     str(root / "cifar10-sample.npz"), "--out", str(out), "--epochs", "1",
                                     "--calib-samples", "300", "--deterministic", "--quiet"])
        assert r.exit_code == 0, r.output
        reports.append(json.loads((out / "report.json").read_text()))
        assert (out / "factors.safetensors").read_bytes() == (tmp_path / "a" / "factors.safetensors").read_bytes()
    assert reports[0]["epochs"][0]["train_loss"] == reports[1]["epochs"][0]["train_loss"]
    assert reports[0]["accuracy_after"] == reports[1]["accuracy_after"]
    assert not torch.are_deterministic_algorithms_enabled()
