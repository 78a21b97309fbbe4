"""Factor decomposition of the calibration inputs (paper §3.1): mean, top-d directions V, loadings B, spectrum.

With Xc the column-centred calibration matrix, shape (n_samples, n_features) = (N, p), and its SVD
Xc = U Λ Vᵀ, the factors are ``V_d`` (p, d), the loadings ``B̂ = (ẐᵀẐ)⁻¹ẐᵀXc`` with ``Ẑ = Xc V_d`` (d, p) and the
singular values λ1..λ_{d+1}, which set the paper's adaptive rates ``α_j = α λ1²/λj²`` and ``α_ε = α λ1²/λ_{d+1}²``.

Two solvers, both streaming over row batches so the data set is never held in memory by this module:

* ``exact``: one pass accumulating the shifted column sums and the p×p Gram matrix in float64, then ``eigh``.
  Costs O(N p²) flops and O(p²) memory; it also yields the full spectrum.
* ``randomized``: block Krylov iteration (block Lanczos with full reorthogonalisation) on A = XcᵀXc, centring
  folded into the products (x·Q − 1·μᵀQ) so the data are never copied. Data passes run in the input precision
  (float32 for float32 inputs), all small-matrix algebra in float64. About 4·N·p·b flops per pass with block
  size b: a first block of about 2(d+1) columns, then blocks of 16 built from the leading estimates (see
  _block_sizes). O(p·k) memory; it stops when the predicted error of the top-d subspace and of λ1..λ_{d+1} is below
  2e-5 (goal 1e-4), switches to float64 passes where λd ≈ λ_{d+1} makes float32 rounding too coarse, and starts
  in-memory arrays from an estimate on a 2,048-row subsample (one or two passes fewer).

``method="auto"`` picks ``exact`` for p ≤ :data:`EXACT_MAX_FEATURES` and ``randomized`` above; see
docs/BENCHMARKS.md for the measurements behind the threshold.

Inputs are a 2-D array/tensor or a re-iterable of 2-D batches; with ``torch.distributed`` initialised every rank
passes its own shard and all sums are all-reduced in float64, so every rank returns the same :class:`Factors`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import io
import json
import math
import os
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import FnconvertError

__all__ = ["Factors", "fit_factors", "EXACT_MAX_FEATURES", "ARRAY_KEYS"]

#: The float64 arrays every factors file holds, by exactly these names.
ARRAY_KEYS = ("mean", "V", "B", "singular_values")
METHODS = ("auto", "exact", "randomized")
FORMAT_TAG = "fnconvert-factors"
FORMAT_VERSION = "1"

#: ``method="auto"`` uses the exact Gram solver up to this many features, the randomized one above. Measured on
#: 2 cores (docs/BENCHMARKS.md, CIFAR-10 pixel crops, d = 1): the float64 Gram + eigh costs ~N·p², 0.09 s on
#: 5,000 rows and 0.51 s on 50,000 at p = 512 (randomized: 0.01 s / 0.09 s), but 0.36 s / 1.8 s at p = 1,024 and
#: 2.2 s / 7.3 s at p = 2,048. Up to 512 exactness, one pass and the full spectrum cost at most half a second.
EXACT_MAX_FEATURES = 512

# Randomized solver settings (see _fit_randomized).
_TOL = 2e-5  # target for the estimated sine of the subspace error and the relative eigenvalue error (goal: 1e-4)
_TOL_CLUSTER = 1e-2  # relative error of λ²_{d+1} accepted when it sits in a flat cluster (see _fit_randomized)
_BLOCK: int | None = None  # first block size override (benchmarks); default from d, see _fit_randomized
_EXTEND: int | None = None  # later block size override (benchmarks; 0 = full Krylov blocks); see _fit_randomized
_MAX_PASSES = 16  # data passes before giving up (with a warning) on convergence
_BASIS_BYTES = 192 * 2**20  # float64 Krylov basis + its image; the basis restarts when it would outgrow this
_CHUNK_BYTES = 32 * 2**20  # row chunk for in-memory arrays: big enough for efficient GEMMs, small next to the data
_PAD_COLUMNS = 16  # CPU passes multiply blocks padded to a multiple of this many columns (see _SketchPass.run)
_FLUSH_ROWS = 8192  # rows accumulated in the work precision before a float64 flush
# float32 data passes resolve singular values down to ~3e-4·λ1 (measured on rank-3 data: λ4/λ1 came out
# 0.7–2.9e-4); below this threshold a float64 refinement pass decides whether λ_{d+1} is really zero.
_RANK_RTOL_FLOAT32 = 2e-3
# Switch to float64 passes when eps32·λ1²/(λd² − λ²_{d+1}) exceeds this. The float32 error of the subspace measured
# 0.001–0.15× that quantity (150 planted problems; CIFAR-10 crops with λ10/λ11 = 1.02–1.04: 0.001–0.09), so below
# 3e-4 it stays under 5e-5, half the 1e-4 goal. CIFAR-10 at d = 10 sits at 2.7e-5 (λ10/λ11 = 1.047).
_ESCALATE = 3e-4
_CENTRE_EXPLICITLY = 8.0  # above this ‖mean‖ / rms‖x − mean‖ the passes subtract the mean instead of folding it in


# ================================================================================================================
# The result


@dataclass(frozen=True, eq=False, repr=False)
class Factors:
    """The fitted factors; all arrays float64.

    Shapes: ``mean`` (p,), ``V`` (p, d) orthonormal columns, ``B`` (d, p), ``singular_values`` (d+1,) — the
    singular values λ1..λ_{d+1} of the centred calibration matrix (not divided by √N).
    """

    mean: np.ndarray
    V: np.ndarray
    B: np.ndarray
    singular_values: np.ndarray
    n_samples: int
    total_sum_squares: float
    method: str

    def __post_init__(self) -> None:
        # Coerce once, so every consumer (surgery, export, ONNX) sees contiguous float64 arrays of the right shape.
        for key in ARRAY_KEYS:
            value = getattr(self, key)
            try:
                arr = np.ascontiguousarray(np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError) as exc:
                raise FnconvertError(f"Factors.{key} is not a float array: {exc}") from None
            object.__setattr__(self, key, arr)
        mean, V, B, sv = self.mean, self.V, self.B, self.singular_values
        if mean.ndim != 1 or V.ndim != 2 or V.shape[0] != mean.shape[0] or V.shape[1] < 1:
            raise FnconvertError(f"Factors shapes do not fit: mean {mean.shape}, V {V.shape}; expected (p,) and (p, d)")
        p, d = V.shape
        if B.shape != (d, p):
            raise FnconvertError(f"Factors.B has shape {B.shape}; expected (d, p) = {(d, p)}")
        if sv.shape != (d + 1,):
            raise FnconvertError(f"Factors.singular_values has shape {sv.shape}; expected (d+1,) = {(d + 1,)}")
        for key in ARRAY_KEYS:
            if not np.isfinite(getattr(self, key)).all():
                raise FnconvertError(f"Factors.{key} holds NaN or inf")
        object.__setattr__(self, "n_samples", int(self.n_samples))
        object.__setattr__(self, "total_sum_squares", float(self.total_sum_squares))
        object.__setattr__(self, "method", str(self.method))

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def d(self) -> int:
        return int(self.V.shape[1])

    @property
    def p(self) -> int:
        return int(self.V.shape[0])

    def explained_variance_ratio(self) -> np.ndarray:
        """(d+1,) λ_j² / ‖Xc‖_F²: the share of the total variance along each of the first d+1 directions."""
        if self.total_sum_squares <= 0:
            return np.zeros_like(self.singular_values)
        return self.singular_values**2 / self.total_sum_squares

    def lr_multipliers(self) -> tuple[list[float], float]:
        """The paper's adaptive rates relative to α: ([λ1²/λj² for j = 1..d], λ1²/λ_{d+1}²)."""
        s2 = self.singular_values**2
        return [float(s2[0] / v) for v in s2[:-1]], float(s2[0] / s2[-1])

    def __repr__(self) -> str:
        sv = np.array2string(self.singular_values, precision=5, separator=", ")
        return (f"Factors(d={self.d}, p={self.p}, n_samples={self.n_samples}, method={self.method!r}, "
                f"singular_values={sv})")

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (.safetensors or .npz) atomically; the same Factors always gives the same bytes."""
        path = Path(path)
        suffix = path.suffix.lower()
        arrays = {k: getattr(self, k) for k in ARRAY_KEYS}
        meta = {
            "format": FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "n_samples": str(self.n_samples),
            "total_sum_squares": repr(self.total_sum_squares),  # repr round-trips a float exactly
            "method": self.method,
        }
        if suffix == ".safetensors":
            payload = _safetensors_bytes(arrays, meta)
        elif suffix == ".npz":
            payload = _npz_bytes(arrays, meta)
        else:
            raise FnconvertError(f"factors file {path} must end in .safetensors or .npz (got {path.suffix!r})")
        _write_atomic(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Factors":
        """Read a file written by :meth:`save`; a missing, corrupt or incomplete file raises FnconvertError."""
        path = Path(path)
        if not path.is_file():
            raise FnconvertError(f"factors file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            arrays, meta = _read_safetensors(path)
        elif suffix == ".npz":
            arrays, meta = _read_npz(path)
        else:
            raise FnconvertError(f"factors file {path} must end in .safetensors or .npz (got {path.suffix!r})")
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        if missing:
            held = ", ".join(sorted(arrays)) or "no arrays"
            raise FnconvertError(f"factors file {path} lacks {', '.join(missing)} (it holds {held}); "
                                 f"write it again with fnconvert factors")
        for k in ARRAY_KEYS:
            if arrays[k].dtype != np.float64:
                raise FnconvertError(f"factors file {path}: {k} is {arrays[k].dtype}, expected float64")
        try:
            n_samples = int(meta.get("n_samples", "0"))
            tss = float(meta.get("total_sum_squares", "nan"))
        except ValueError as exc:
            raise FnconvertError(f"factors file {path} has unreadable metadata: {exc}") from None
        if not math.isfinite(tss):  # an older or foreign file: Σλ² over what it holds is a lower bound
            tss = float(np.sum(arrays["singular_values"] ** 2))
        try:
            return cls(arrays["mean"], arrays["V"], arrays["B"], arrays["singular_values"], n_samples, tss,
                       meta.get("method", "unknown"))
        except FnconvertError as exc:
            raise FnconvertError(f"factors file {path} is inconsistent: {exc.message}") from None


# ---------------------------------------------------------------------------------------------------- file formats


def _write_atomic(path: Path, payload: bytes) -> None:
    # A crash mid-write must never leave a half file under the final name: write a sibling, fsync, rename.
    if not path.parent.is_dir():
        raise FnconvertError(f"cannot write {path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _safetensors_bytes(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    # Written by hand because safetensors' own writer orders the metadata map differently from run to run
    # (a Rust HashMap), which would break byte-identical files. The layout is the documented one:
    # u64 little-endian header length, JSON header (space-padded to 8 bytes), then the raw little-endian data.
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f8")
        raw = a.tobytes()
        header[name] = {"dtype": "F64", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, or ValueError on bad bytes
        raise FnconvertError(f"factors file {path} is not a readable safetensors file ({_one_line(exc)}); "
                             f"write it again with fnconvert factors") from None
    return arrays, meta


def _npz_bytes(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    # np.savez stamps each member with the current time; a fixed timestamp makes the bytes reproducible.
    items: list[tuple[str, np.ndarray]] = [(k, np.ascontiguousarray(arrays[k], dtype="<f8")) for k in ARRAY_KEYS]
    items += [(f"meta_{k}", np.array(v, dtype="<U")) for k, v in sorted(meta.items())]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in items:
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                value = z[name]
                if name.startswith("meta_"):
                    meta[name[5:]] = str(value.item() if value.shape == () else value)
                else:
                    arrays[name] = value
    except Exception as exc:  # BadZipFile, ValueError (pickled object), EOFError, OSError...
        raise FnconvertError(f"factors file {path} is not a readable .npz file ({_one_line(exc)}); "
                             f"write it again with fnconvert factors") from None
    return arrays, meta


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


# ================================================================================================================
# Fitting: public entry point, parameter validation


def fit_factors(X_or_batches, d: int, *, method: str = "auto", device="auto", seed: int = 0) -> Factors:
    """Fit the top-``d`` factors of the calibration inputs.

    ``X_or_batches``: a 2-D array or tensor (n_samples, n_features), or a re-iterable of such batches (a list, a
    DataLoader, any object whose ``__iter__`` restarts; a batch may be an ``(inputs, targets)`` tuple). The
    randomized method reads the data several times and needs the same rows each time (their order may change).
    ``method``: "auto" | "exact" | "randomized"; ``device``: "auto" | "cpu" | "cuda" (or a torch.device).
    """
    factors, _ = fit_factors_with_spectrum(X_or_batches, d, method=method, device=device, seed=seed)
    return factors


@dataclass(frozen=True)
class Spectrum:
    """Every singular value a fit determined, for ``inspect``: the full spectrum (``complete``) from the exact
    solver, the leading ones of the Krylov space from the randomized one."""

    singular_values: np.ndarray  # descending, float64, as computed (values ≤ rank_tolerance·λ1 are noise)
    complete: bool
    rank: int  # numerical rank among the values known (exact: of Xc; randomized: a lower bound when complete=False)
    rank_tolerance: float  # relative to λ1: values ≤ rank_tolerance·λ1 count as zero
    passes: int = 1  # data passes the solver made
    estimated_error: float = 0.0  # randomized: predicted sine of the subspace error at exit (0 for exact)


def fit_factors_with_spectrum(X_or_batches, d: int, *, method: str = "auto", device="auto", seed: int = 0,
                              check_rank: bool = True,
                              exact_max_features: int = EXACT_MAX_FEATURES) -> tuple[Factors, Spectrum]:
    """:func:`fit_factors`, also returning every singular value the solver determined (used by ``inspect``).

    ``check_rank=False`` accepts d ≥ rank (the spectrum is still right; B falls back to Vᵀ), for reporting;
    ``exact_max_features`` moves the "auto" threshold (inspect wants the full spectrum where it is affordable).
    """
    d, method, dev, seed = _check_params(d, method, device, seed)
    source = _Source(X_or_batches)
    comm = _Comm()
    return _fit(source, d, method, dev, seed, comm, check_rank, exact_max_features)


def _check_params(d, method, device, seed):
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise FnconvertError(f"d={d!r} must be an integer ≥ 1 (the number of factors)")
    d = int(d)
    if d < 1:
        raise FnconvertError(f"d={d} must be at least 1; choose --factors 1 or more")
    if not isinstance(method, str) or method not in METHODS:
        raise FnconvertError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise FnconvertError(f"seed={seed!r} must be an integer")
    return d, method, _resolve_device(device), int(seed)


def _resolve_device(device):
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise FnconvertError(f"device={device!r} is unknown; choose auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise FnconvertError(f"device={device!r} is unsupported; choose auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FnconvertError(f"device={device!r} was asked for but torch.cuda.is_available() is False; "
                             f"use device='cpu' or 'auto'")
    return dev


# ================================================================================================================
# Data access: one object that yields validated 2-D torch batches, pass after pass


class _Source:
    """Wraps an array or a re-iterable of batches; :meth:`batches` yields validated 2-D tensors of one pass."""

    def __init__(self, obj):
        import torch

        self.array = None
        self.iterable = None
        self.p: int | None = None
        self.dtype = None  # torch dtype of the first batch, after casting non-float inputs to float32
        self.passes_started = 0
        if isinstance(obj, (np.ndarray, torch.Tensor)):
            if obj.ndim != 2:
                raise FnconvertError(
                    f"X has shape {tuple(obj.shape)}; fit_factors needs a 2-D array (n_samples, n_features): "
                    f"flatten each sample first, e.g. x.reshape(len(x), -1)")
            _check_dtype(obj.dtype, "X")
            self.array = obj
        elif isinstance(obj, (str, bytes, os.PathLike, dict)) or not isinstance(obj, collections.abc.Iterable):
            raise FnconvertError(
                f"X_or_batches is a {type(obj).__name__}; pass a 2-D array/tensor (n_samples, n_features) or a "
                f"re-iterable of 2-D batches (a list, a DataLoader)")
        else:
            self.iterable = obj
        # A generator or other iterator can be read once only; the randomized solver needs several passes.
        self.one_shot = isinstance(obj, collections.abc.Iterator)

    @property
    def in_memory(self) -> bool:
        return self.array is not None

    def batches(self, device, dtype=None) -> Iterator[tuple[int, Any]]:
        """Yield (first_row_index, batch) for one pass; batch is a (b, p) tensor on ``device`` in ``dtype``
        (the batch's own float dtype when None; non-float inputs become float32)."""
        import torch

        if self.passes_started and self.one_shot:
            raise FnconvertError(
                "X_or_batches is a one-shot iterator (e.g. a generator) but this fit reads the data several "
                "times; pass a list of batches or an object whose __iter__ restarts (a DataLoader), or use "
                "method='exact', which reads it once")
        self.passes_started += 1
        row = 0
        if self.array is not None:
            arr = self.array
            p = arr.shape[1]
            itemsize = 8 if arr.dtype in (np.float64, torch.float64) else 4
            step = max(64, _CHUNK_BYTES // max(1, p * itemsize))
            for start in range(0, arr.shape[0], step):
                x = self._prepare(arr[start : start + step], device, dtype, where="X")
                yield row, x
                row += x.shape[0]
            return
        for i, item in enumerate(self.iterable):
            x = item
            if isinstance(x, (tuple, list)):
                if len(x) == 0:
                    raise FnconvertError(f"batch {i} is an empty {type(x).__name__}; yield a 2-D array or "
                                         f"an (inputs, targets) tuple")
                x = x[0]
            if not isinstance(x, (np.ndarray, torch.Tensor)):
                raise FnconvertError(f"batch {i} is a {type(x).__name__}; yield 2-D arrays/tensors or "
                                     f"(inputs, targets) tuples whose first element is one")
            if x.ndim != 2:
                raise FnconvertError(
                    f"batch {i} has shape {tuple(x.shape)}; fit_factors needs 2-D batches (n_samples, n_features): "
                    f"flatten each sample first, e.g. x.flatten(1)")
            _check_dtype(x.dtype, f"batch {i}")
            if x.shape[0] == 0:
                continue
            x = self._prepare(x, device, dtype, where=f"batch {i}")
            yield row, x
            row += x.shape[0]

    def _prepare(self, x, device, dtype, where: str):
        import torch

        if isinstance(x, np.ndarray):
            with warnings.catch_warnings():  # read-only arrays (np.load mmap) are fine: nothing here writes to them
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(np.ascontiguousarray(x))
        else:
            x = x.detach()
        if self.p is None:
            self.p = int(x.shape[1])
            self.dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        elif x.shape[1] != self.p:
            raise FnconvertError(f"{where} has {x.shape[1]} features but earlier batches have {self.p}; every batch "
                                 f"needs the same n_features")
        target = dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
        return x.to(device=device, dtype=target, non_blocking=True)


def _check_dtype(dtype, where: str) -> None:
    import torch

    kind = np.dtype(dtype).kind if isinstance(dtype, np.dtype) else (
        "c" if dtype.is_complex else "f" if dtype.is_floating_point else "b" if dtype == torch.bool else "i")
    if kind not in "fiub":
        raise FnconvertError(f"{where} has dtype {dtype}; fit_factors needs real numbers (float32 or float64)")


def _first_bad_row(x) -> tuple[int, str] | None:
    """Index within the batch of the first row holding NaN or ±inf, and what it holds."""
    import torch

    bad_rows = ~torch.isfinite(x).all(dim=1)
    if not bool(bad_rows.any()):
        return None
    i = int(torch.nonzero(bad_rows)[0, 0])
    row = x[i]
    what = "NaN" if bool(torch.isnan(row).any()) else "inf"
    return i, what


# ================================================================================================================
# Distributed: every sum goes through here


class _Comm:
    """All-reduce (sum) across ranks when torch.distributed is initialised; a no-op otherwise."""

    def __init__(self):
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized()
        self.dist = dist if self.active else None
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def sum_(self, t):
        """Sum ``t`` over ranks, in place, in float64 (returns t)."""
        if not self.active:
            return t
        import torch

        comm_dev = torch.device("cuda", torch.cuda.current_device()) if self.dist.get_backend() == "nccl" else t.device
        buf = t.to(device=comm_dev, dtype=torch.float64)
        self.dist.all_reduce(buf)
        t.copy_(buf)
        return t

    def max_(self, t):
        if not self.active:
            return t
        import torch

        comm_dev = torch.device("cuda", torch.cuda.current_device()) if self.dist.get_backend() == "nccl" else t.device
        buf = t.to(device=comm_dev, dtype=torch.float64)
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.MAX)
        t.copy_(buf)
        return t

    def where(self) -> str:
        return f" of rank {self.rank}'s shard" if self.active else ""


class _PassError:
    """Holds the first user error of a pass so that, distributed, every rank raises together instead of the
    healthy ranks hanging in the next all-reduce."""

    def __init__(self, comm: _Comm, device):
        self.comm, self.device, self.error = comm, device, None

    def guard(self, fn: Callable[[], Any]):
        if self.error is None:
            try:
                return fn()
            except FnconvertError as exc:
                self.error = exc
        return None

    def raise_if_any(self) -> None:
        import torch

        flag = torch.tensor([1.0 if self.error is not None else 0.0], dtype=torch.float64, device=self.device)
        self.comm.max_(flag)
        if self.error is not None:
            raise self.error
        if flag.item() > 0:
            raise FnconvertError("another rank found invalid calibration data (see its error); no factors were fit")


# ================================================================================================================
# The fit


def _fit(source: _Source, d: int, method: str, dev, seed: int, comm: _Comm, check_rank: bool = True,
         exact_max_features: int = EXACT_MAX_FEATURES) -> tuple[Factors, Spectrum]:
    import torch

    full = torch.get_num_threads()
    with torch.no_grad(), _threads(dev, 1):  # see _threads: only chunk-sized work gets all threads
        it = source.batches(dev)
        first = _agree_on_first_batch(it, source, dev, comm)  # (row, batch) or None; sets source.p everywhere
        p = source.p
        if d >= p:
            raise FnconvertError(f"d={d} must be below the number of features p={p}; choose --factors between 1 "
                                 f"and {p - 1}")
        chosen = method if method != "auto" else ("exact" if p <= exact_max_features else "randomized")
        if chosen == "exact":
            _check_gram_fits(p, dev, method)
            return _fit_exact(it, first, source, d, p, dev, comm, check_rank, full)
        if source.one_shot:
            raise FnconvertError(
                f"method={method!r} needs several passes over the data (p={p} features) but X_or_batches is a "
                f"one-shot iterator (e.g. a generator); pass a list or an object whose __iter__ restarts "
                f"(a DataLoader), or use method='exact'")
        return _fit_randomized(it, first, source, d, p, dev, seed, comm, check_rank, full)


def _check_gram_fits(p: int, dev, method: str) -> None:
    """The exact solver holds the p×p float64 Gram matrix about three times over (Gram, symmetrised copy,
    eigenvectors); refuse up front rather than fail inside an allocation."""
    import torch

    need = 3 * 8 * p * p
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not on Linux: let the allocation decide
            return
    if need > free:
        raise FnconvertError(
            f"method={method!r} with p={p} features needs ~{need / 2**30:.1f} GiB for the p×p Gram matrix but "
            f"{free / 2**30:.1f} GiB is free on {dev.type}; use method='randomized' (O(p·k) memory)")


def _agree_on_first_batch(it, source: _Source, dev, comm: _Comm):
    """Pull the first non-empty batch (which sets p and the dtype); distributed, check that every rank has the
    same p. Ranks without data are allowed (their shard is empty)."""
    import torch

    errors = _PassError(comm, dev)
    first = errors.guard(lambda: next(it, None))
    errors.raise_if_any()
    has = source.p is not None
    info = torch.tensor([float(source.p or 0), -float(source.p or 2**52), 1.0 if has else 0.0],
                        dtype=torch.float64, device=dev)
    comm.max_(info)
    p_max, p_min, any_data = int(info[0]), int(-info[1]), info[2] > 0
    if not any_data:
        raise FnconvertError("the calibration data holds no samples (0 rows); pass at least d + 2 samples")
    if p_max != p_min:
        raise FnconvertError(f"ranks disagree on n_features: this rank has {source.p}, others up to {p_max} and "
                             f"down to {p_min}; every rank needs the same features")
    source.p = p_max
    if not has:
        source.dtype = torch.float32
    return first


def _agree_on_shift(first, p: int, dev, comm: _Comm):
    """The centring shift: the mean of the first batch (averaged over ranks), in float64. Accumulating around it
    instead of around 0 avoids cancellation when the data sit far from the origin (e.g. pixels in [0, 255])."""
    import torch

    acc = torch.zeros(p + 1, dtype=torch.float64, device=dev)
    if first is not None:
        x = first[1]
        x = x[:256]  # any point near the data does; a few hundred rows tell where they sit
        acc[:p] = x.sum(0).to(torch.float64) / x.shape[0]  # (a float64-accumulating sum is 10× slower)
        acc[p] = 1.0
    comm.sum_(acc)
    return acc[:p] / acc[p]


def _check_finite_batch(x, row0: int, colsum, comm: _Comm):
    """Column sums are computed anyway; a non-finite total is the cheap sign of NaN/inf, then locate the row."""
    if math.isfinite(float(colsum.sum())):
        return
    bad = _first_bad_row(x)
    if bad is not None:
        i, what = bad
        raise FnconvertError(f"sample {row0 + i}{comm.where()} holds {what}; clean the data or drop that sample")


def _fit_exact(it, first, source: _Source, d: int, p: int, dev, comm: _Comm, check_rank: bool = True,
               threads: int = 1) -> tuple[Factors, Spectrum]:
    """One streaming pass: shifted column sums and Gram matrix in float64, then eigh of the centred Gram."""
    import torch

    shift = _agree_on_shift(first, p, dev, comm)
    gram = torch.zeros(p, p, dtype=torch.float64, device=dev)
    colsum = torch.zeros(p, dtype=torch.float64, device=dev)
    n = torch.zeros(1, dtype=torch.float64, device=dev)
    errors = _PassError(comm, dev)

    def consume(row0, x):
        with _threads(dev, threads):
            xs = x.to(torch.float64) - shift
            s = xs.sum(0)
            gram.addmm_(xs.T, xs)
        _check_finite_batch(x, row0, s, comm)
        colsum.add_(s)
        n.add_(xs.shape[0])

    def run():
        if first is not None:
            consume(*first)
        for row0, x in it:
            consume(row0, x)

    errors.guard(run)
    errors.raise_if_any()
    for t in (gram, colsum, n):
        comm.sum_(t)
    N = int(n.item())
    m = colsum / N  # mean of the shifted data: small, so the rank-1 correction below loses nothing
    gram.sub_(torch.outer(m, m), alpha=N)
    gram = (gram + gram.T) / 2
    mean = shift + m
    tss = float(torch.trace(gram).clamp_min(0))
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    sv = evals.clamp_min(0).sqrt()
    rtol = _exact_rank_rtol(p)
    rank = _numerical_rank(sv, rtol)
    _check_rank(d, rank, p, N, sv, rtol, check_rank)
    V = _sign_fix(evecs[:, :d])
    # B̂ = (ẐᵀẐ)⁻¹ẐᵀXc with Ẑ = Xc V: from the Gram G = XcᵀXc this is (VᵀGV)⁻¹ VᵀG.
    GV = gram @ V
    B = torch.linalg.solve(V.T @ GV, GV.T) if d < rank else V.T.clone()
    factors = Factors(_np(mean), _np(V), _np(B), _np(sv[: d + 1]), N, tss, "gram-eigh")
    spectrum = Spectrum(_np(sv[: min(N, p)]), True, rank, rtol)
    return factors, spectrum


def _exact_rank_rtol(p: int) -> float:
    """Eigenvalues of a float64 Gram matrix carry absolute errors ~ p·eps·λ1², so a singular value below
    ~√(p·eps)·λ1 is noise (4e-6·λ1 at p = 784, 8e-6 at 3,072); (λ1/λ_{d+1})² beyond 1e10 is no usable rate."""
    return max(1e-7, 10.0 * math.sqrt(p * float(np.finfo(np.float64).eps)))


def _numerical_rank(sv, rtol: float) -> int:
    if sv.numel() == 0 or float(sv[0]) <= 0:
        return 0
    return int((sv > rtol * sv[0]).sum())


def _check_rank(d: int, rank: int, p: int, N: int, sv, rtol: float, enforce: bool) -> None:
    if N < 2:
        raise FnconvertError(f"the calibration data holds {N} sample; d={d} needs at least d + 2 = {d + 2}")
    if rank == 0:
        raise FnconvertError(f"the calibration data has no variance: all {N} samples are identical "
                             f"(p={p}); use varied samples")
    if d >= rank and enforce:
        fix = (f"choose --factors between 1 and {rank - 1}" if rank >= 2
               else "it holds a single direction of variation, so no residual is left; use more varied samples")
        raise FnconvertError(
            f"d={d} must be below the rank of the calibration data (rank {rank}, p={p}, n_samples={N}); {fix} "
            f"(λ{d + 1}/λ1 = {float(sv[d] / sv[0]):.1e} ≤ {rtol:.0e} counts as zero)")


def _sign_fix(V):
    """svd_flip-style: the largest-|·| entry of each column is positive, so results do not depend on the solver."""
    import torch

    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    signs[signs == 0] = 1
    return V * signs


def _np(t) -> np.ndarray:
    return t.detach().to("cpu", dtype=t.dtype).numpy().astype(np.float64, copy=True)


# ---------------------------------------------------------------------------------------------------- randomized


class _SketchPass:
    """One data pass computing A·Q for A = XcᵀXc and a block Q (p, b), without forming Xc.

    Two ways to centre, chosen once per fit:

    * implicit (the default): Y = x·Q − 1·cᵀ with c = shiftᵀQ, and Z = Σ xᵀY. No copy of the data; the result
      is exact up to a rank-1 term fixed in :meth:`to_AQ`. Fine while ‖shift‖ is within a few times the spread
      of the data (CIFAR-10 pixels: 2×), since float32 products then lose at most a few bits;
    * explicit (data far from the origin): each batch is shifted into a reused buffer first.

    The products run in the work precision (float32 for float32 data, accumulated in float32 over at most
    _FLUSH_ROWS rows); sums and everything after the pass are float64.
    """

    def __init__(self, source: _Source, p: int, dev, work, comm: _Comm, threads: int = 1):
        self.source, self.p, self.dev, self.work, self.comm = source, p, dev, work, comm
        self.threads = threads  # for the chunk-sized work; the rest runs single-threaded (see _threads)

    def run(self, Q, shift, explicit: bool, batches=None, first=None, first_pass: bool = False):
        """One pass. Returns (Z (p, b), colsum = Σ(x − shift) (p,), [rows, Σ‖x − shift‖²]); the last two are
        filled on the first pass only, whose batches also get the NaN/inf check. Pass Z to :meth:`to_AQ`."""
        import torch

        p, b = self.p, Q.shape[1]
        Qw = Q.to(self.work)
        shift_w = shift.to(self.work)
        cQ = (shift @ Q).to(self.work)  # shiftᵀQ in float64, rounded once
        self._Qw64, self._c64, self._explicit = Qw.to(torch.float64), cQ.to(torch.float64), explicit
        self._shift = shift_w.to(torch.float64)  # the shift as actually subtracted (explicit mode)
        if self.dev.type == "cpu" and b % _PAD_COLUMNS:
            # Zero columns up to a multiple of 16: MKL runs the skinny GEMMs of a pass 1.3–3.5× slower at
            # other widths (50k×3,072 float32, 2 cores: 0.45 s at 8 columns, 0.40 s at 11, 0.13 s at 16).
            b = -(-b // _PAD_COLUMNS) * _PAD_COLUMNS
            Qw = torch.cat([Qw, Qw.new_zeros(p, b - Qw.shape[1])], 1)
            cQ = torch.cat([cQ, cQ.new_zeros(b - cQ.shape[0])])
        Z = torch.zeros(p, b, dtype=torch.float64, device=self.dev)
        Zw = torch.zeros(p, b, dtype=self.work, device=self.dev)
        colsum = torch.zeros(p, dtype=torch.float64, device=self.dev)
        stats = torch.zeros(2, dtype=torch.float64, device=self.dev)  # rows, Σ‖x − shift‖²
        sumsq = torch.zeros((), dtype=torch.float64, device=self.dev)
        rows = pending = 0
        buf = None
        errors = _PassError(self.comm, self.dev)

        def consume(row0, x):
            # Few, large ops per batch: on a busy CPU every small op costs a thread hand-off.
            nonlocal rows, pending, buf
            x = x.to(self.work)  # no-op unless a batch came in another dtype than the first
            if explicit:
                # Subtract into a reused buffer: a fresh chunk per batch costs more than the GEMMs.
                if buf is None or buf.shape[0] < x.shape[0]:
                    buf = torch.empty_like(x)
                xs = torch.sub(x, shift_w, out=buf[: x.shape[0]])
                Zw.addmm_(xs.T, xs @ Qw)
            else:
                xs = x
                Zw.addmm_(x.T, torch.addmm(cQ, x, Qw, beta=-1))  # xᵀ(x·Q − 1·cᵀ)
            if first_pass:
                s = _colsum(xs)  # Σ(x − shift) if explicit, Σx if not
                norms = torch.linalg.vector_norm(xs, dim=1)
                _check_finite_batch(x, row0, s, self.comm)
                colsum.add_(s)
                sumsq.add_(norms.to(torch.float64).square().sum())
            rows += x.shape[0]
            pending += x.shape[0]
            if pending >= _FLUSH_ROWS:
                Z.add_(Zw)
                Zw.zero_()
                pending = 0

        def loop():
            # All threads for the whole pass (switching per batch cost ~10 ms a fit): the batch-sized work is
            # parallel, and the few small ops per batch stay under torch's grain size, so they run serially.
            with _threads(self.dev, self.threads):
                if first is not None:
                    consume(*first)
                for row0, x in batches if batches is not None else self.source.batches(self.dev, self.work):
                    consume(row0, x)

        errors.guard(loop)
        errors.raise_if_any()
        Z.add_(Zw)
        stats[0] = rows
        if first_pass:
            if explicit:
                stats[1] = sumsq
            else:
                # Σ‖x − s‖² = Σ‖x‖² − 2 sᵀΣx + N‖s‖²: cancellation costs log2(1 + (‖s‖/spread)²) ≤ 6 bits
                # here (implicit mode is only chosen when ‖s‖ ≤ 8·spread), on per-row float32 norms.
                stats[1] = sumsq - 2 * (shift @ colsum) + rows * (shift @ shift)
                colsum.sub_(shift, alpha=rows)  # Σx → Σ(x − shift)
        Z = Z[:, : Q.shape[1]].contiguous()
        for t in (Z, colsum, stats):
            self.comm.sum_(t)
        if not math.isfinite(float(Z.sum())):  # NaN/inf propagate into the sum; one scalar to check
            raise FnconvertError("a data pass produced NaN or inf: the batches changed between passes or hold "
                                 "values too large for float32; pass float64 data")
        return Z, colsum, stats

    def to_AQ(self, Z, mean, n: int):
        """A·Q from the raw pass result, given the exact mean μ.

        Explicit: Z = (X − 1sᵀ)ᵀ(X − 1sᵀ)Q = XcᵀXcQ + N m mᵀQ with m = μ − s.
        Implicit: Z = Σ xᵀ(xQ − cᵀ) = XᵀXQ − N μ cᵀ, while A·Q = XᵀXQ − N μ μᵀQ, so add N μ (c − μᵀQ)ᵀ. Here c
        is shiftᵀQ as rounded to the work precision, the Q that multiplied the data is Q rounded too, and the
        correction uses both as they were: the rounding of c is the same for every row, so left alone it would
        add up to a ~1e-5 relative error."""
        import torch

        Qw = self._Qw64
        if self._explicit:
            m = mean - self._shift
            return Z - n * torch.outer(m, m @ Qw)
        return Z + n * torch.outer(mean, self._c64 - mean @ Qw)


def _colsum(x):
    """Σ over rows in float64, from float32 sums over 64-row slices. A float64-accumulating torch.sum is ~10×
    slower; one float32 sum over thousands of uncentred rows loses ~5e-8 relative. Slices of 64 keep the mean
    within 1e-8 (CIFAR-10: 1.5e-8 on 3,000 rows, 3.6e-9 on 50,000) for 1.1× the time of a plain sum. One
    reduction over a (rows/64, 64, p) view instead of a sum per slice: a Python loop of small ops cost 2× more."""
    import torch

    n, p = x.shape
    m = n - n % 64
    total = x[:m].reshape(-1, 64, p).sum(1).to(torch.float64).sum(0)
    if m < n:
        total += x[m:].sum(0).to(torch.float64)
    return total


def _orth_block(W, basis, tol: float, scale: float | None = None):
    """Orthonormalise the block W (p, b) against the orthonormal ``basis`` (p, m) and itself, dropping directions
    whose norm after projection is ≤ tol × ``scale`` (default: the largest column norm of W): they are already in
    the space, or too small to matter."""
    import torch

    if scale is None:
        scale = float(torch.linalg.vector_norm(W, dim=0).max()) if W.numel() else 0.0
    if scale == 0.0 or not W.numel():
        return W[:, :0]
    W = W / scale
    # Block Gram–Schmidt twice (Kahan–Parlett "twice is enough"), the rank decision between the two projections:
    # after one, W keeps basis components of only ~eps, far under tol, so the kept singular values are right; the
    # second projection removes those components, which the normalisation below magnified by at most 1/tol.
    if basis is not None and basis.shape[1]:
        W = W - basis @ (basis.T @ W)
    if tol >= 1e-6:
        # Rank-revealing eigh of the Gram WᵀW, largest first: its rounding, eps·‖W‖², hides only directions below
        # √eps ≈ 1e-8, far under tol, and it costs a third of an SVD of W (3,072 × 64: 1.7 vs 5.3 ms).
        s2, V = torch.linalg.eigh(W.T @ W)
        keep = (s2 > tol * tol).flip(0)
        s2, V = s2.flip(0)[keep], V.flip(1)[:, keep]
        U = W @ (V / s2.sqrt())
    else:
        # Rank-revealing SVD: a Gram matrix would hide the directions below √eps that this tolerance keeps.
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        U = U[:, S > tol]
    if U.shape[1] == 0:
        return U
    if basis is not None and basis.shape[1]:
        U = U - basis @ (basis.T @ U)
    # Cholesky QR: U is orthonormal to ~eps/tol² already, so one step restores it to rounding. Column order (most
    # significant first) is kept, which the callers rely on when they cut a block short.
    L = torch.linalg.cholesky(U.T @ U)
    return torch.linalg.solve_triangular(L, U.T, upper=False).T


@contextlib.contextmanager
def _threads(dev, n: int):
    """Run the block with ``n`` torch CPU threads (no-op on GPU or when already so).

    A fit runs single-threaded except for the chunk-sized work of a data pass (the GEMMs and reductions over a
    batch), which gets all threads. Everything else handles p×b or k×k matrices, far too small to split: with
    OpenMP threads on a busy 2-core machine three such ops took 31 ms instead of 0.3 ms (each parallel region
    waits for a descheduled thread), and an SVD of 120×120 0.6 s instead of 2 ms. Switching costs ~0.3 µs."""
    import torch

    old = torch.get_num_threads()
    if dev.type != "cpu" or old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit_randomized(it, first, source: _Source, d: int, p: int, dev, seed: int, comm: _Comm,
                    check_rank: bool = True, threads: int = 1) -> tuple[Factors, Spectrum]:
    import torch

    work = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    eps = float(torch.finfo(work).eps)
    # Block sizes: b columns in the first pass (the d + 1 wanted values plus oversampling), r in later ones.
    b, r = _block_sizes(d, p)
    m_max = min(p, (_MAX_PASSES + 1) * b, max(2 * b, _BASIS_BYTES // (16 * p)))
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same start on every device and rank
    omega = torch.randn(p, b, generator=gen, dtype=torch.float64).to(dev)
    Q = _orth_block(omega, None, 1e-6)  # a Gaussian block is well conditioned: the cheap Gram path suffices
    # In-memory data: start from a cheap estimate on a row subsample instead of the random block (saves 1–2 of
    # the 3–5 passes on CIFAR-10); its estimate also seeds the convergence history.
    warm = None if comm.active else _warm_start(source, Q, d, dev, work, threads)
    if warm is not None:
        Q, warm = warm

    # The passes subtract the shift in the work precision, so the shift must be exactly representable there,
    # else mean = shift + Σ(x − shift)/N would be off by the rounding of the shift (3e-8 for values near 0.5).
    shift = _agree_on_shift(first, p, dev, comm).to(work).to(torch.float64)
    sketch = _SketchPass(source, p, dev, work, comm, threads)

    # Pass 1: moments + A·Q0. Centring is implicit (x·Q − 1·shiftᵀQ, no copy of the data) unless the first batch
    # shows the data sitting far from the origin, where float32 products of uncentred data would cancel.
    explicit = _far_from_origin(first, shift, comm)
    Z, colsum, stats = sketch.run(Q, shift, explicit, batches=it, first=first, first_pass=True)
    N = int(stats[0].item())
    if N < d + 2:
        raise FnconvertError(f"the calibration data holds {N} samples; d={d} needs at least d + 2 = {d + 2}")
    m = colsum / N
    mean = shift + m
    tss = max(float(stats[1] - N * (m @ m)), 0.0)
    AQ = sketch.to_AQ(Z, mean, N)

    kry = _Krylov(p, m_max, dev)
    kry.reset(Q, AQ)
    passes, converged, invariant = 1, False, False
    prev = None if warm is None else (warm[0], warm[1] * (N / warm[2]))  # subsample eigenvalues scale with rows
    history: list[tuple[float, float, float]] = []  # (subspace change, top-d value change, λ_{d+1} change)
    est_sub = est_val = float("inf")
    defl_tol = max(100 * eps, 1e-12)
    tiny = torch.finfo(torch.float64).tiny
    budget = _MAX_PASSES
    clustered = False
    # Eigenvalues below this × the top one are rounding noise of float32 passes, or of float32 statistics (the
    # mean) after a switch to float64 passes, so they stay unresolved then too.
    unresolved = _RANK_RTOL_FLOAT32**2
    while True:
        # The vectors the next block and the result need (see the block choice below).
        U, vals = kry.estimate(min(b if clustered and r else max(r, d + 1), kry.k))
        if prev is not None:
            ch = _sin_between(U[:, :d], prev[0])
            rel = ((vals[: d + 1] - prev[1][: d + 1]).abs() / vals[: d + 1].clamp_min(tiny)).cpu()
            history.append((ch, float(rel[:d].max()), float(rel[d])))
            est_sub, est_top, est_last = _predicted_error(history)
            if est_sub <= _TOL and max(est_top, est_last) > _TOL:  # the bound only matters then; it costs O(p·k·d)
                bound = kry.ritz_value_bound(d)
                est_top, est_last = min(est_top, float(bound[:d].max())), min(est_last, float(bound[d]))
            est_val = max(est_top, est_last)
            # λ_{d+1} at the edge of a flat cluster (a noise bulk) converges slowly (its error halves per pass)
            # and only sets the residual rate, so there 1e-2 on λ² (0.5 % on λ) is taken as enough;
            # λ1..λd and the subspace always get _TOL.
            clustered = vals.numel() > d + 1 and float(vals[d] - vals[d + 1]) < 1e-2 * float(vals[d])
            converged = (est_sub <= _TOL and est_top <= _TOL
                         and est_last <= (_TOL_CLUSTER if clustered else _TOL))
        prev = (U[:, :d], vals)
        settled = converged or invariant or (bool(history) and max(history[-1][1:]) < 1e-2)
        if work == torch.float32 and settled and _float32_floor(vals, d) > _ESCALATE:
            # λd ≈ λ_{d+1}: float32 rounding of the passes alone would move the top-d subspace by more than
            # the tolerance (measured floor ≈ 0.15·eps·λ1²/(λd² − λ²_{d+1})). Restart from the current
            # estimate with float64 passes; the Krylov basis built so far carries float32 noise.
            work = torch.float64
            sketch = _SketchPass(source, p, dev, work, comm, threads)
            defl_tol = 1e-12
            Q = _orth_block(kry.estimate(min(b, kry.k))[0], None, defl_tol)
            kry.k, prev, converged, invariant = 0, None, False, False
            history.clear()
            budget = passes + _MAX_PASSES
        elif converged or invariant or passes >= budget:
            break
        elif kry.k >= p:
            Q = U[:, :0]  # the basis spans the whole space: the estimate is exact
        elif kry.k >= m_max:
            # Out of room (only when p·m_max floats exceed _BASIS_BYTES): restart from the current best
            # estimates, which keep the converging directions.
            Q = _orth_block(kry.estimate(b)[0], None, defl_tol)
            kry.k = 0
        elif r:
            # The next block: the part of the r leading estimates outside span(K), orthonormalised in float64.
            # The estimates come from A·K, so this is the newest Krylov block compressed to the r directions
            # that matter for the top d + 1 (a full block adds b columns for the same gain; see _block_sizes).
            # When λ_{d+1} sits in a flat cluster, r estimates cover too little of it and the block widens to b
            # (planted d = 8 with a noise bulk: 8 passes at 16 columns, 7 widened; full 32-column blocks took 5
            # there, but 4 passes of them cost more than 4 compressed ones on CIFAR-10, the common case).
            # Estimates with values the passes cannot resolve (below (2e-3)²·λ1², the float32 rank threshold)
            # are left out: they are rounding noise, and pushing them kept rank-deficient data from ever
            # converging. The rest enter as unit vectors; weighting them by value instead dropped λ_{d+1} at the
            # edge of a noise bulk (λ1/λ_{d+1} ≈ 24) before it had converged. An empty block means every resolved
            # estimate already lies in span(K) to the passes' precision.
            width = b if clustered else r
            lead = U[:, :width]
            lead = lead[:, vals[: lead.shape[1]] > unresolved * vals[0]]
            Q = _orth_block(lead, kry.K, defl_tol)
            if Q.shape[1] < width:
                # Top up from the newest images (the full Krylov block): the columns cost (nearly) nothing in the
                # pass, and near-degenerate λd ≈ λ_{d+1} needed them (planted, λd/λ_{d+1} = 1.002: sin 1.3e-4
                # without, 4.7e-5 with). Images below the resolved level, relative to λ1², are noise and stay out.
                extra = _orth_block(kry.newest_images(), torch.cat([kry.K, Q], 1), max(defl_tol, unresolved),
                                    scale=float(vals[0]))
                Q = torch.cat([Q, extra[:, : width - Q.shape[1]]], 1)
            if Q.shape[1] == 0:
                converged = True  # every resolved estimate lies in span(K): nothing is left to gain
                continue
            Q = Q[:, : m_max - kry.k]  # the last block is cut to the room left (m_max = p: the rest)
        else:
            # Full block Krylov (r = 0, benchmarks and tests): block Lanczos with full reorthogonalisation.
            Q = _orth_block(kry.newest_images(), kry.K, defl_tol)[:, : m_max - kry.k]
        if Q.shape[1] == 0:
            invariant = True  # span(K) is A-invariant: the estimate is exact
            continue
        Z, _, stats = sketch.run(Q, mean, explicit)
        passes += 1
        if int(stats[0].item()) != N:
            raise FnconvertError(
                f"the batches yielded {int(stats[0].item())} rows on pass {passes} but {N} on pass 1; the "
                f"randomized method reads the data several times and needs the same rows each time (set "
                f"drop_last consistently, avoid random augmentation) or use method='exact'")
        kry.append(Q, sketch.to_AQ(Z, mean, N))

    if not (converged or invariant):
        ratio = math.sqrt(float(vals[d - 1] / vals[d])) if float(vals[d]) > 0 else float("inf")
        warnings.warn(
            f"fit_factors: the randomized solver stopped after {passes} passes without meeting its tolerance "
            f"{_TOL:.0e} (estimated subspace error {est_sub:.1e}, eigenvalue error {est_val:.1e}; "
            f"λ{d}/λ{d + 1} = {ratio:.4f}); method='exact' gives the float64 answer where p allows",
            RuntimeWarning, stacklevel=4)
    sv = vals.clamp_min(0).sqrt()  # vals are eigenvalues of A = XcᵀXc, i.e. λ_j² of Xc
    rtol = _RANK_RTOL_FLOAT32
    K, AK = kry.K, kry.AK
    label = "randomized-krylov" if work == torch.float32 else "randomized-krylov-f64"
    if float(sv[d]) <= rtol * float(sv[0]):
        # Neither float32 passes (floor ~3e-4·λ1) nor the Gram of A·K (floor ~1e-4·λ1, its eigenvalues are λ⁴)
        # tell a tiny λ_{d+1} from zero: one float64 pass over the leading block decides, by Rayleigh–Ritz,
        # before refusing d as at or above the rank.
        K = _orth_block(U, None, 1e-12)
        sketch64 = _SketchPass(source, p, dev, torch.float64, comm, threads)
        AK = sketch64.to_AQ(sketch64.run(K, mean, True)[0], mean, N)
        passes += 1
        theta, W = torch.linalg.eigh((K.T @ AK + AK.T @ K) / 2)
        theta, W = theta.flip(0), W.flip(1)
        U, sv = K @ W, theta.clamp_min(0).sqrt()
        rtol = _exact_rank_rtol(p)
        label += "+f64-refine"
    rank = _numerical_rank(sv, rtol)
    _check_rank(d, rank, p, N, sv, rtol, check_rank)
    V = _sign_fix(U[:, :d])
    # B̂ = (VᵀAV)⁻¹(AV)ᵀ with A·V from the Krylov compression A·K·(KᵀV): exact for V in span(K), within
    # the solver tolerance otherwise (V from A·K is one Krylov degree past K).
    AV = AK @ (K.T @ V)
    B = torch.linalg.solve((V.T @ AV + AV.T @ V) / 2, AV.T) if d < rank else V.T.clone()
    factors = Factors(_np(mean), _np(V), _np(B), _np(sv[: d + 1]), N, tss, label)
    spectrum = Spectrum(_np(sv), bool(invariant), rank, rtol, passes, 0.0 if invariant else est_sub)
    return factors, spectrum


def _block_sizes(d: int, p: int) -> tuple[int, int]:
    """(b, r): the first data pass multiplies a block of b columns, every later pass r columns (0: full
    b-column Krylov blocks).

    A wide first block gets the d + 1 wanted directions and their neighbours under way at once; after it only the
    r leading estimates need pushing further (see the loop in _fit_randomized). Multiples of 16 because the
    skinny float32 GEMMs of a pass run at full speed there and not between (2-core EPYC, MKL, 50k × 3,072, time
    per pass: 16 columns 0.13 s, 24: 0.17 s, 32: 0.18 s, 48: 0.22 s, 64: 0.27 s; 11 columns 0.40 s). On CIFAR-10
    at d = 10 (λ10/λ11 = 1.047, 50k rows) the top-10 error after passes 1–4 was 3e-2, 3e-3, 9e-5, 2e-6 with
    (b, r) = (32, 16), 0.57 s of GEMMs, against 3e-2, 2e-3, 7e-5, 2e-6 with full blocks of 24, 0.68 s; a first
    block of 64 saved the fourth pass but cost as much in the first one and in the warm start."""
    def up16(n: int) -> int:
        return -(-n // 16) * 16

    b = min(p, _BLOCK or max(16, up16(2 * (d + 1) + 2)))
    r = min(b, up16(d + 1 + 4)) if _EXTEND is None else min(b, _EXTEND)
    return b, r


class _Krylov:
    """The block Krylov basis K (p, k), orthonormal, its image A·K from the data passes, and two small matrices
    kept up to date as blocks arrive, so that no step between passes costs more than O(p·k·b):
    G = (A·K)ᵀ(A·K) and T = Kᵀ(A·K), both (k, k), float64."""

    def __init__(self, p: int, m_max: int, dev):
        import torch

        self.basis = torch.empty(p, m_max, dtype=torch.float64, device=dev)
        self.images = torch.empty(p, m_max, dtype=torch.float64, device=dev)
        self.G = torch.empty(m_max, m_max, dtype=torch.float64, device=dev)
        self.T = torch.empty(m_max, m_max, dtype=torch.float64, device=dev)
        self.k = 0
        self.last = slice(0, 0)

    @property
    def K(self):
        return self.basis[:, : self.k]

    @property
    def AK(self):
        return self.images[:, : self.k]

    def newest_images(self):
        return self.images[:, self.last]

    def reset(self, Q, AQ) -> None:
        self.k = 0
        self.append(Q, AQ)

    def append(self, Q, AQ) -> None:
        k, kb = self.k, Q.shape[1]
        new = slice(k, k + kb)
        self.basis[:, new], self.images[:, new] = Q, AQ
        allk = slice(0, k + kb)
        g = self.images[:, allk].T @ AQ  # (k+kb, kb)
        self.G[allk, new], self.G[new, allk] = g, g.T
        # T = Kᵀ·A·K is symmetric in exact arithmetic: its new rows are (A·Q)ᵀK = Qᵀ·A·K.
        t = AQ.T @ self.basis[:, allk]  # (kb, k+kb)
        self.T[new, allk], self.T[allk, new] = t, t.T
        self.k, self.last = k + kb, new

    def estimate(self, keep: int):
        """Leading singular pairs of A·K: (U (p, keep), values (k,)). The left singular vectors lie in
        A·span(K), one Krylov degree past span(K), so they beat the Rayleigh–Ritz vectors of span(K) at no extra
        pass; the singular values are A²-Ritz values √(vᵀA²v), estimates of the eigenvalues of A (= λj² of Xc).
        From G's eigenpairs: G's eigenvalues are their squares, accurate to eps·σ1², i.e. down to ~1e-4·λ1 in
        λ, below which the fit refines in float64 anyway."""
        import torch

        k = self.k
        ev, W = torch.linalg.eigh(self.G[:k, :k])
        ev, W = ev.flip(0), W.flip(1)
        S = ev.clamp_min(0).sqrt()
        # Directions past the numerical rank (S ≈ 0) are divided by eps·S1, not by ~0: they come out as finite
        # rounding noise that QR orthonormalises, instead of inf.
        Sk = S[:keep].clamp_min(max(float(S[0]) * 1e-15, torch.finfo(S.dtype).tiny))
        U = self.AK @ (W[:, :keep] / Sk)
        U, _ = torch.linalg.qr(U)  # remove rounding drift; column order (and directions) are kept
        return U, S

    def ritz_value_bound(self, d: int):
        """Relative error bounds (d+1,) of λ1²..λ_{d+1}² from Rayleigh–Ritz on span(K): |θj − λj| ≤ ‖rj‖²/δj
        (Kato–Temple), with rj the Ritz residual and δj the distance to the neighbouring Ritz values. The
        reported values σj(A·K) lie between θj and λj (σj ≥ θj by Cauchy–Schwarz, σj ≤ λj by interlacing), so
        the bound covers them too. Residuals carry float32 rounding (~1e-6·λ1²); squared, that is negligible."""
        import torch

        k = self.k
        if k < d + 2:
            return torch.full((d + 1,), float("inf"), dtype=torch.float64)
        theta, W = torch.linalg.eigh(self.T[:k, :k])
        theta, W = theta.flip(0), W.flip(1)
        Wd = W[:, : d + 1]
        r = torch.linalg.vector_norm(self.AK @ Wd - (self.K @ Wd) * theta[: d + 1], dim=0)
        upper = torch.cat([theta[:1].new_full((1,), float("inf")), theta[:d]])
        gap = torch.minimum(upper - theta[: d + 1], theta[: d + 1] - theta[1 : d + 2])
        bound = r.square() / (gap * theta[: d + 1])
        bound[(gap <= 0) | (theta[: d + 1] <= 0)] = float("inf")
        return bound.cpu()


def _warm_start(source: _Source, Q, d: int, dev, work, threads: int):
    """A starting block from two block-Krylov steps on ~2,048 rows of an in-memory array, taken as 8 evenly
    spaced runs (so a class-sorted array still contributes every part). On CIFAR-10 (50k rows) this costs 0.08
    of a pass and its top-10 subspace is within sin 0.4 of the answer (top-1: 0.04), where a random block is
    at 1.0: the full passes then need 4 instead of 5 (d = 10) and 2 instead of 3–4 (d = 1).

    Returns ((p, b) orthonormal block, (U_d, eigenvalue estimates, rows used)) or None when it does not pay:
    streaming input (no random access), fewer than 4,096 rows, or a block that is most of the space."""
    import torch

    arr = source.array
    p, b = Q.shape
    if arr is None or arr.shape[0] < 4096 or 2 * b > p:
        return None
    n_sub = min(2048, arr.shape[0] // 8)
    run = n_sub // 8
    starts = np.linspace(0, arr.shape[0] - run, 8).astype(int)
    with _threads(dev, threads):
        S = torch.cat([source._prepare(arr[s : s + run], dev, work, where="X") for s in starts])
        mu = S.mean(0)
    if not math.isfinite(float(mu.sum())):
        return None  # the full pass will name the bad sample
    kry = _Krylov(p, 2 * b, dev)
    for step in range(2):
        Qw = Q.to(work)
        with _threads(dev, threads):
            # Centred without a centred copy: the rows of S·Q − 1·(μᵀQ) sum to zero, so Sᵀ of them is Scᵀ of them.
            AQ = (S.T @ torch.addmm(mu @ Qw, S, Qw, beta=-1)).to(torch.float64)
        if step == 0:
            kry.reset(Q, AQ)
            Q = _orth_block(AQ, kry.K, 1e-6)  # an estimate only: directions below 1e-6 do not matter
            if Q.shape[1] == 0:
                return None
        else:
            kry.append(Q, AQ)
    U, vals = kry.estimate(b)
    if U.shape[1] < b:
        return None
    return U, (U[:, :d], vals, S.shape[0])


def _far_from_origin(first, shift, comm: _Comm) -> bool:
    """Whether ‖shift‖ exceeds _CENTRE_EXPLICITLY × the rms distance of the first batch's rows from it (decided
    on the first batch, averaged over ranks so that all ranks choose alike)."""
    import torch

    acc = torch.zeros(2, dtype=torch.float64, device=shift.device)
    if first is not None:
        x = first[1][:256]  # a few hundred rows tell the scale; more only costs a bigger temporary
        acc[0] = torch.linalg.vector_norm(x - shift.to(x.dtype), dim=1).to(torch.float64).square().sum()
        acc[1] = x.shape[0]
    comm.sum_(acc)
    rms = math.sqrt(float(acc[0] / acc[1])) if float(acc[1]) > 0 else 0.0
    return float(torch.linalg.vector_norm(shift)) > _CENTRE_EXPLICITLY * rms


def _float32_floor(vals, d: int) -> float:
    """eps32·λ1²/(λd² − λ²_{d+1}): the scale of the top-d subspace error that float32 passes alone cause."""
    gap = float(vals[d - 1] - vals[d])
    return float("inf") if gap <= 0 else 1.2e-7 * float(vals[0]) / gap


def _sin_between(U1, U2) -> float:
    """Sine of the largest principal angle between span(U1) and span(U2) (orthonormal columns), in float64."""
    import torch

    P = U2 - U1 @ (U1.T @ U2)
    return float(torch.linalg.matrix_norm(P, ord=2))


def _predicted_error(history: list[tuple[float, ...]]) -> list[float]:
    """Errors of the latest estimate, predicted from the last two changes of each tracked quantity (subspace,
    then eigenvalues). A sequence converging with rate ρ has error ≈ change·ρ/(1 − ρ); Krylov convergence
    accelerates, so the previous ratio over-estimates ρ (safe) for the subspace. Eigenvalues converge less
    regularly, so for them the prediction is never taken below the last change itself."""
    if len(history) < 2:
        return [float("inf")] * len(history[-1]) if history else [float("inf")] * 3
    out = []
    for j in range(len(history[-1])):
        c_prev, c = history[-2][j], history[-1][j]
        if c == 0.0:
            out.append(0.0)
            continue
        rho = min(0.9, c / c_prev) if c_prev > 0 else 0.9
        factor = rho / (1 - rho)
        out.append(c * (factor if j == 0 else max(1.0, factor)))
    return out
