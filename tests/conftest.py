"""Shared fixtures: the real data in ../shared/data, small stratified subsets of it, and small trained models.

Everything expensive is session-scoped and built once in ``tmp_path_factory``. Models are defined inline here
(timm style) and trained for a few seconds on the real data; nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ------------------------------------------------------------------------------------------------ inline models


def small_cnn(num_classes: int = 10, in_ch: int = 3):
    """A CNN small enough to train on 10k CIFAR images in a few seconds; ends in a Linear layer."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256 if in_ch == 3 else 144, num_classes),
    )


def logreg(p: int, num_classes: int = 10):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(p, num_classes))


def train_adam(model, x, y, *, epochs: int = 1, lr: float = 1e-2, batch: int = 256, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            b = perm[i : i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def to_nchw01(x_uint8: np.ndarray) -> np.ndarray:
    """The reference preprocessing, in numpy: uint8 N×H×W[×C] → float32 NCHW in [0, 1]."""
    x = x_uint8[:, :, :, None] if x_uint8.ndim == 3 else x_uint8
    return (x.transpose(0, 3, 1, 2).astype(np.float64) / 255.0).astype(np.float32)


def numpy_factors(X: np.ndarray, d: int):
    """Reference factors in float64 numpy: mean, V (p, d), B = Vᵀ and λ1..λ_{d+1} of the centred rows of X.

    Eigen-decomposes the smaller of the two Gram matrices (XcᵀXc or XcXcᵀ), which is exact in float64 and much
    faster than an SVD on a busy 2-core machine.
    """
    from types import SimpleNamespace

    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    mean = X.mean(0)
    Xc = X - mean
    if Xc.shape[0] >= Xc.shape[1]:
        w, v = np.linalg.eigh(Xc.T @ Xc)
        w, V = w[::-1], v[:, ::-1][:, :d]
    else:
        w, u = np.linalg.eigh(Xc @ Xc.T)
        w, u = w[::-1], u[:, ::-1]
        V = Xc.T @ u[:, :d] / np.sqrt(w[:d])
    V = np.ascontiguousarray(V)
    return SimpleNamespace(d=d, mean=mean, V=V, B=V.T.copy(), singular_values=np.sqrt(np.maximum(w[: d + 1], 0)))


def stratified_indices(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(y == c), size=per_class, replace=False) for c in np.unique(y)]
    return rng.permutation(np.concatenate(idx))


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run ``python -m fnconvert_cli.main ARGS`` without a TTY; returns the CompletedProcess (text mode)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fnconvert_cli.main", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=full_env, timeout=timeout, cwd=cwd)


def deny_reading(monkeypatch, path: Path) -> None:
    """Make ``open(path)`` fail with EACCES. Tests may run as root, for whom chmod 000 does not block reading."""
    import builtins

    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr is exactly one ``error: ...`` line (no traceback, no ANSI codes) that contains every needle."""
    assert not ANSI.search(stderr), f"ANSI escape codes in stderr: {stderr!r}"
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, f"expected one 'error:' line, got {stderr!r}"
    line = errors[0]
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not in {line!r}"
    return line


# ------------------------------------------------------------------------------------------------ data fixtures


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent; see ../shared/data/README.md")
    return SHARED_DATA


def _shared_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} is absent; see ../shared/data/README.md")
    return path


@pytest.fixture(scope="session")
def cifar_npz(shared_data) -> Path:
    return _shared_file(shared_data, "cifar10-dev.npz")


@pytest.fixture(scope="session")
def mnist_npz(shared_data) -> Path:
    return _shared_file(shared_data, "mnist5k.npz")


@pytest.fixture(scope="session")
def cifar_arrays(cifar_npz) -> dict:
    with np.load(cifar_npz) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def mnist_arrays(mnist_npz) -> dict:
    with np.load(mnist_npz) as z:
        return {k: z[k] for k in z.files}


def _subset_npz(arrays: dict, path: Path, train_per_class: int, test_per_class: int) -> Path:
    tr = stratified_indices(arrays["y_train"], train_per_class, seed=0)
    te = stratified_indices(arrays["y_test"], test_per_class, seed=1)
    np.savez(path, x_train=arrays["x_train"][tr], y_train=arrays["y_train"][tr], x_test=arrays["x_test"][te],
             y_test=arrays["y_test"][te], classes=arrays["classes"])
    return path


@pytest.fixture(scope="session")
def cifar_tiny(cifar_arrays, tmp_path_factory) -> Path:
    """A stratified subset of cifar10-dev: 600 train / 100 test (for quick CLI runs)."""
    return _subset_npz(cifar_arrays, tmp_path_factory.mktemp("data") / "cifar-tiny.npz", 60, 10)


@pytest.fixture(scope="session")
def mnist_small(mnist_arrays, tmp_path_factory) -> Path:
    """A stratified subset of mnist5k: 1,000 train / 200 test."""
    return _subset_npz(mnist_arrays, tmp_path_factory.mktemp("data") / "mnist-small.npz", 100, 20)


# ------------------------------------------------------------------------------------------------ model fixtures


@pytest.fixture(scope="session")
def cifar_cnn(cifar_arrays):
    """(eager module, state) of a small CNN trained for one epoch on all 10,000 cifar10-dev training images."""
    import torch

    torch.manual_seed(0)
    x = torch.from_numpy(to_nchw01(cifar_arrays["x_train"]))
    y = torch.from_numpy(cifar_arrays["y_train"].astype(np.int64))
    return train_adam(small_cnn(), x, y, epochs=1, lr=1e-2)


@pytest.fixture(scope="session")
def cnn_ts(cifar_cnn, tmp_path_factory) -> Path:
    """The trained CNN saved as TorchScript (cnn.pt)."""
    import torch

    path = tmp_path_factory.mktemp("models") / "cnn.pt"
    torch.jit.save(torch.jit.script(cifar_cnn), str(path))
    return path


@pytest.fixture(scope="session")
def cnn_pt2(cifar_cnn, tmp_path_factory) -> Path:
    """The trained CNN saved as a torch.export program (cnn.pt2), which carries no code to trust."""
    import torch

    path = tmp_path_factory.mktemp("models") / "cnn.pt2"
    ep = torch.export.export(cifar_cnn, (torch.zeros(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, str(path))
    return path
