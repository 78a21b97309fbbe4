"""Every sample runs: the sample maker, the README's main job, the config file, the CI workflow and the deploy script."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fnconvert_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SHARED = ROOT.parent / "shared" / "data"
ANSI = re.compile(r"\x1b\[")


def test_bundled_sample_is_small():
    assert (SAMPLES / "cifar10-sample.npz").stat().st_size < 5_000_000
    assert (SAMPLES / "cnn_cifar10.pt2").stat().st_size < 1_000_000
    with np.load(SAMPLES / "cifar10-sample.npz", allow_pickle=False) as z:
        assert {"x_train", "y_train", "x_test", "y_test", "classes"} <= set(z.files)
        assert np.bincount(z["y_train"]).tolist() == [100] * 10  # stratified: every class present


@pytest.mark.slow
def test_make_sample_script(tmp_path):
    if not (SHARED / "cifar10-dev.npz").exists():
        pytest.skip(f"needs {SHARED / 'cifar10-dev.npz'} (../shared/data beside the checkout)")
    r = subprocess.run([sys.executable, str(SAMPLES / "make_sample.py"), "--epochs", "1", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = float(re.search(r"test accuracy ([0-9.]+)", r.stdout).group(1))
    assert acc > 0.2  # one epoch of a small CNN is far above chance (0.1) on CIFAR-10
    from fnconvert.models import load_model

    m = load_model(tmp_path / "cnn_cifar10.pt2")
    assert m.format == "pt2"


def _readme_main_job() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(python3 -m venv.*?)\n```", text, re.S).group(1)
    return block.split("&& fnconvert ", 1)[1]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The README's main job, run as a subprocess without a TTY (as in CI)."""
    out = tmp_path_factory.mktemp("readme") / "fn-sample"
    args = shlex.split(_readme_main_job())
    args[args.index("--out") + 1] = str(out)
    r = subprocess.run([sys.executable, "-m", "fnconvert_cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_readme_main_job_runs_offline(sample_run):
    out, proc = sample_run
    for name in ("model_fn.onnx", "model_fn.pt", "model_fn.pt2", "factors.safetensors", "factors.npz",
                 "report.json", "report.md", "curves.png", "spectrum.png"):
        assert (out / name).is_file(), name
    assert not ANSI.search(proc.stderr), "the non-TTY log holds ANSI codes"
    assert "epoch 1/1" in proc.stderr  # one plain line per epoch without a TTY
    rep = json.loads((out / "report.json").read_text())
    assert rep["verification"]["passed"] and rep["onnx_max_abs_diff"] <= 1e-4


def test_deploy_sample_agrees_with_the_report(sample_run):
    out, _ = sample_run
    r = subprocess.run([sys.executable, str(SAMPLES / "deploy_onnxruntime.py"), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = float(re.search(r"accuracy ([0-9.]+) on 64", r.stdout).group(1))
    # Independent check: the same 64 images through onnxruntime directly.
    import onnxruntime as ort

    with np.load(SAMPLES / "cifar10-sample.npz") as z:
        x = z["x_test"][:64].transpose(0, 3, 1, 2).astype(np.float32) / 255
        y = z["y_test"][:64]
    sess = ort.InferenceSession(str(out / "model_fn.onnx"), providers=["CPUExecutionProvider"])
    assert acc == pytest.approx(float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == y)), abs=1e-3)


def test_config_sample_drives_transform(tmp_path):
    """samples/fnconvert.toml alone sets factors = 2 and epochs = 2; a flag overrides the file's out."""
    out = tmp_path / "cfg-out"
    r = CliRunner().invoke(app, ["transform", str(SAMPLES / "cnn_cifar10.pt2"), "--config",
                                 str(SAMPLES / "fnconvert.toml"), "--out", str(out), "--calib-samples", "500",
                                 "--save-config", str(tmp_path / "effective.toml"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["factors"] == 2 and len(rep["epochs"]) == 2
    assert (out / "report.md").is_file() and (out / "curves.png").is_file() and (out / "spectrum.png").is_file()
    import tomllib

    eff = tomllib.loads((tmp_path / "effective.toml").read_text())
    assert eff["factors"] == "2" or eff["factors"] == 2
    assert eff["out"] == str(out) and eff["epochs"] == 2


def test_config_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('data = "x.npz"\nfactorz = 2\n')
    r = CliRunner().invoke(app, ["transform", str(SAMPLES / "cnn_cifar10.pt2"), "--config", str(cfg),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "factorz" in r.output and "valid keys are" in r.output and "epochs" in r.output
    assert not (tmp_path / "o").exists()


def test_github_actions_sample_names_real_commands_and_flags():
    wf = yaml.safe_load((SAMPLES / "ci" / "github-actions.yml").read_text())
    runs = [s["run"] for job in wf["jobs"].values() for s in job["steps"] if "run" in s]
    used = [r for r in runs if r.startswith("fnconvert ")]
    assert len(used) >= 2
    for line in used:
        words = shlex.split(line.split(">")[0])
        cmd = words[1]
        help_text = CliRunner().invoke(app, [cmd, "--help"], terminal_width=200).output
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in help_text, f"{cmd} has no {flag}"
    for path_arg in ("samples/cnn_cifar10.pt2", "samples/fnconvert.toml", "samples/cifar10-sample.npz"):
        assert (ROOT / path_arg).exists()


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "CLI.md"
    r = subprocess.run([str(Path(sys.executable).parent / "typer"), "fnconvert_cli.main", "utils", "docs", "--name",
                        "fnconvert", "--output", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (ROOT / "docs" / "CLI.md").read_text(), (
        "docs/CLI.md is stale: regenerate it with "
        "`typer fnconvert_cli.main utils docs --name fnconvert --output docs/CLI.md`")


def test_help_is_fast_and_lists_every_command():
    import time

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fnconvert_cli.main", "--help"], capture_output=True, text=True,
                       timeout=30, env={"COLUMNS": "200", "PATH": ""})
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0
    for cmd in ("transform", "factors", "inspect", "verify", "bench", "predict"):
        assert cmd in r.stdout
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"
    r = subprocess.run([sys.executable, "-c", "import fnconvert_cli.main, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "False"  # torch is imported lazily


def test_inspect_json_on_the_sample_has_the_documented_keys(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(SAMPLES / "cifar10-sample.npz"), "--json", "--max-factors", "5",
                                 "--plot", str(tmp_path / "spectrum.png")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for key in ("singular_values", "explained_variance_ratio", "suggested_factors", "condition_number",
                "residual_condition_number", "lr_multipliers"):
        assert key in info
    # The rate multipliers are the paper's (λ1/λ_{d+1})², computed here from the reported singular values.
    s = np.asarray(info["singular_values"])
    np.testing.assert_allclose(info["lr_multipliers"][:4], (s[0] / s[1:5]) ** 2, rtol=1e-9)
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
