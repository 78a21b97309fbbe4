"""onnxruntime against torch: logits, accuracy and the tolerance gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import FnconvertError

PROVIDERS = ("auto", "cpu", "cuda")


def providers_for(provider: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA when asked for (or on ``auto`` when present), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in PROVIDERS:
        raise FnconvertError(f"--provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FnconvertError(
                "--provider cuda: this onnxruntime has no CUDA provider; pip install 'fnconvert[gpu]' "
                "(onnxruntime-gpu) or use --provider cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto" and "CUDAExecutionProvider" in available and _has_gpu():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch, or a broken CUDA install: stay on CPU
        return False


def open_session(path: str | Path, provider: str = "auto"):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=providers_for(provider))
    except FnconvertError:
        raise
    except Exception as e:
        raise FnconvertError(f"onnxruntime cannot open {path} ({' '.join(str(e).split())[:200]}); check the file")


def onnx_metadata(path: str | Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def run_session(sess, x: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0]
    return sess.run(None, {inp.name: x.astype(np.float32, copy=False)})[0]


def compare(sess, reference, split, *, atol: float, batch_sizes=(1, 64), device: str = "cpu",
            small_batch_samples: int = 16) -> dict:
    """onnxruntime vs ``reference`` (a torch module, or None) on ``split``.

    The whole split runs at the largest batch size; the first ``small_batch_samples`` also run at each smaller
    batch size, so a graph that only works at one batch size is caught. Returns accuracy, max |diff|, pass/fail.
    """
    import torch

    if reference is not None:
        reference.eval()
    max_diff, correct, total = 0.0, 0, 0
    big = max(batch_sizes)
    with torch.no_grad():
        for x, y in split.batches(big):
            got = run_session(sess, x.numpy())
            correct += int((got.argmax(1) == y.numpy()).sum())
            total += len(y)
            if reference is not None:
                want = reference(x.to(device)).float().cpu().numpy()
                max_diff = max(max_diff, float(np.abs(got - want).max()))
        for bs in sorted(set(batch_sizes) - {big}):
            idx = np.arange(min(small_batch_samples, len(split)))
            for x, _ in split.batches(bs, idx):
                got = run_session(sess, x.numpy())
                if reference is not None:
                    want = reference(x.to(device)).float().cpu().numpy()
                    max_diff = max(max_diff, float(np.abs(got - want).max()))
    result = {"accuracy": correct / max(total, 1), "samples": total, "batch_sizes": sorted(set(batch_sizes)),
              "atol": atol, "provider": sess.get_providers()[0]}
    if reference is not None:
        result["max_abs_diff"] = max_diff
        result["passed"] = bool(max_diff <= atol)
    return result


def verify_model(onnx_path: str | Path, data, *, reference: str | Path | None = None, atol: float = 1e-4,
                 provider: str = "auto", trust_model_code: bool = False, data_dir=None, normalize=None) -> dict:
    """``fnconvert verify``: accuracy of an ONNX model on a data set's test split, optionally against a reference.

    The preprocessing recorded in the model's metadata is applied unless ``normalize`` overrides it.
    """
    from .data import Preprocessing, load_data

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FnconvertError(f"ONNX model {onnx_path} does not exist; give the model_fn.onnx that transform wrote")
    meta = onnx_metadata(onnx_path)
    ds = load_data(data, data_dir=data_dir, normalize=normalize)
    if normalize is None and isinstance(meta.get("fnconvert.preprocessing"), dict):
        pre = Preprocessing.from_dict(meta["fnconvert.preprocessing"])
        ds.test.pre = Preprocessing(ds.test.pre.scale, pre.mean, pre.std)
    ref = _load_reference(reference, trust_model_code) if reference else None
    sess = open_session(onnx_path, provider)
    result = compare(sess, ref, ds.test, atol=atol)
    result.update({"model": str(onnx_path), "reference": str(reference) if reference else None})
    return result


def _load_reference(path, trust_model_code: bool):
    import torch

    from .models import detect_format, TRUST_FLAG

    path = Path(path)
    if not path.is_file():
        raise FnconvertError(f"--reference {path} does not exist; give model_fn.pt or model_fn.pt2")
    fmt = detect_format(path)
    if fmt == "pt2":
        from .models import exported_module, pt2_code_reason

        reason = None if trust_model_code else pt2_code_reason(path)
        if reason:
            raise FnconvertError(f"--reference {path} would run code when loaded ({reason}); pass {TRUST_FLAG} "
                                 "if you trust it")
        return exported_module(torch.export.load(str(path)))
    if fmt == "torchscript":
        if not trust_model_code:
            raise FnconvertError(f"--reference {path} is TorchScript, which runs code; pass {TRUST_FLAG}, or use model_fn.pt2")
        return torch.jit.load(str(path), map_location="cpu")
    raise FnconvertError(f"--reference {path} is a {fmt} file; give model_fn.pt (TorchScript) or model_fn.pt2")


def predict(onnx_path, data, *, top_k: int = 5, limit: int | None = None, provider: str = "auto",
            normalize: str | None = None) -> dict:
    """Top-k classes per sample: ``data`` is a data set (its test split) or a flat folder of images."""
    from .data import IMAGE_SUFFIXES, Preprocessing, _read_images, load_data, parse_normalize

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FnconvertError(f"ONNX model {onnx_path} does not exist; give the model_fn.onnx that transform wrote")
    if top_k < 1:
        raise FnconvertError(f"--top-k {top_k} must be ≥ 1")
    meta = onnx_metadata(onnx_path)
    stored = meta.get("fnconvert.preprocessing")
    norm = parse_normalize(normalize) if normalize else None
    if norm is None and isinstance(stored, dict) and stored.get("normalize"):
        norm = (tuple(stored["normalize"]["mean"]), tuple(stored["normalize"]["std"]))
    sess = open_session(onnx_path, provider)
    src = Path(str(data))
    classes = None
    if src.is_dir() and not (src / "train").is_dir():
        files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise FnconvertError(f"--data {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        pre = Preprocessing(1 / 255, *(norm or (None, None)))
        names = [f.name for f in files]
        batches = ((pre.apply(_read_images(files[i:i + 64])), None) for i in range(0, len(files), 64))
    else:
        ds = load_data(data, normalize=",".join(map(str, norm[0] + norm[1])) if norm else None)
        classes = ds.classes
        n = len(ds.test) if limit is None else min(limit, len(ds.test))
        names = [f"test[{i}]" for i in range(n)]
        batches = ds.test.batches(64, np.arange(n))
    rows, i = [], 0
    for x, _ in batches:
        out = run_session(sess, x.numpy())
        probs = out if meta.get("fnconvert.output") == "softmax" else _softmax(out)
        k = min(top_k, probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        for r in range(len(out)):
            rows.append({"sample": names[i], "top": [
                {"class": int(c), "label": classes[c] if classes else str(int(c)), "probability": float(probs[r, c])}
                for c in top[r]]})
            i += 1
    return {"model": str(onnx_path), "provider": sess.get_providers()[0], "predictions": rows}


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
