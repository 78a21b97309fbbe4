"""fnconvert.data against numpy: layouts, scaling, --normalize, calibration sampling, torchvision and ImageFolder.

torchvision loaders run on local files built in tmp_path (CIFAR-10 pickles, MNIST idx files); only CIFAR's md5
integrity check and the download step are patched. Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch

from conftest import to_nchw01
from fnconvert.data import load_data, parse_normalize
from fnconvert.errors import FnconvertError


def _all(split, bs=64):
    xs, ys = zip(*split.batches(bs))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------ npz layouts


def test_uint8_grey_nhw_becomes_nchw_float32_in_unit_range(tmp_path, rng):
    xtr = rng.integers(0, 256, (37, 5, 7), dtype=np.uint8)
    xte = rng.integers(0, 256, (11, 5, 7), dtype=np.uint8)
    ytr, yte = rng.integers(0, 4, 37), rng.integers(0, 4, 11)
    ds = load_data(_save(tmp_path / "g.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte))
    x, y = _all(ds.train, bs=8)  # several batches, the last one partial
    assert x.dtype == np.float32 and x.shape == (37, 1, 5, 7)
    np.testing.assert_allclose(x, xtr[:, None].astype(np.float64) / 255, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y, ytr)
    assert x.min() >= 0 and x.max() <= 1
    assert ds.train.input_shape == (1, 5, 7) and ds.train.n_features == 35
    xt, yt = _all(ds.test)
    np.testing.assert_allclose(xt, to_nchw01(xte), atol=1e-7)
    np.testing.assert_array_equal(yt, yte)


def test_uint8_hwc_becomes_nchw(tmp_path, rng):
    xtr = rng.integers(0, 256, (9, 4, 6, 3), dtype=np.uint8)
    ds = load_data(_save(tmp_path / "c.npz", x_train=xtr, y_train=np.arange(9) % 3, x_test=xtr[:2],
                         y_test=np.array([0, 1])))
    x, _ = _all(ds.train)
    assert x.shape == (9, 3, 4, 6)
    # channel c of sample n at (h, w) is xtr[n, h, w, c] / 255
    np.testing.assert_allclose(x[4, 2, 3, 5], xtr[4, 3, 5, 2] / 255, atol=1e-7)
    np.testing.assert_allclose(x, xtr.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_float_arrays_are_taken_as_they_are(tmp_path, rng):
    xtr = rng.normal(size=(20, 2, 3, 3)) * 50  # float64, far outside [0, 1]
    xte = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    ds = load_data(_save(tmp_path / "f.npz", x_train=xtr, y_train=np.arange(20) % 2, x_test=xte,
                         y_test=np.arange(5) % 2))
    x, _ = _all(ds.train)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, xtr.astype(np.float32))
    np.testing.assert_array_equal(_all(ds.test)[0], xte)
    # flat feature vectors (N×p) too
    ds2 = load_data(_save(tmp_path / "p.npz", x_train=xtr.reshape(20, -1), y_train=np.arange(20) % 2,
                          x_test=xte.reshape(5, -1), y_test=np.arange(5) % 2))
    assert ds2.train.input_shape == (18,)
    np.testing.assert_array_equal(_all(ds2.train)[0], xtr.reshape(20, -1).astype(np.float32))


def test_normalize_per_channel_and_single_value(tmp_path, rng):
    xtr = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    path = _save(tmp_path / "c.npz", x_train=xtr, y_train=np.arange(6) % 2, x_test=xtr[:2], y_test=np.array([0, 1]))
    mean, std = np.array([0.49, 0.48, 0.45]), np.array([0.25, 0.24, 0.26])
    ds = load_data(path, normalize="0.49,0.48,0.45,0.25,0.24,0.26")
    want = (xtr.transpose(0, 3, 1, 2) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(_all(ds.train)[0], want, atol=1e-5)
    ds1 = load_data(path, normalize="0.5,0.25")
    np.testing.assert_allclose(_all(ds1.train)[0], (xtr.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25, atol=1e-5)
    assert ds.train.pre.to_dict()["normalize"] == {"mean": list(mean), "std": list(std)}


@pytest.mark.parametrize("text, needle", [("1,2,3", "STD"), ("a,b", "not a list of numbers"), ("0.5,0", "positive")])
def test_normalize_rejects_bad_text(text, needle):
    with pytest.raises(FnconvertError, match=needle) as e:
        parse_normalize(text)
    assert repr(text) in str(e.value)


def test_normalize_channel_count_mismatch_names_the_fix(tmp_path, rng):
    x = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)  # one channel
    ds = load_data(_save(tmp_path / "g.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x, y_test=np.arange(4) % 2),
                   normalize="0.1,0.2,0.3,1,1,1")
    with pytest.raises(FnconvertError, match="3 channel values but the data has 1"):
        next(ds.train.batches(2))


def test_batches_shuffle_is_seeded_permutation(cifar_tiny):
    ds = load_data(cifar_tiny)
    y0 = np.concatenate([y.numpy() for _, y in ds.train.batches(100)])
    ya = np.concatenate([y.numpy() for _, y in ds.train.batches(100, shuffle_seed=3)])
    yb = np.concatenate([y.numpy() for _, y in ds.train.batches(100, shuffle_seed=3)])
    yc = np.concatenate([y.numpy() for _, y in ds.train.batches(100, shuffle_seed=4)])
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(ya, yc) and not np.array_equal(ya, y0)
    np.testing.assert_array_equal(np.sort(ya), np.sort(y0))


@pytest.mark.data
def test_real_cifar_npz_matches_numpy(cifar_npz, cifar_arrays):
    ds = load_data(cifar_npz)
    assert (len(ds.train), len(ds.test)) == (10_000, 2_000)
    assert ds.num_classes == 10 and ds.classes == [str(c) for c in cifar_arrays["classes"]]
    idx = np.array([0, 17, 4242, 9999])
    x, y = next(ds.train.batches(10, idx))
    np.testing.assert_allclose(x.numpy(), to_nchw01(cifar_arrays["x_train"][idx]), atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), cifar_arrays["y_train"][idx])
    flat = next(iter(ds.train.flat_batches(3, idx)))
    assert flat.shape == (3, 3072)
    np.testing.assert_allclose(flat.numpy(), to_nchw01(cifar_arrays["x_train"][idx[:3]]).reshape(3, -1), atol=1e-7)


@pytest.mark.data
def test_real_mnist_npz_matches_numpy(mnist_npz, mnist_arrays):
    ds = load_data(mnist_npz)
    assert (len(ds.train), len(ds.test)) == (4_000, 1_000) and ds.train.input_shape == (1, 28, 28)
    x, y = next(ds.test.batches(50))
    np.testing.assert_allclose(x.numpy(), to_nchw01(mnist_arrays["x_test"][:50]), atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), mnist_arrays["y_test"][:50])


# ------------------------------------------------------------------------------------------------ calibration sampling


def test_calibration_indices_count_seed_and_range(cifar_tiny):
    ds = load_data(cifar_tiny)
    a = ds.calibration_indices(256, seed=7)
    assert len(a) == 256 and len(np.unique(a)) == 256
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < len(ds.train)
    np.testing.assert_array_equal(a, ds.calibration_indices(256, seed=7))  # same seed: same rows
    assert not np.array_equal(a, ds.calibration_indices(256, seed=8))  # another seed: other rows
    np.testing.assert_array_equal(ds.calibration_indices(None, 0), np.arange(len(ds.train)))
    np.testing.assert_array_equal(ds.calibration_indices(10**6, 0), np.arange(len(ds.train)))
    fb = ds.train.flat_batches(100, a)
    assert len(fb) == 3 and sum(b.shape[0] for b in fb) == 256
    with pytest.raises(FnconvertError, match="--calib-samples 0"):
        ds.calibration_indices(0, 0)


# ------------------------------------------------------------------------------------------------ bad npz files


def test_npz_missing_keys_named(tmp_path):
    path = _save(tmp_path / "m.npz", x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(FnconvertError) as e:
        load_data(path)
    assert "lacks the key(s) x_test, y_test" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("case, needle", [
    ("negative_label", "labels must be 0"),
    ("float_labels", "labels must be integers"),
    ("label_count", "one integer label per sample"),
    ("bad_dtype", "dtype int32"),
    ("bad_uint8_shape", "N×H×W or N×H×W×C"),
    ("nan_sample", "sample 3"),
    ("empty_train", "zero samples"),
    ("shape_mismatch", "share one shape"),
])
def test_npz_bad_contents(tmp_path, case, needle):
    x = np.zeros((5, 4, 4), np.uint8)
    y = np.arange(5) % 2
    arrays = dict(x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    if case == "negative_label":
        arrays["y_train"] = np.array([0, 1, -1, 0, 1])
    elif case == "float_labels":
        arrays["y_train"] = y.astype(np.float32)
    elif case == "label_count":
        arrays["y_train"] = y[:4]
    elif case == "bad_dtype":
        arrays["x_train"] = x.astype(np.int32)
    elif case == "bad_uint8_shape":
        arrays["x_train"] = np.zeros((5, 4), np.uint8)
    elif case == "nan_sample":
        xf = np.zeros((5, 1, 4, 4), np.float32)
        xf[3, 0, 2, 1] = np.nan
        arrays.update(x_train=xf, x_test=np.zeros((2, 1, 4, 4), np.float32))
    elif case == "empty_train":
        arrays.update(x_train=x[:0], y_train=y[:0])
    elif case == "shape_mismatch":
        arrays["x_test"] = np.zeros((2, 5, 5), np.uint8)
    with pytest.raises(FnconvertError, match=needle):
        load_data(_save(tmp_path / f"{case}.npz", **arrays))


def test_unreadable_data_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip archive\xff" * 20)
    with pytest.raises(FnconvertError, match="not a readable .npz"):
        load_data(garbage)
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(FnconvertError, match="single array"):
        load_data(npy)
    with pytest.raises(FnconvertError, match="neither a file, a folder nor one of"):
        load_data(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------ torchvision (local)


def _cifar_layout(root, rng, per_batch=4, n_test=3):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
        batches[name] = entry
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches


@pytest.fixture()
def no_network(monkeypatch):
    """Any download attempt fails as it does offline; records the attempts."""
    import torchvision.datasets as tvd

    attempts = []

    def offline(self, *a, **k):
        attempts.append(type(self).__name__)
        raise URLError("network is unreachable (offline test)")

    for name in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST"):
        monkeypatch.setattr(getattr(tvd, name), "download", offline)
    return attempts


def test_cifar10_from_local_pickles(tmp_path, rng, monkeypatch, no_network):
    import torchvision.datasets.cifar as tv_cifar

    batches = _cifar_layout(tmp_path, rng)
    # The md5 integrity check is the one thing patched: these pickles are ours, not the official release.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    ds = load_data("cifar10", data_dir=tmp_path)
    assert no_network == []
    raw_train = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    y_train = np.concatenate([batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)])
    x, y = _all(ds.train)
    assert x.shape == (20, 3, 32, 32)
    # CIFAR pickles store rows as CHW-planar 3072 bytes
    np.testing.assert_allclose(x, raw_train.reshape(-1, 3, 32, 32) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, y_train)
    xt, yt = _all(ds.test)
    np.testing.assert_allclose(xt, batches["test_batch"]["data"].reshape(-1, 3, 32, 32) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(yt, batches["test_batch"]["labels"])
    assert ds.classes == [f"class{i}" for i in range(10)] and ds.source["kind"] == "torchvision"


def _idx(path, arr: np.ndarray, magic: int):
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic) + b"".join(struct.pack(">i", s) for s in arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_mnist_from_local_idx_files(tmp_path, rng, no_network):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    xtr, xte = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    ytr, yte = np.array([3, 1, 4, 1, 5, 9]), np.array([2, 6, 5, 3])
    _idx(raw / "train-images-idx3-ubyte", xtr, 2051)
    _idx(raw / "train-labels-idx1-ubyte", ytr, 2049)
    _idx(raw / "t10k-images-idx3-ubyte", xte, 2051)
    _idx(raw / "t10k-labels-idx1-ubyte", yte, 2049)
    ds = load_data("mnist", data_dir=tmp_path, normalize="0.1307,0.3081")
    assert no_network == []
    x, y = _all(ds.train)
    np.testing.assert_allclose(x, (xtr[:, None] / 255.0 - 0.1307) / 0.3081, atol=1e-5)
    np.testing.assert_array_equal(y, ytr)
    np.testing.assert_array_equal(_all(ds.test)[1], yte)
    assert ds.num_classes == 10


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw"),
                                          ("fashion-mnist", "FashionMNIST/raw"), ("cifar100", "cifar-100-python")])
def test_torchvision_offline_failure_names_where_to_put_files(tmp_path, no_network, name, folder):
    root = tmp_path / "datasets"
    with pytest.raises(FnconvertError) as e:
        load_data(name, data_dir=root)
    msg = str(e.value)
    assert no_network, "the loader should have tried (the patched, offline) download"
    assert str(root / folder) in msg and "--data-dir" in msg and "\n" not in msg
    with pytest.raises(FnconvertError) as e2:
        load_data(name, data_dir=root, download=False)
    assert str(root / folder) in str(e2.value)


# ------------------------------------------------------------------------------------------------ ImageFolder


def _png_tree(root, rng, mode="RGB", size=(6, 5)):
    from PIL import Image

    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog", "emu"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode=mode).save(d / f"img{i}.png")
                arrays[(split, cls, i)] = a
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return arrays


def test_image_folder_train_test_pngs(tmp_path, rng):
    arrays = _png_tree(tmp_path / "tree", rng)
    ds = load_data(tmp_path / "tree")
    assert ds.classes == ["cat", "dog", "emu"] and (len(ds.train), len(ds.test)) == (9, 6)
    x, y = _all(ds.train, bs=4)
    assert x.shape == (9, 3, 5, 6)
    want = np.stack([arrays[("train", c, i)] for c in ("cat", "dog", "emu") for i in range(3)])
    np.testing.assert_allclose(x, want.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 3))
    np.testing.assert_array_equal(_all(ds.test)[1], np.repeat([0, 1, 2], 2))


def test_image_folder_grey(tmp_path, rng):
    arrays = _png_tree(tmp_path / "tree", rng, mode="L")
    ds = load_data(tmp_path / "tree", normalize="0.5,0.5")
    x, _ = _all(ds.test)
    assert x.shape == (6, 1, 5, 6)
    np.testing.assert_allclose(x[0, 0], (arrays[("test", "cat", 0)] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_image_folder_refusals(tmp_path, rng):
    from PIL import Image

    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FnconvertError, match="test/"):
        load_data(tmp_path / "only_train")
    _png_tree(tmp_path / "tree", rng)
    (tmp_path / "tree" / "test" / "yak").mkdir()
    with pytest.raises(FnconvertError, match="yak"):
        load_data(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "yak").rmdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "tree" / "train" / "dog" / "big.png")
    ds = load_data(tmp_path / "tree")
    with pytest.raises(FnconvertError, match="differ in size"):
        list(ds.train.batches(64))
    (tmp_path / "tree" / "train" / "dog" / "big.png").write_bytes(b"\x89PNG broken")
    ds = load_data(tmp_path / "tree")
    with pytest.raises(FnconvertError, match="big.png"):
        list(ds.train.batches(64))
