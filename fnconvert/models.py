"""Loading model files safely.

The format is detected from the content, never from the extension. Files that carry code (TorchScript archives,
pickled ``nn.Module`` objects) load only when the user passed ``--trust-model-code``; everything else is read as
data: ``torch.load(weights_only=True)`` (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it
off), safetensors, ``torch.export`` programs and ONNX protobufs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FnconvertError, short_reason

TRUST_FLAG = "--trust-model-code"
MIN_TORCH_FOR_PT = (2, 6)  # CVE-2025-32434: weights_only=True could be bypassed before torch 2.6


@dataclass
class LoadedModel:
    """A model ready for surgery: an ``nn.Module`` (eager, TorchScript or an exported program's module)."""

    module: "torch.nn.Module"  # noqa: F821
    format: str  # torchscript | pickled-module | pt2 | state_dict | safetensors | onnx
    path: Path
    sha256: str
    arch: str | None = None
    onnx_model: object | None = None  # the onnx.ModelProto when the source is ONNX

    @property
    def is_torchscript(self) -> bool:
        import torch

        return isinstance(self.module, torch.jit.ScriptModule)

    def source_dict(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format, "arch": self.arch}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(path: Path) -> str:
    """Name the file's format from its bytes: torchscript, pt2, torch-zip, torch-legacy, safetensors or onnx."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise FnconvertError(f"model file {path} is empty; give a saved model (.pt, .pt2, .safetensors, .onnx)")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:  # e.g. "zip file version 24.1"
            raise FnconvertError(f"model file {path} is a damaged zip archive ({_short(e)}); re-save the model")
        if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") for n in names) or any("/models/" in n for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise FnconvertError(f"model file {path} is a zip archive of unknown layout; save it with torch.save")
    # safetensors first: its 8-byte header length may itself start with 0x80 (a 128-byte header), which would
    # otherwise pass for a pickle's PROTO opcode below.
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":
        return "torch-legacy"
    if _looks_like_onnx(path):
        return "onnx"
    raise FnconvertError(
        f"model file {path} has an unknown format; fnconvert reads TorchScript and torch.save files (.pt), "
        "torch.export programs (.pt2), state_dicts (.pt, .pth, .safetensors) and ONNX (.onnx)"
    )


def _looks_like_onnx(path: Path) -> bool:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return len(m.graph.node) > 0 or len(m.graph.input) > 0
    except Exception:  # a protobuf parse error means "not ONNX" here; the caller reports the unknown format
        return False


def load_model(path: str | Path, *, arch: str | None = None, trust_model_code: bool = False) -> LoadedModel:
    """Load ``path`` for conversion, refusing code-bearing files unless ``trust_model_code``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FnconvertError(f"model file {path} does not exist or is not a file; check the path")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise FnconvertError(f"model file {path} cannot be read ({e.strerror}); check its permissions")
    fmt = detect_format(path)

    if fmt in ("torch-zip", "torch-legacy", "torchscript") and _torch_version() < MIN_TORCH_FOR_PT:
        raise FnconvertError(
            f"torch {torch.__version__} is older than 2.6, whose weights_only loading is unsafe (CVE-2025-32434); "
            "upgrade torch to load .pt files"
        )

    if fmt == "torchscript":
        if not trust_model_code:
            raise FnconvertError(
                f"{path} is a TorchScript archive, which runs code from the file; pass {TRUST_FLAG} if you trust it"
            )
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise FnconvertError(f"TorchScript archive {path} cannot be loaded ({_short(e)}); re-save it")
        return LoadedModel(module.eval(), "torchscript", path, digest)

    if fmt == "pt2":
        if not trust_model_code:
            reason = pt2_code_reason(path)
            if reason:
                raise FnconvertError(
                    f"{path} is a torch.export program that would run code when loaded ({reason}); pass "
                    f"{TRUST_FLAG} if you trust it, or re-export a plain program with torch.export.save"
                )
        try:
            with _quiet_torch_export():  # torch logs a traceback for a damaged archive; the error below says it
                ep = torch.export.load(str(path))
                module = exported_module(ep)
        except Exception as e:
            raise FnconvertError(f"torch.export program {path} cannot be loaded ({_short(e)}); re-export it")
        return LoadedModel(module, "pt2", path, digest)

    if fmt == "onnx":
        from .onnx_io import load_onnx_model  # the ONNX path lives in its own module

        return load_onnx_model(path, digest)

    if fmt == "safetensors":
        state = _load_safetensors(path)
        return _from_state_dict(state, arch, path, digest, "safetensors")

    # torch.save output: read as data only. weights_only=True is passed explicitly on purpose.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for modules; RuntimeError/EOFError/zip errors for damaged files
        if _is_weights_only_refusal(e):
            if not trust_model_code:
                raise FnconvertError(
                    f"{path} holds a pickled Python object (a whole nn.Module), which runs code when loaded; "
                    f"pass {TRUST_FLAG} if you trust it, or save a state_dict and use --arch"
                )
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as e2:
                raise FnconvertError(f"model file {path} cannot be unpickled ({_short(e2)}); re-save it")
            if not isinstance(obj, torch.nn.Module):
                raise FnconvertError(f"{path} unpickles to {type(obj).__name__}, not an nn.Module; save the model")
            return LoadedModel(obj.eval(), "pickled-module", path, digest)
        raise FnconvertError(f"model file {path} is truncated or corrupt ({_short(e)}); re-save it")
    if isinstance(obj, torch.nn.Module):  # only possible for allow-listed module types
        return LoadedModel(obj.eval(), "pickled-module", path, digest)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        return _from_state_dict(obj, arch, path, digest, "state_dict")
    raise FnconvertError(
        f"{path} holds a {type(obj).__name__}, not a model or a state_dict; save model.state_dict() or a TorchScript"
    )


# --------------------------------------------------------------------------------------------------------------
# .pt2 archives: torch.export.load is not a data-only reader. It unpickles payloads marked use_pickle (and falls
# back to weights_only=False for sample inputs and legacy payloads), loads compiled AOTInductor libraries, passes
# symbolic-shape strings to sympy.sympify (an eval), execs guard code, and resolves node targets by attribute path
# from ``torch`` (which reaches torch.os.system). So an untrusted archive is checked first: only what
# torch.export.save writes for a plain program of aten ops is accepted without --trust-model-code.

_PT2_DATA_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/[\w.]+|models/\w+\.json|data/weights/[\w.]+|"
    r"data/constants/[\w.]+|data/sample_inputs/\w+\.pt|extra/[\w.]+)"
)
_PT2_OPERATOR_TARGETS = {f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "xor", "not_", "invert")}
_PT2_SYM_TARGETS = {"torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not",
                    "torch.sym_ite", "torch.sym_sum", "torch._sym_sqrt", "math.ceil", "math.floor", "math.trunc"}
_PT2_EXPR_NAMES = {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
                   "FloorToInt", "CeilDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
                   "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "IntTrueDiv",
                   "FloatTrueDiv", "Max", "Min", "Abs", "True", "False", "oo", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
                   "And", "Or", "Not", "Integer", "Rational", "Float", "positive", "integer", "nonnegative", "real",
                   "finite", "Symbol"}
_PT2_SYMBOL = re.compile(r"Symbol\('[a-z]{1,3}\d+'((, [a-z]+=(True|False))*)\)")
_PT2_EXPR = re.compile(r"[\w\s+\-*/%(),.<>=!&|~]*")


def pt2_code_reason(path: Path) -> str | None:
    """Why loading the .pt2 archive at ``path`` would run code from it, or None for a plain program."""
    import io
    import json

    import torch

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            for name in names:
                rel = name.split("/", 1)[1] if "/" in name else name
                if not _PT2_DATA_MEMBERS.fullmatch(rel):
                    return f"member {name!r} is not part of a plain exported program"
                if rel.endswith("_config.json"):
                    for key, meta in (json.loads(z.read(name)).get("config") or {}).items():
                        if meta.get("use_pickle"):
                            return f"payload {key!r} is pickled"
                        if rel.startswith("data/constants/") and not str(meta.get("path_name", "")).startswith("tensor_"):
                            return f"constant {key!r} is a Python object"
                elif rel.endswith(".pt"):  # sample inputs and legacy payloads: torch falls back to weights_only=False
                    try:
                        torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
                    except Exception:
                        return f"{name!r} is not plain tensor data"
                elif rel.startswith("models/"):
                    reason = _pt2_program_reason(json.loads(z.read(name)))
                    if reason:
                        return reason
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError, TypeError, NotImplementedError,
            EOFError, RuntimeError) as e:
        raise FnconvertError(f"torch.export program {path} is damaged ({_short(e)}); re-export it")
    return None


def _pt2_program_reason(program: dict) -> str | None:
    if program.get("guards_code"):
        return "it holds guard code"
    stack = [program]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
        elif isinstance(obj, dict):
            target = obj.get("target")
            if isinstance(target, str) and "inputs" in obj and not (
                    target.startswith("torch.ops.aten.") or target.startswith("torch.ops.prims.")
                    or target in _PT2_OPERATOR_TARGETS or target in _PT2_SYM_TARGETS):
                return f"it calls {target!r}, which is not an aten operator"
            expr = obj.get("expr_str")
            if isinstance(expr, str):
                rest = _PT2_SYMBOL.sub("s0", expr)
                words = re.findall(r"[A-Za-z_]\w*", rest)
                if not _PT2_EXPR.fullmatch(rest) or any(
                        w not in _PT2_EXPR_NAMES and not re.fullmatch(r"[a-z]{1,3}\d+", w) for w in words):
                    return f"the shape expression {expr[:60]!r} is not plain arithmetic"
            stack.extend(obj.values())
    return None


@contextlib.contextmanager
def _quiet_torch_export():
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def exported_module(ep) -> "torch.nn.Module":  # noqa: F821
    """``ep.module()`` whose train()/eval() are no-ops instead of errors.

    An exported graph has its BatchNorm/dropout behaviour baked in at export time (normally eval), and
    ``torch.export`` refuses mode switches on it. fnconvert switches modes around every evaluation, so they are
    made no-ops here: fine-tuning a .pt2 model keeps BatchNorm statistics frozen, as exported.
    """
    import types

    module = ep.module()
    module.train = types.MethodType(lambda self, mode=True: self, module)
    module.eval = types.MethodType(lambda self: self, module)
    return module


def _is_weights_only_refusal(e: Exception) -> bool:
    import pickle

    text = str(e)
    return isinstance(e, pickle.UnpicklingError) and ("Weights only load failed" in text or "weights_only" in text)


def _load_safetensors(path: Path) -> dict:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FnconvertError(f"safetensors file {path} is truncated or corrupt ({_short(e)}); re-save it")
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FnconvertError(f"safetensors file {path}: tensor {k!r} holds NaN or Inf; re-train or re-save it")
    return state


def _from_state_dict(state: dict, arch: str | None, path: Path, digest: str, fmt: str) -> LoadedModel:
    import torch
    import torchvision

    if not arch:
        raise FnconvertError(
            f"{path} is a state_dict (weights only); pass --arch NAME with its torchvision architecture, e.g. --arch resnet18"
        )
    known = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in known:
        close = sorted(n for n in known if n.startswith(arch[:4]))[:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FnconvertError(f"--arch {arch!r} is not a torchvision classification model{hint}; see torchvision.models.list_models()")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FnconvertError(f"{path} is not a flat state_dict of tensors; save model.state_dict()")
    probe = torchvision.models.get_model(arch, weights=None)
    last = _last_linear_name(probe)
    key = f"{last}.weight"
    if key not in state:
        raise FnconvertError(
            f"--arch {arch} expects the final layer {key!r}, which {path} lacks; this state_dict is for another "
            "architecture: pass the right --arch"
        )
    num_classes = int(state[key].shape[0])
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FnconvertError(
            f"--arch {arch} does not match {path} ({_short(e)}); pass the architecture it was saved from"
        )
    return LoadedModel(model.eval(), fmt, path, digest, arch=arch)


def _last_linear_name(model) -> str:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise FnconvertError("this architecture has no nn.Linear classifier; fnconvert needs a final dense layer")
    return names[-1]


def _torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


_short = short_reason  # one implementation, in errors.py

