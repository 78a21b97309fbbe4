"""Datasets → batches. The only dataset reader in fnconvert.

Every source (an ``.npz`` file, a torchvision data set, an ImageFolder tree) becomes two :class:`Split` objects that
hold the *raw* samples once (uint8 images stay uint8) and turn them into float32 NCHW batches on the fly. So a data
set is never held twice, and preprocessing happens per batch.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import FnconvertError, short_reason

TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Preprocessing:
    """What turns a raw sample into the model's input: ``(x * scale - mean) / std`` per channel."""

    scale: float | None = None  # 1/255 for uint8 images, None for float data taken as it is
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "scale": "1/255" if self.scale else None,
            "normalize": None if self.mean is None else {"mean": list(self.mean), "std": list(self.std)},
            "layout": "NCHW float32",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        norm = d.get("normalize") or {}
        return cls(
            scale=1 / 255 if d.get("scale") else None,
            mean=tuple(norm["mean"]) if norm else None,
            std=tuple(norm["std"]) if norm else None,
        )

    def apply(self, raw: np.ndarray):
        """(n, C, H, W) raw array → float32 torch tensor in the model's input space."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(raw))
        x = x.to(torch.float32)
        if self.scale is not None:
            x.mul_(self.scale)
        if self.mean is not None:
            c = x.shape[1]
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, *([1] * (x.dim() - 2)))
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, *([1] * (x.dim() - 2)))
            if mean.shape[1] not in (1, c):
                raise FnconvertError(
                    f"--normalize has {mean.shape[1]} channel values but the data has {c} channels; "
                    f"give 1 or {c} values for MEAN and STD"
                )
            x.sub_(mean).div_(std)
        return x


def parse_normalize(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``"0.5,0.25"`` or ``"0.49,0.48,0.45,0.25,0.24,0.26"`` (means then stds) → (mean, std)."""
    if not text:
        return None
    try:
        vals = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise FnconvertError(f"--normalize {text!r} is not a list of numbers; write MEAN,STD or M1,M2,M3,S1,S2,S3")
    if len(vals) < 2 or len(vals) % 2:
        raise FnconvertError(
            f"--normalize {text!r} needs as many STD values as MEAN values; write MEAN,STD or M1,M2,M3,S1,S2,S3"
        )
    half = len(vals) // 2
    mean, std = tuple(vals[:half]), tuple(vals[half:])
    if any(s <= 0 for s in std):
        raise FnconvertError(f"--normalize {text!r} has a STD that is not positive; every STD must be > 0")
    return mean, std


class Split:
    """One split of a data set: raw samples ``x`` of shape (n_samples, C, H, W) and int64 labels ``y``.

    ``x`` is kept raw (uint8 stays uint8); :meth:`batches` yields preprocessed float32 tensors.
    """

    def __init__(self, x, y: np.ndarray, pre: Preprocessing, reader=None):
        self._x = x  # np.ndarray (n, C, H, W), or a list of image paths read by ``reader``
        self._reader = reader
        self.y = np.asarray(y, dtype=np.int64)
        self.pre = pre

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.raw(np.arange(min(1, len(self)))).shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    def raw(self, idx: np.ndarray) -> np.ndarray:
        if self._reader is not None:
            return self._reader([self._x[i] for i in idx])
        return self._x[idx]

    def batches(
        self, batch_size: int, indices: np.ndarray | None = None, *, shuffle_seed: int | None = None
    ) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        """Yield ``(x, y)``: x float32 (b, C, H, W), y int64 (b,). Only one batch is materialized at a time."""
        import torch

        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        if shuffle_seed is not None:
            g = torch.Generator().manual_seed(int(shuffle_seed))
            idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            yield self.pre.apply(self.raw(b)), torch.from_numpy(self.y[b])

    def flat_batches(self, batch_size: int, indices: np.ndarray | None = None) -> "FlatBatches":
        return FlatBatches(self, batch_size, indices)


@dataclass
class FlatBatches:
    """A re-iterable of (b, p) float32 batches: what ``fit_factors`` streams over."""

    split: Split
    batch_size: int
    indices: np.ndarray | None = None

    def __iter__(self):
        for x, _ in self.split.batches(self.batch_size, self.indices):
            yield x.reshape(x.shape[0], -1)

    def __len__(self) -> int:
        n = len(self.split) if self.indices is None else len(self.indices)
        return -(-n // self.batch_size)


@dataclass
class Dataset:
    """Train and test splits of one source, plus where it came from."""

    name: str
    train: Split
    test: Split
    classes: list[str] | None = None
    source: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(max(self.train.y.max(initial=-1), self.test.y.max(initial=-1))) + 1

    def calibration_indices(self, n: int | None, seed: int) -> np.ndarray:
        """A seeded random subset of the training rows, sorted (``n`` samples; all when None)."""
        total = len(self.train)
        if n is None or n >= total:
            return np.arange(total)
        if n < 1:
            raise FnconvertError(f"--calib-samples {n} must be at least 1 (the training split has {total} samples)")
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(total, size=n, replace=False))


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_data(
    data: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    normalize: str | tuple | None = None,
    download: bool = True,
) -> Dataset:
    """Open ``data``: an ``.npz`` file, a torchvision name, or an ImageFolder tree with ``train/`` and ``test/``."""
    norm = parse_normalize(normalize) if isinstance(normalize, str) or normalize is None else normalize
    text = str(data)
    if text.lower() in TORCHVISION_NAMES:
        return _load_torchvision(text.lower(), data_dir, norm, download)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_image_folder(path, norm)
    if not path.exists():
        raise FnconvertError(
            f"--data {text!r} is neither a file, a folder nor one of {', '.join(TORCHVISION_NAMES)}; "
            "give an .npz file, an ImageFolder tree with train/ and test/, or a torchvision name"
        )
    return _load_npz(path, norm)


def _make_split(x: np.ndarray, y: np.ndarray, norm, name: str, label: str) -> Split:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        # uint8 images: N×H×W (grey) or N×H×W×C (HWC, the npz and torchvision layout) → NCHW, scaled by 1/255.
        if x.ndim == 3:
            x = x[:, None, :, :]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise FnconvertError(
                f"{label} in {name} has shape {x.shape}; uint8 images must be N×H×W or N×H×W×C"
            )
        scale = 1 / 255
    elif np.issubdtype(x.dtype, np.floating):
        # Float arrays are the model's input already (N×...); only check they are finite.
        if x.ndim < 2:
            raise FnconvertError(f"{label} in {name} has shape {x.shape}; it needs a sample axis and features")
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            raise FnconvertError(
                f"{label} in {name}: sample {i} holds NaN or Inf; clean the data or drop that sample"
            )
        scale = None
    else:
        raise FnconvertError(
            f"{label} in {name} has dtype {x.dtype}; use uint8 images or float arrays"
        )
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise FnconvertError(
            f"labels for {label} in {name} have shape {y.shape} but there are {len(x)} samples; "
            "give one integer label per sample"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise FnconvertError(f"labels for {label} in {name} have dtype {y.dtype}; labels must be integers")
    if len(y) and y.min() < 0:
        raise FnconvertError(f"labels for {label} in {name} hold {int(y.min())}; labels must be 0 … classes-1")
    mean, std = norm if norm else (None, None)
    return Split(x, y, Preprocessing(scale, mean, std))


def _load_npz(path: Path, norm) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array: np.load returns the array itself
            raise FnconvertError(
                f"--data {path} holds a single array, not an .npz archive; save x_train, y_train, x_test, y_test "
                "together with np.savez"
            )
        with z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise FnconvertError(
                    f"--data {path} lacks the key(s) {', '.join(missing)}; an .npz needs "
                    f"{', '.join(NPZ_KEYS)} (and optionally classes)"
                )
            arrays = {k: z[k] for k in NPZ_KEYS}
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    except FnconvertError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise FnconvertError(f"--data {path} is not a readable .npz archive ({_short(e)}); re-create it with np.savez")
    train = _make_split(arrays["x_train"], arrays["y_train"], norm, str(path), "x_train")
    test = _make_split(arrays["x_test"], arrays["y_test"], norm, str(path), "x_test")
    _check_pair(train, test, str(path))
    return Dataset(path.name, train, test, classes, {"kind": "npz", "path": str(path)})


def _check_pair(train: Split, test: Split, name: str) -> None:
    if len(train) == 0:
        raise FnconvertError(f"the training split of {name} has zero samples; fnconvert needs training data")
    if len(test) == 0:
        raise FnconvertError(f"the test split of {name} has zero samples; fnconvert needs test data to verify")
    if train.input_shape != test.input_shape:
        raise FnconvertError(
            f"{name}: train samples have shape {train.input_shape} but test samples {test.input_shape}; "
            "both splits must share one shape"
        )


_TV_CLASSES = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz"),
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte.gz and the three other MNIST files"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", "train-images-idx3-ubyte.gz and the three other files"),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("FNCONVERT_DATA_DIR", Path.home() / ".cache" / "fnconvert" / "datasets"))


def _load_torchvision(name: str, data_dir, norm, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, folder, archive = _TV_CLASSES[name]
    cls = getattr(tvd, cls_name)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()

    def open_split(train: bool):
        try:
            return cls(str(root), train=train, download=False)
        except (RuntimeError, FileNotFoundError, OSError):
            pass  # not on disk yet (or damaged): try the network below
        if not download:
            raise FnconvertError(
                f"{name} is not under {root}; put {archive} (from the official release) unpacked as "
                f"{root / folder}, or pass --data-dir"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            return cls(str(root), train=train, download=True)
        except Exception as e:  # network errors come in many types (URLError, HTTPError, socket errors)
            raise FnconvertError(
                f"could not find or download {name} into {root} ({_short(e)}); without network, put "
                f"{archive} (from the official release) unpacked as {root / folder}, or pass --data-dir"
            )

    tr, te = open_split(True), open_split(False)
    classes = list(getattr(tr, "classes", []) or []) or None
    train = _make_split(_as_numpy(tr.data), _as_numpy(tr.targets), norm, name, "train images")
    test = _make_split(_as_numpy(te.data), _as_numpy(te.targets), norm, name, "test images")
    _check_pair(train, test, name)
    return Dataset(name, train, test, classes, {"kind": "torchvision", "name": name, "root": str(root)})


def _as_numpy(a) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def _load_image_folder(path: Path, norm) -> Dataset:
    missing = [s for s in ("train", "test") if not (path / s).is_dir()]
    if missing:
        raise FnconvertError(
            f"--data {path} is a folder without {' and '.join(m + '/' for m in missing)}; an ImageFolder tree "
            "needs train/CLASS/*.png and test/CLASS/*.png"
        )
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise FnconvertError(f"--data {path}/train has no class folders; put images in train/CLASS/")
    index = {c: i for i, c in enumerate(classes)}

    def listing(split: str):
        files, labels = [], []
        for d in sorted((path / split).iterdir()):
            if not d.is_dir():
                continue
            if d.name not in index:
                raise FnconvertError(
                    f"--data {path}/{split}/{d.name} is a class not present in train/; "
                    "test classes must also exist in train/"
                )
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(index[d.name])
        return files, np.asarray(labels, dtype=np.int64)

    tr_files, tr_y = listing("train")
    te_files, te_y = listing("test")
    if not tr_files or not te_files:
        raise FnconvertError(f"--data {path}: train/ or test/ holds no images ({', '.join(IMAGE_SUFFIXES)})")
    first = _read_images([tr_files[0]])
    reader = _ImageReader(first.shape[1:])
    mean, std = norm if norm else (None, None)
    pre = Preprocessing(1 / 255, mean, std)
    train, test = Split(tr_files, tr_y, pre, reader), Split(te_files, te_y, pre, reader)
    return Dataset(path.name, train, test, classes, {"kind": "imagefolder", "path": str(path)})


class _ImageReader:
    """Decodes a batch of image files into a uint8 (b, C, H, W) array; every image must match the first one."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def __call__(self, files: Sequence[Path]) -> np.ndarray:
        arr = _read_images(files)
        if arr.shape[1:] != self.shape:
            raise FnconvertError(
                f"images in the folder differ in size: expected {self.shape} (C, H, W) like the first image; "
                "resize all images to one size"
            )
        return arr


def _read_images(files: Sequence[Path]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                mode = "L" if im.mode in ("L", "I;16", "1") else "RGB"
                out.append(np.asarray(im.convert(mode)))
        except (UnidentifiedImageError, OSError) as e:
            raise FnconvertError(f"image {f} cannot be decoded ({_short(e)}); remove or replace it")
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise FnconvertError(
            f"images in the folder differ in size ({sorted(shapes)[:3]}); resize all images to one size"
        )
    arr = np.stack(out)
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


_short = short_reason  # one implementation, in errors.py
