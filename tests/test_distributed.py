"""torchrun: two gloo processes on CPU against one process — factors, report and a working model_fn.onnx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "samples" / "cnn_cifar10.pt2"
SAMPLE_DATA = ROOT / "samples" / "cifar10-sample.npz"


def _fnconvert() -> list[str]:
    exe = shutil.which("fnconvert", path=str(Path(sys.executable).parent)) or shutil.which("fnconvert")
    assert exe, "the fnconvert console script is not installed (pip install -e .)"
    return [exe]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", FNCONVERT_DIST_TIMEOUT="120", PYTHONUNBUFFERED="1")
    return env


def _transform_args(out: Path) -> list[str]:
    return ["transform", str(SAMPLE_MODEL), "--data", str(SAMPLE_DATA), "--epochs", "1", "--seed", "3",
            "--factors", "2", "--out", str(out), "--json", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    single, multi = base / "single", base / "multi"
    r1 = subprocess.run(_fnconvert() + _transform_args(single), env=_env(), capture_output=True, text=True,
                        timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           *_fnconvert(), *_transform_args(multi)]
    r2 = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return single, multi, r2


@pytest.mark.slow
def test_two_ranks_match_one_process(runs):
    single, multi, _ = runs
    from fnconvert.factors import Factors

    f1, f2 = Factors.load(single / "factors.safetensors"), Factors.load(multi / "factors.safetensors")
    cos = np.abs(np.sum(f1.V * f2.V, axis=0)) / (np.linalg.norm(f1.V, axis=0) * np.linalg.norm(f2.V, axis=0))
    assert (cos >= 0.99999).all(), cos
    r1, r2 = f1.singular_values / f1.singular_values[0], f2.singular_values / f2.singular_values[0]
    np.testing.assert_allclose(r2, r1, atol=1e-5)
    assert f2.n_samples == f1.n_samples  # all ranks' shards together are the whole calibration set
    np.testing.assert_allclose(f2.mean, f1.mean, atol=1e-6)

    rep1 = json.loads((single / "report.json").read_text())
    rep2 = json.loads((multi / "report.json").read_text())
    assert rep1["world_size"] == 1 and rep2["world_size"] == 2
    # Before fine-tuning both runs hold the same model: accuracy all-reduced over ranks equals one process's.
    assert rep2["accuracy_before"] == pytest.approx(rep1["accuracy_before"], abs=1e-12)
    assert rep2["accuracy_calibrated"] == pytest.approx(rep1["accuracy_calibrated"], abs=2e-3)
    assert rep2["lr"]["residual"] / rep2["lr"]["factor"][0] == pytest.approx(
        (rep2["singular_values"][0] / rep2["singular_values"][2]) ** 2, rel=1e-9)
    assert len(rep2["epochs"]) == 1


@pytest.mark.slow
def test_two_rank_model_runs_in_onnxruntime(runs):
    _, multi, proc = runs
    import onnxruntime as ort

    rep = json.loads((multi / "report.json").read_text())
    sess = ort.InferenceSession(str(multi / "model_fn.onnx"), providers=["CPUExecutionProvider"])
    with np.load(SAMPLE_DATA) as z:
        x = z["x_test"].transpose(0, 3, 1, 2).astype(np.float32) / 255
        y = z["y_test"]
    pred = sess.run(None, {"input": x})[0].argmax(1)
    assert float(np.mean(pred == y)) == pytest.approx(rep["accuracy_onnx"], abs=1e-9)
    # Only rank 0 printed the JSON report.
    assert proc.stdout.count('"world_size"') == 1
