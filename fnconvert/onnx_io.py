"""ONNX models as input: loading them safely, the transform, and a trainable torch view of the graph.

- :func:`load_onnx_model` parses the protobuf without its external data, validates every external-data location
  (inside the model's own folder, no links out, offset + length inside the file) and only then reads the bytes.
- :func:`transform_onnx` is ``pipeline.transform`` for an ONNX source. The FN model is the source graph itself with
  the split and the factor term spliced in (:mod:`fnconvert.onnx_surgery`), so names, dynamic dims and opset carry
  over. The factors, the calibrated head (``surgery.calibrate_head``), the FN wrapper and the fine-tuning loop are
  the PyTorch path's own: the "body" they wrap is either onnxruntime (``--no-finetune``: pure surgery, nothing is
  converted) or :class:`OnnxModule`, a torch interpretation of the graph that can be trained; the trained weights are
  then written back into the source graph's initializers. ``--opset`` does not apply: the source's opset is kept
  (raised to 7 only when older). An ONNX source converts in one process (torchrun is refused).

Why an own converter rather than onnx2torch (1.5.15, the latest on PyPI, installs here): tried on this project's
three test graphs it converted none. The legacy-exported ResNet-18 failed with ``KeyError 'onnx::Conv_197'`` (the
initializers the exporter shares through Identity nodes), the dynamo-exported ResNet-18 with "Converter is not
implemented (ReduceMean, version 18)", the dynamo-exported MLP with the same for Reshape version 19. The write-back
of trained weights also needs each parameter's initializer name, which an own converter keeps by construction.
Exported classifiers use a small op set (:data:`SUPPORTED_OPS`, about 250 lines here); other graphs are refused by
op name, with ``--no-finetune`` suggested.
"""

from __future__ import annotations

import math
import os
import stat
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from . import onnx_surgery as S
from .errors import FnconvertError, short_reason
from .log import NULL_LOG, Log

#: Above this the FN model is saved with its tensors in ``model_fn.onnx.data`` (protobuf's 2 GB limit).
INLINE_LIMIT = 2**31 - 2**26
EXTERNAL_DATA_NAME = "model_fn.onnx.data"


# ---- loading ---------------------------------------------------------------------------------------------------


def load_onnx_model(path, digest):
    """Parse ``path``; validate, then read, its external data. Returns a ``LoadedModel`` of format "onnx"."""
    from .models import LoadedModel

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise FnconvertError(f"ONNX model {path} cannot be parsed ({_short(e)}); re-export it")
    refs = external_refs(model, path.parent)  # every location checked before any byte is read
    read_external(refs)
    if model.ByteSize() < 2**31:  # the checker takes a path for larger models; those are checked after surgery
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise FnconvertError(f"ONNX model {path} fails onnx.checker ({_short(e)}); re-export it from its source")
    return LoadedModel(None, "onnx", path, digest, onnx_model=model)


def external_refs(model: onnx.ModelProto, folder: Path) -> list[tuple]:
    """[(tensor, real path, offset, length)] for every externally stored tensor, each location validated.

    A location must be relative, free of ``..``, resolve (symlinks followed) to a regular file inside ``folder``
    that has no other hard link, and ``offset + length`` must lie within it. Only metadata (``stat``) is consulted.
    """
    base = folder.resolve()
    refs = []
    for t in _all_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        what = f"tensor {t.name!r} of the ONNX model"
        fix = "keep the data file next to the .onnx file and save with a relative location"
        win = PureWindowsPath(loc)
        rel = PurePosixPath(loc.replace("\\", "/"))
        if not loc or "\x00" in loc:
            raise FnconvertError(f"{what} has an empty external-data location; re-save the model with its data")
        if rel.is_absolute() or win.is_absolute() or win.drive or ".." in rel.parts:
            raise FnconvertError(f"{what} stores its data at {loc!r}, outside the model's folder {folder}; {fix}")
        try:
            real = (base / rel).resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            raise FnconvertError(f"{what} stores its data in {loc!r}, which is missing from {folder}; {fix}")
        if not real.is_relative_to(base):
            raise FnconvertError(f"{what} stores its data in {loc!r}, a link that leads outside {folder}; {fix}")
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise FnconvertError(f"{what}: the external-data location {loc!r} is not a regular file; {fix}")
        if st.st_nlink > 1:
            raise FnconvertError(
                f"{what}: the external-data file {loc!r} has {st.st_nlink} hard links, so it may be shared with a "
                f"file outside {folder}; copy it (cp, not ln) next to the model"
            )
        try:
            expected = _nbytes(t)
        except (KeyError, ValueError):  # an unknown data type, or strings, which cannot be stored externally
            raise FnconvertError(f"{what} has data type {t.data_type}, which cannot be stored externally; re-save "
                                 "the model")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else expected
        except ValueError:
            raise FnconvertError(f"{what} has a non-integer external-data offset or length; re-save the model")
        if offset < 0 or length < 0 or offset + length > st.st_size:
            raise FnconvertError(
                f"{what} reads bytes {offset}…{offset + length} of {loc!r}, which has {st.st_size}; the data file "
                "is truncated or belongs to another model: re-save the model with its data"
            )
        if length != expected:
            raise FnconvertError(
                f"{what} has {length} external bytes but its shape and type need {expected}; re-save the model"
            )
        refs.append((t, real, offset, length))
    return refs


def read_external(refs: list[tuple]) -> None:
    """Read validated external ranges into the tensors, which become inline tensors."""
    by_file: dict = {}
    for ref in refs:
        by_file.setdefault(ref[1], []).append(ref)
    for real, group in by_file.items():
        try:
            with open(real, "rb") as f:
                for t, _, offset, length in group:
                    f.seek(offset)
                    data = f.read(length)
                    if len(data) != length:
                        raise FnconvertError(f"external data {real} shrank while it was read; retry")
                    t.raw_data = data
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
        except OSError as e:
            raise FnconvertError(f"external data {real} cannot be read ({e.strerror}); check its permissions")


def _all_tensors(graph: onnx.GraphProto):
    """Initializers, sparse initializers and Constant/attribute tensors, of the graph and every subgraph."""
    for g in S._graphs(graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices


def _nbytes(t: TensorProto) -> int:
    n = math.prod(t.dims)
    if t.data_type == TensorProto.STRING:
        raise ValueError("string tensors cannot be external")
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


_PACKED_4BIT = {getattr(TensorProto, k) for k in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, k)}


def save_model(model: onnx.ModelProto, final: Path) -> None:
    """Full-check, then write atomically: inline under 2 GB, else every tensor in ``model_fn.onnx.data`` beside it.

    (A model over protobuf's 2 GB limit can only be checked from disk, so it is checked after writing, before the
    rename that publishes it.)
    """
    from .export import atomic_path

    large = sum(len(t.raw_data) for t in model.graph.initializer) > INLINE_LIMIT
    with atomic_path(final) as tmp:
        if large:  # a location fnconvert chooses: one file, next to the model, relative
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=EXTERNAL_DATA_NAME, size_threshold=1024)
            S.check(str(tmp))
        else:
            S.check(model)
            onnx.save_model(model, str(tmp))


# ---- onnxruntime as a torch body ---------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, providers: list[str], what: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    except Exception as e:
        raise FnconvertError(f"onnxruntime cannot run {what} ({_short(e)}); check that the model runs in onnxruntime")


class OrtBody(nn.Module):
    """An onnxruntime session behind an ``nn.Module`` interface, so the torch FN wrapper and calibration reuse it.

    No gradients flow through it: it serves calibration and the verification reference of ``--no-finetune``.
    """

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out).to(x.device)


# ---- the transform ----------------------------------------------------------------------------------------------


def transform_onnx(opts, ds, loaded, log: Log = NULL_LOG) -> dict:
    """``pipeline.transform`` for an ONNX source: same options, same artifacts, same report keys."""
    from .export import export_pt2, export_torchscript
    from .finetune import TrainConfig, config_hash, evaluate, finetune, train_config_dict
    from .pipeline import (_check_labels, fit_for_transform, fn_metadata, open_out, resolve_device,
                           verify_and_finish)
    from .surgery import FNModel, OutputAnalysis, calibrate_head
    from .verify import providers_for

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # ---- validate everything before anything is written (pipeline.transform checked the options already) ------
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise FnconvertError("an ONNX source converts in one process; run fnconvert without torchrun (the ONNX "
                             "calibration and surgery are cheap next to training, which runs on one device here)")
    out = Path(opts.out)
    epochs = 0 if opts.no_finetune else opts.epochs
    cfg = TrainConfig(epochs, opts.optimizer, opts.lr, opts.schedule, opts.batch_size, opts.seed).validate()
    device = resolve_device(opts.device)
    source = loaded.onnx_model
    spec, head = S.analyze(source)
    _check_sample_shape(spec, ds)
    providers = providers_for(opts.provider)
    pre_graph = S.pre_activation_model(source, head)
    pre_session = ort_session(pre_graph, providers, f"{loaded.path.name} (up to {head.pre!r})")
    num_classes = head.num_classes or int(OrtBody(pre_session)(next(ds.test.batches(1))[0]).shape[1])
    _check_labels(ds, num_classes)
    # Fine-tuning needs the graph as torch; refuse unsupported ops now, before any time is spent.
    body = OnnxModule(source, head.pre) if epochs > 0 else OrtBody(pre_session)
    log.info(f"model: onnx {loaded.path.name} (opset {S.opset_of(source)}), {num_classes} classes, output "
             f"{'logits' if head.tail == 'none' else head.tail} after {head.dense}")

    calib_idx = ds.calibration_indices(opts.calib_samples, opts.seed)
    t0 = time.perf_counter()
    factors, spectrum, d_reason = fit_for_transform(
        ds.train.flat_batches(512, calib_idx), opts.factors, method=opts.method, device=device, seed=opts.seed)
    d = factors.d
    timings["factors"] = time.perf_counter() - t0
    log.info(f"factors: d={d} by {factors.method} on {factors.n_samples} samples "
             f"(λ1..λ{d + 1} = {np.array2string(factors.singular_values, precision=4)})")

    # The pre-softmax scores rank the classes as the outputs do, so the source's accuracy needs no second session.
    accuracy_before = evaluate(OrtBody(pre_session), ds.test)
    t0 = time.perf_counter()
    if epochs > 0:
        body = body.to(device)
        _check_conversion(body, pre_session, next(ds.train.batches(8, calib_idx[:8]))[0], device)
    fn = FNModel(body, factors.mean, factors.V, factors.B, np.zeros((d, num_classes)), tail=head.tail)
    # `body` is the original graph up to its pre-softmax scores, so it is also calibration's "original model".
    C = calibrate_head(body, fn, (x.to(device) for x, _ in ds.train.batches(512, calib_idx)),
                       OutputAnalysis("none", 1, head.dense, num_classes))
    with torch.no_grad():
        for j, p in enumerate(fn.factor_heads):
            p.copy_(torch.as_tensor(C[j : j + 1], dtype=torch.float32))
    timings["calibration"] = time.perf_counter() - t0
    accuracy_calibrated = evaluate(fn, ds.test, device=device)
    log.info(f"accuracy: original {accuracy_before:.4f}, FN after calibration {accuracy_calibrated:.4f}")

    run_hash = config_hash({"model": loaded.sha256, "data": str(opts.data), "d": d, "train": train_config_dict(cfg),
                            "calib": opts.calib_samples, "normalize": opts.normalize, "method": opts.method})
    # ---- from here on the output folder exists -------------------------------------------------------------
    stage = open_out(out, opts)
    history: list[dict] = []
    trained = source
    if epochs > 0:
        t0 = time.perf_counter()
        history = finetune(fn, ds, cfg, factors.singular_values, device=device, checkpoint_dir=out / "checkpoints",
                           run_hash=run_hash, resume=opts.resume, log=log)
        timings["finetune"] = time.perf_counter() - t0
        trained = write_back(source, fn.body)

    t0 = time.perf_counter()
    deploy = fn.deploy().cpu()
    fn_model = S.insert_fn(trained, spec, head, factors.mean, factors.V, factors.B, deploy.fn_C.numpy(),
                           fn_metadata(loaded, ds, factors, head.tail))
    save_model(fn_model, stage / "model_fn.onnx")
    if epochs > 0:
        example_cpu = next(ds.test.batches(2))[0]
        export_torchscript(deploy, example_cpu, stage / "model_fn.pt")
        pt2_skipped = export_pt2(deploy, example_cpu, stage / "model_fn.pt2")
    else:
        pt2_skipped = "--no-finetune on an ONNX source is graph surgery only; no torch module is made"
    # The reference computes FN its own way: the torch FN model (fine-tuned: the torch view of the graph), or, for
    # surgery only, torch's split (x − μ)·V, onnxruntime's source graph on that residual, then + z·C and the tail.
    return verify_and_finish(
        out, stage, opts, log, deploy=deploy, spectrum=spectrum, t_export=t0, t_all=t_all, loaded=loaded, ds=ds,
        factors=factors, d_reason=d_reason, cfg=cfg, calib_samples=len(calib_idx), accuracy_before=accuracy_before,
        accuracy_calibrated=accuracy_calibrated, history=history, pt2_skipped=pt2_skipped, timings=timings,
        device=device, source_extra={"opset": S.opset_of(source)},
        input_info={"name": spec.name, "shape": ["batch", *ds.train.input_shape], "dtype": "float32"},
        output_info={"name": head.output, "classes": num_classes, "activation": head.tail, "final_layer": head.dense},
        reference="torch FN model" if epochs > 0 else "onnxruntime source graph on the residual + z·C",
        also=(EXTERNAL_DATA_NAME,))


def _check_sample_shape(spec: S.InputSpec, ds) -> None:
    data = tuple(ds.train.input_shape)
    model = spec.sample_shape
    fits = len(model) == len(data) and all(not isinstance(m, int) or m == s for m, s in zip(model, data))
    if not fits:
        shown = ["batch", *(m if m is not None else "?" for m in model)]
        raise FnconvertError(
            f"the ONNX input {spec.name!r} takes {shown} but the data's samples are {list(data)}; give data shaped "
            "like the model's input (e.g. images as N×H×W×C uint8 for an NCHW model)"
        )


def _check_conversion(body: nn.Module, pre_session, x: torch.Tensor, device: str) -> None:
    """The torch view must compute what onnxruntime computes before it is trained and written back."""
    want = pre_session.run(None, {pre_session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        was = body.training
        body.eval()
        try:
            got = body(x.to(device)).float().cpu().numpy()
        except Exception as e:  # an op the converter maps but cannot run with these attributes or shapes
            raise FnconvertError(f"the torch conversion of the graph fails on calibration samples ({_short(e)}); "
                                 "use --no-finetune (pure graph surgery), and report this with the model attached")
        body.train(was)
    diff = float(np.abs(got - want).max())
    if not diff <= 1e-3 * (1 + float(np.abs(want).max())):
        raise FnconvertError(
            f"the torch conversion of the graph differs from onnxruntime by {diff:.3g} on calibration samples; "
            "use --no-finetune (pure graph surgery), and report this with the model attached"
        )


# ---- the graph as a trainable torch module -----------------------------------------------------------------------


class OnnxModule(nn.Module):
    """The ONNX graph up to ``output`` as a trainable ``nn.Module``: one step per node, weights as parameters.

    Trainable: float initializers in weight slots (Conv W/b, Gemm A/B/C, MatMul operands, the bias of a MatMul +
    Add, BatchNormalization scale/bias). BatchNormalization running statistics are buffers that training updates.
    Everything else (shape tensors, constants) is a fixed buffer. A weight reached through an Identity (the legacy
    exporter shares equal initializers that way) gets its own parameter, as it had in the source model.
    """

    def __init__(self, model: onnx.ModelProto, output: str):
        super().__init__()
        g = model.graph
        self.opset = S.opset_of(model)
        self.input_name = S.graph_inputs(g)[0].name
        self.output_name = output
        producers = S._producers(g)
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        nodes = S.needed_nodes(g, [output])
        slots = _weight_slots(nodes, producers, inits, _SLOTS)
        stats = _weight_slots(nodes, producers, inits, {"BatchNormalization": (3, 4)})
        nodes = S.needed_nodes(g, [output], leaves=[self.input_name, *slots, *stats, *inits])
        _refuse_unsupported(nodes)
        self.params = nn.ParameterDict()
        self._keys: dict[str, str] = {}  # tensor name → parameter/buffer key (names with '.' are not keys)
        self._trained: dict[str, str] = {}  # tensor name → key, for what training changes (written back)
        for name, src in slots.items():
            self._keys[name] = key = f"p{len(self._keys)}"
            self.params[key] = nn.Parameter(torch.from_numpy(np.array(inits[src], dtype=np.float32)))
            self._trained[name] = key
        for name, src in stats.items():  # running statistics: updated in place by training, never shared
            self._keys[name] = key = f"b{len(self._keys)}"
            self.register_buffer(key, torch.from_numpy(np.array(inits[src], dtype=np.float32)))
            self._trained[name] = key
        needed = {i for n in nodes for i in n.input if i}
        for name in sorted(needed - set(self._keys)):
            if name in inits:
                self._keys[name] = key = f"b{len(self._keys)}"
                self.register_buffer(key, torch.from_numpy(np.array(inits[name])))
        self.steps = []
        ints: dict[str, list] = {}  # integer constants (shapes, axes) as Python ints: no data-dependent reads
        for name, value in inits.items():
            if np.issubdtype(value.dtype, np.integer) and value.ndim <= 1:
                ints[name] = value.reshape(-1).tolist()
        for n in nodes:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                value = np.array(_constant_value(attrs))
                self._keys[n.output[0]] = key = f"b{len(self._keys)}"
                self.register_buffer(key, torch.from_numpy(value))
                if np.issubdtype(value.dtype, np.integer) and value.ndim <= 1:
                    ints[n.output[0]] = value.reshape(-1).tolist()
                continue
            attrs["_ints"] = {i: ints[name] for i, name in enumerate(n.input) if name in ints}
            self.steps.append((n.op_type, list(n.input), list(n.output), attrs))

    def _tensor(self, key: str) -> torch.Tensor:
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {name: self._tensor(key) for name, key in self._keys.items()}
        env[self.input_name] = x
        for op, ins, outs, attrs in self.steps:
            res = _OPS[op](self, [env[i] if i else None for i in ins], attrs)
            env[outs[0]] = res
        return env[self.output_name]

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """name → value of every tensor training changes (parameters and BatchNormalization statistics)."""
        return {name: self._tensor(key).detach().cpu().numpy() for name, key in self._trained.items()}


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold the module's trained values (Identity-shared ones untied)."""
    import copy

    m = copy.deepcopy(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producers = S._producers(g)
    for name, value in module.trained_tensors().items():
        if name in inits:
            dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
        else:  # an Identity output that fed a weight slot: it becomes an initializer of its own
            g.node.remove(producers[name])
            g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    used = {i for sub in S._graphs(g) for n in sub.node for i in n.input} | {o.name for o in g.output}
    listed = {i.name for i in g.input}
    keep = [i for i in g.initializer if i.name in used or i.name in listed]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


_SLOTS = {"Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2)}  # trainable


def _weight_slots(nodes, producers, inits, table) -> dict[str, str]:
    """tensor name at a slot of ``table`` → the float initializer that holds it (through Identity chains)."""

    def source(name):
        while name not in inits:
            n = producers.get(name)
            if n is None or n.op_type != "Identity":
                return None
            name = n.input[0]
        return name if np.issubdtype(inits[name].dtype, np.floating) else None

    slots = {}
    for n in nodes:
        idx = table.get(n.op_type, ())
        fed_by_matmul = any(producers.get(i) is not None and producers[i].op_type == "MatMul" for i in n.input)
        if table is _SLOTS and n.op_type == "Add" and fed_by_matmul:
            idx = (0, 1)  # the bias of a MatMul + Add
        for i in idx:
            if i < len(n.input) and n.input[i]:
                src = source(n.input[i])
                if src is not None:
                    slots[n.input[i]] = src
    return slots


def _constant_value(attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise FnconvertError(f"a Constant node holds {sorted(attrs)}, which fine-tuning cannot read; use --no-finetune")


# The op set: each is f(module, inputs, attrs) → one tensor. Attribute checks that the torch path cannot honour are
# in _refuse_unsupported, so a refusal names the op before anything runs.


def _pads(pads, k):
    pads = list(pads) if pads else [0] * (2 * k)
    return pads[:k], pads[k:]


def _torch_pad(begin, end):  # F.pad lists the last dim first
    return [v for b, e in zip(reversed(begin), reversed(end)) for v in (b, e)]


def _conv(m, a, at):
    x, w, b = a[0], a[1], (a[2] if len(a) > 2 else None)
    k = w.dim() - 2
    begin, end = _pads(None if at.get("auto_pad", b"NOTSET") == b"VALID" else at.get("pads"), k)
    if begin != end:
        x, begin = F.pad(x, _torch_pad(begin, end)), [0] * k
    conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return conv(x, w, b, at.get("strides", [1] * k), begin, at.get("dilations", [1] * k), at.get("group", 1))


def _pool(m, a, at, kind):
    x = a[0]
    ks = at["kernel_shape"]
    k = len(ks)
    begin, end = _pads(None if at.get("auto_pad", b"NOTSET") == b"VALID" else at.get("pads"), k)
    strides, ceil = at.get("strides", [1] * k), bool(at.get("ceil_mode", 0))
    if kind == "max":
        if begin != end or any(2 * p > kk for p, kk in zip(begin, ks)):
            x, begin = F.pad(x, _torch_pad(begin, end), value=float("-inf")), [0] * k
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1]
        return fn(x, ks, strides, begin, at.get("dilations", [1] * k), ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
    return fn(x, ks, strides, begin, ceil, bool(at.get("count_include_pad", 0)))


def _gemm(m, a, at):
    A, B = a[0], a[1]
    C = a[2] if len(a) > 2 else None
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transA", 0):
        A = A.t()
    if alpha == 1.0 and beta == 1.0 and at.get("transB", 0):
        return F.linear(A, B, C)  # the nn.Linear layout: one fused kernel
    y = A @ (B.t() if at.get("transB", 0) else B)
    y = y * alpha if alpha != 1.0 else y
    return y if C is None else y + beta * C


def _batch_norm(m, a, at):
    # ONNX: running = running·momentum + batch·(1 − momentum); torch's momentum is the batch's weight.
    return F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=m.training, momentum=1 - at.get("momentum", 0.9),
                        eps=at.get("epsilon", 1e-5))


def _softmax(m, a, at, log):
    x = a[0]
    fn = torch.log_softmax if log else torch.softmax
    if m.opset >= 13:
        return fn(x, dim=at.get("axis", -1))
    axis = at.get("axis", 1) % x.dim()  # before opset 13: softmax over the flattened trailing dims
    return fn(x.flatten(axis), dim=-1).reshape(x.shape) if axis < x.dim() - 1 else fn(x, dim=-1)


def _flatten(m, a, at):
    x, axis = a[0], at.get("axis", 1) % (a[0].dim() + 1)
    if axis == 0:
        return x.reshape(1, -1)
    if axis == x.dim():
        return x.reshape(-1, 1)
    return x.flatten(0, axis - 1).flatten(1) if axis > 1 else x.flatten(1)


def _int_list(a, at, i: int) -> list[int]:
    """Input ``i`` as Python ints: from the graph's constants when it is one (so tracing and torch.export keep no
    data-dependent read), else read from the tensor."""
    return at["_ints"][i] if i in at["_ints"] else [int(v) for v in a[i].reshape(-1).tolist()]


def _reshape(m, a, at):
    x, shape = a[0], _int_list(a, at, 1)
    if not at.get("allowzero", 0):  # 0 copies the input's dim (traced as x.shape[i], so batch stays dynamic)
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _axes(m, a, at, since: int):
    """Axes from the attribute (older opsets) or the second input (opset ≥ ``since``); None if absent."""
    if m.opset >= since:
        return None if len(a) < 2 or a[1] is None else _int_list(a, at, 1)
    return at.get("axes")


def _unsqueeze(m, a, at):
    x, axes = a[0], _axes(m, a, at, 13)
    rank = x.dim() + len(axes)
    for ax in sorted(v % rank for v in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(m, a, at):
    axes = _axes(m, a, at, 13)
    return a[0].squeeze() if axes is None else a[0].squeeze(tuple(v % a[0].dim() for v in axes))


def _reduce_mean(m, a, at):
    x, axes = a[0], _axes(m, a, at, 18)
    if not axes:
        if at.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=bool(at.get("keepdims", 1)))


def _gather(m, a, at):
    x, idx, axis = a[0], a[1].long(), at.get("axis", 0) % a[0].dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _clip(m, a, at):
    if m.opset < 11:
        lo, hi = at.get("min"), at.get("max")
    else:
        lo = a[1] if len(a) > 1 else None
        hi = a[2] if len(a) > 2 else None
    return torch.clamp(a[0], lo, hi)


def _dropout(m, a, at):
    p = at.get("ratio", 0.5) if m.opset < 12 else (float(a[1]) if len(a) > 1 and a[1] is not None else 0.5)
    return F.dropout(a[0], p, training=m.training)


def _cast(m, a, at):
    return a[0].to(_TORCH_DTYPES[helper.tensor_dtype_to_np_dtype(at["to"]).name])


def _div(m, a, at):
    x, y = a
    return x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc")


def _shape(m, a, at):
    return torch._shape_as_tensor(a[0])[at.get("start", 0) : at.get("end", None)]  # traced, not a constant


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8,
                 "int8": torch.int8}

_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda m, a, at: torch.matmul(a[0], a[1]),
    "Add": lambda m, a, at: a[0] + a[1],
    "Sub": lambda m, a, at: a[0] - a[1],
    "Mul": lambda m, a, at: a[0] * a[1],
    "Div": _div,
    "Relu": lambda m, a, at: F.relu(a[0]),
    "LeakyRelu": lambda m, a, at: F.leaky_relu(a[0], at.get("alpha", 0.01)),
    "Sigmoid": lambda m, a, at: torch.sigmoid(a[0]),
    "Tanh": lambda m, a, at: torch.tanh(a[0]),
    "Erf": lambda m, a, at: torch.erf(a[0]),
    "Clip": _clip,
    "MaxPool": lambda m, a, at: _pool(m, a, at, "max"),
    "AveragePool": lambda m, a, at: _pool(m, a, at, "avg"),
    "GlobalAveragePool": lambda m, a, at: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda m, a, at: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Softmax": lambda m, a, at: _softmax(m, a, at, False),
    "LogSoftmax": lambda m, a, at: _softmax(m, a, at, True),
    "Identity": lambda m, a, at: a[0],
    "Dropout": _dropout,
    "Transpose": lambda m, a, at: a[0].permute(*(at.get("perm") or reversed(range(a[0].dim())))),
    "Concat": lambda m, a, at: torch.cat([t for t in a if t is not None], dim=at["axis"]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "ReduceMean": _reduce_mean,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
}
#: What fine-tuning can convert. ``--no-finetune`` takes any graph onnxruntime runs.
SUPPORTED_OPS = tuple(sorted([*_OPS, "Constant"]))


def _refuse_unsupported(nodes) -> None:
    bad = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in nodes
                  if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS})
    for n in nodes:  # supported ops with attributes the torch view does not honour
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            bad.append(f"{n.op_type}(auto_pad={at['auto_pad'].decode()})")
        elif n.op_type == "AveragePool":
            begin, end = _pads(at.get("pads"), len(at["kernel_shape"]))
            if begin != end and not at.get("count_include_pad", 0):
                bad.append("AveragePool(asymmetric pads)")
        elif n.op_type in ("MaxPool", "Dropout", "BatchNormalization") and len([o for o in n.output if o]) > 1:
            bad.append(f"{n.op_type}(several outputs)")
        elif n.op_type == "Cast" and helper.tensor_dtype_to_np_dtype(at["to"]).name not in _TORCH_DTYPES:
            bad.append(f"Cast(to={TensorProto.DataType.Name(at['to'])})")
    if bad:
        raise FnconvertError(
            f"fine-tuning converts the graph to torch, which does not support {', '.join(dict.fromkeys(bad))}; "
            "use --no-finetune for pure graph surgery with the calibrated factor head"
        )


_short = short_reason  # one implementation, in errors.py
