"""FN surgery on an ONNX graph: model in, model out. numpy and ``onnx`` only: no torch, no onnxruntime.

    z = x·V − μV,   r = reshape(x − z·B̂),   the original graph runs on r,   pre ← pre + z·C

Flow, as in onnx-graphsurgeon: :func:`analyze` reads the graph into a small form (:class:`InputSpec`,
:class:`Head`), :func:`insert_fn` edits a copy, :func:`check` runs the full checker. Files are read and written
only by the caller (``onnx_io``).

Why plain ``onnx`` and not onnx-graphsurgeon or onnx-ir: the edit is a dozen nodes and one rename. Protobuf edits plus
a producer index do that with no new dependency (onnx-graphsurgeon is not installed here and is NVIDIA's; onnx-ir
comes with onnxscript, but its API still moves between minor versions), and keep every untouched node, attribute,
value_info and metadata entry of the source exactly as it was.

Design choices, each measured or forced by the graph:
- Three Gemms do the arithmetic: ``z = x·V + (−μV)`` (μV precomputed, so no full-size ``x − μ`` pass),
  ``r = x − z·B̂`` (one Gemm with x as its C input instead of MatMul + Sub) and ``pre = body + z·C``. Against
  the plain MatMul/Sub/Shape form this cut the FN cost on the small CNN of benchmarks/overhead.py from 15 % to 11 %
  of a batch-1 run and from 6 % to 4 % at batch 32 (CPU time, 1 thread); for ResNet-18 at batch 32 the FN nodes
  are 0.5 % of node time in ORT's profiler. What is left is about two passes over the input. Flatten and Reshape
  are views.
- The reshape back takes a constant ``[0, C, H, W]`` (0 copies the batch dim), or ``Shape(x)`` when a sample dim
  is symbolic: a dynamic batch (or any dynamic dim) stays dynamic.
- The factor term is added to the tensor that feeds the trailing Softmax/LogSoftmax, or to the graph output when
  there is none. Identity/Reshape/Flatten between the dense layer and that point are linear pass-throughs, so adding
  there equals adding at the dense layer's pre-activation, and the tensor is the (batch, classes) one by construction.
- The tensor keeps its name: its producer's output is renamed and the new Gemm writes the old name. So every
  consumer, the graph output name and any value_info stay valid without rewiring.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import FnconvertError, short_reason

#: Metadata keys written on the FN model; the same as the PyTorch path's export.
META_KEYS = ("fnconvert.version", "fnconvert.factors", "fnconvert.singular_values", "fnconvert.preprocessing",
             "fnconvert.output", "fnconvert.source_sha256", "fnconvert.input_shape")
#: Ops that only reshape or copy the final layer's output: the factor term can be added after them as well.
PASSTHROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Dropout")
TAILS = {"Softmax": "softmax", "LogSoftmax": "log_softmax"}
MIN_OPSET = 7  # numpy-style broadcasting of Sub/Add, which the split relies on
PREFIX = "fnconvert/"


@dataclass(frozen=True)
class InputSpec:
    """The graph's one input: name, element type and shape (ints, symbolic names, or None when unknown)."""

    name: str
    elem_type: int
    shape: tuple

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.shape[1:])

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()


@dataclass(frozen=True)
class Head:
    """Where the factor term goes: the tensor ``pre`` (pre-softmax scores), the tail after it, the dense op before."""

    output: str  # the graph output's name
    pre: str  # the tensor z·C is added to (softmax input, or the graph output)
    tail: str  # "none" | "softmax" | "log_softmax"
    dense: str  # e.g. "Gemm 'node_linear'"
    num_classes: int | None  # None when the output's class dim is symbolic


# ---- reading ---------------------------------------------------------------------------------------------------


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def graph_inputs(graph: onnx.GraphProto) -> list:
    """The real inputs: old exporters (IR < 4) also list every initializer as a graph input."""
    inits = {i.name for i in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    return [i for i in graph.input if i.name not in inits]


def analyze(model: onnx.ModelProto) -> tuple[InputSpec, Head]:
    """Check the graph is a one-input float32 classifier that ends in a dense layer; say where FN attaches."""
    return input_spec(model), find_head(model)


def input_spec(model: onnx.ModelProto) -> InputSpec:
    g = model.graph
    inputs = graph_inputs(g)
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise FnconvertError(
            f"the ONNX graph has {len(inputs)} inputs ({names}); fnconvert needs a classifier with one input: "
            "export the model with a single image/feature input"
        )
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise FnconvertError(f"the ONNX input {inp.name!r} is not a tensor; export the model with a tensor input")
    tt = inp.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT:
        name = TensorProto.DataType.Name(tt.elem_type)
        if tt.elem_type in (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            raise FnconvertError(
                f"the ONNX input {inp.name!r} is {name}; fnconvert converts float32 graphs: export the model in "
                "float32 (e.g. model.float() before torch.onnx.export)"
            )
        raise FnconvertError(
            f"the ONNX input {inp.name!r} has the non-float type {name}; fnconvert needs a float32 image or feature "
            "input: move any integer preprocessing (e.g. uint8 → float) out of the graph"
        )
    if not tt.HasField("shape"):
        raise FnconvertError(f"the ONNX input {inp.name!r} has no shape; export it with a shape (batch, ...)")
    shape = tuple(_dim(d) for d in tt.shape.dim)
    if len(shape) < 2:
        raise FnconvertError(f"the ONNX input {inp.name!r} has shape {list(shape)}; fnconvert needs (batch, features…)")
    if isinstance(shape[0], int):
        raise FnconvertError(
            f"the ONNX input {inp.name!r} has a fixed batch size {shape[0]}; the drop-in model is verified at batch "
            "1 and 64: re-export with a dynamic batch (dynamic_axes={name: {0: 'batch'}} or dynamic_shapes)"
        )
    return InputSpec(inp.name, tt.elem_type, shape)


def _dim(d) -> int | str | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or None


def find_head(model: onnx.ModelProto) -> Head:
    """Walk back from the output past Identity/Reshape/Flatten and a Softmax/LogSoftmax to the final dense layer."""
    g = model.graph
    if len(g.output) != 1:
        names = ", ".join(repr(o.name) for o in g.output)
        raise FnconvertError(
            f"the ONNX graph has {len(g.output)} outputs ({names}); fnconvert needs a classifier with one output: "
            "export only the class scores"
        )
    producers = _producers(g)
    types = _inferred_types(model)
    out = g.output[0].name
    out_shape = _shape_of(types.get(out) or g.output[0].type)
    if out_shape is not None and len(out_shape) != 2:
        raise FnconvertError(
            f"the ONNX output {out!r} has shape {list(out_shape)}; fnconvert needs a classifier returning "
            "(batch, classes) scores"
        )
    num_classes = out_shape[1] if out_shape is not None and isinstance(out_shape[1], int) else None

    def skip(name):
        node = producers.get(name)
        while node is not None and node.op_type in PASSTHROUGH and node.domain in ("", "ai.onnx") and node.input:
            name = node.input[0]
            node = producers.get(name)
        return node

    pre, tail = out, "none"
    node = skip(out)
    if node is not None and node.op_type in TAILS and node.input:
        tail, pre = TAILS[node.op_type], node.input[0]
        axis = _attr(node, "axis", 1 if opset_of(model) < 13 else -1)
        pre_shape = _shape_of(types.get(pre))
        rank = len(pre_shape) if pre_shape is not None else 2
        if rank != 2:
            raise FnconvertError(
                f"the {node.op_type} {node.name!r} runs on a rank-{rank} tensor; fnconvert needs it on "
                "(batch, classes) scores"
            )
        if axis % 2 != 1:
            raise FnconvertError(
                f"the {node.op_type} {node.name!r} runs over axis {axis}, the batch; fnconvert needs it over the "
                "classes (axis 1 or -1)"
            )
        node = skip(pre)
    dense = _dense_name(node, producers)
    if dense is None:
        found = "the graph input" if node is None else f"{node.op_type} {node.name!r}"
        where = "pre-softmax scores come" if tail != "none" else "output comes"
        raise FnconvertError(
            f"no final dense layer: the model's {where} from {found}; FN adds the factor at a final Gemm or "
            "MatMul (+ Add), so end the model with a Linear layer"
        )
    pre_type = types.get(pre)
    if pre_type is not None and pre_type.tensor_type.elem_type not in (0, TensorProto.FLOAT):
        name = TensorProto.DataType.Name(pre_type.tensor_type.elem_type)
        raise FnconvertError(f"the scores {pre!r} are {name}; fnconvert converts float32 graphs: export in float32")
    return Head(out, pre, tail, dense, num_classes)


def _dense_name(node, producers) -> str | None:
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Gemm", "MatMul"):
        return f"{node.op_type} {node.name!r}"
    if node.op_type == "Add":
        for name in node.input:
            p = producers.get(name)
            if p is not None and p.op_type == "MatMul":
                return f"MatMul {p.name!r} + Add {node.name!r}"
    return None


def _producers(graph: onnx.GraphProto) -> dict:
    return {o: n for n in graph.node for o in n.output if o}


def _inferred_types(model: onnx.ModelProto) -> dict:
    """name → TypeProto from shape inference (best effort: a graph it cannot infer still converts)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is advisory here; the full check after surgery is the gate
        inferred = model
    g = inferred.graph
    return {v.name: v.type for v in [*g.value_info, *g.output, *g.input]}


def _shape_of(type_proto) -> tuple | None:
    if type_proto is None or not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(_dim(d) for d in type_proto.tensor_type.shape.dim)


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ---- editing ---------------------------------------------------------------------------------------------------


class _Names:
    """Fresh tensor and node names that collide with nothing in the graph (subgraphs included)."""

    def __init__(self, model: onnx.ModelProto):
        self.used = set()
        for g in _graphs(model.graph):
            self.used.update(i.name for i in [*g.input, *g.output, *g.value_info, *g.initializer])
            for n in g.node:
                self.used.update([*n.input, *n.output, n.name])

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def insert_fn(model: onnx.ModelProto, spec: InputSpec, head: Head, mean, V, B, C,
              metadata: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` in FN form: the split after the input, ``+ z·C`` at ``head.pre``, FN metadata attached.

    ``mean`` (p,), ``V`` (p, d), ``B`` (d, p), ``C`` (d, classes); float64 in, float32 constants out. The input and
    output names, types and dynamic dims are the source's; the opset is kept (raised to 7 only when older).
    """
    mean, V, B, C = (np.asarray(a, dtype=np.float64) for a in (mean, V, B, C))
    p, d = V.shape
    if B.shape != (d, p) or mean.shape != (p,) or C.ndim != 2 or C.shape[0] != d:
        raise FnconvertError(
            f"factor shapes do not fit: mean {mean.shape}, V {V.shape}, B {B.shape}, C {C.shape}; refit the factors"
        )
    static = [s for s in spec.sample_shape if isinstance(s, int)]
    if len(static) == len(spec.sample_shape) and int(np.prod(static)) != p:
        raise FnconvertError(
            f"the factors have {p} features but the ONNX input {spec.name!r} has {int(np.prod(static))} per sample "
            f"({list(spec.sample_shape)}); fit them on data shaped like the model's input"
        )
    m = _raise_opset(copy.deepcopy(model))
    g = m.graph
    new = _Names(m)
    x = spec.name

    # Everything that read x now reads the residual r (subgraphs that capture x included).
    r = new(PREFIX + "residual")
    for sub in _graphs(g):
        for n in sub.node:
            for i, name in enumerate(n.input):
                if name == x:
                    n.input[i] = r

    def const(base: str, value: np.ndarray) -> str:
        name = new(PREFIX + base)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list, base: str, output: str | None = None, **attrs) -> onnx.NodeProto:
        out = output or new(PREFIX + base)
        return helper.make_node(op, inputs, [out], name=new(PREFIX + base + "_node"), **attrs)

    v, mv, b, c = const("V", V), const("neg_mean_V", -(mean @ V)[None, :]), const("B", B), const("C", C)
    # Three Gemms do all the arithmetic, each in one pass: z = x·V + (−μV), r = x − z·B̂, pre = body + z·C.
    # (Two fewer nodes and one fewer full-size pass than MatMul/Sub pairs; Flatten/Shape/Reshape are views.)
    split = []
    flat = x
    if len(spec.shape) > 2:  # images: flatten to (batch, p) for the projection, reshape back for the residual
        split.append(node("Flatten", [x], "flat", axis=1))
        flat = split[-1].output[0]
    split.append(node("Gemm", [flat, v, mv], "z"))
    z = split[-1].output[0]
    if len(spec.shape) > 2:
        split.append(node("Gemm", [z, b, flat], "residual_flat", alpha=-1.0))
        r_flat = split[-1].output[0]
        if all(isinstance(s, int) for s in spec.sample_shape):  # 0 copies the batch dim: no Shape node at run time
            shape = new(PREFIX + "input_shape")
            g.initializer.append(numpy_helper.from_array(np.array([0, *spec.sample_shape], np.int64), shape))
        else:
            split.append(node("Shape", [x], "input_shape"))
            shape = split[-1].output[0]
        split.append(node("Reshape", [r_flat, shape], "residual", output=r))
    else:
        split.append(node("Gemm", [z, b, flat], "residual", output=r, alpha=-1.0))

    # The head: the producer of `pre` now writes `pre/fn_body`; the new Gemm writes `pre` itself.
    producers = _producers(g)
    body = new(head.pre + "/fnconvert_body")
    prod = producers[head.pre]
    prod.output[list(prod.output).index(head.pre)] = body
    add = [node("Gemm", [z, c, body], "add_factor", output=head.pre)]

    nodes = list(g.node)
    at = nodes.index(prod) + 1
    del g.node[:]
    g.node.extend(split + nodes[:at] + add + nodes[at:])  # topological: the split first, the Add right after body
    if metadata:
        set_metadata(m, metadata)
    return m


def _raise_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = opset_of(model)
    if opset >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:
        raise FnconvertError(
            f"the ONNX graph uses opset {opset}, older than the {MIN_OPSET} FN needs, and onnx.version_converter "
            f"cannot raise it ({_short(e)}); re-export the model with opset ≥ {MIN_OPSET}"
        )


def set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    """Set ``metadata_props`` entries (JSON for non-strings), replacing entries of the same key."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)


def pre_activation_model(model: onnx.ModelProto, head: Head) -> onnx.ModelProto:
    """A copy whose one output is ``head.pre`` (the pre-softmax scores); nodes after it are dropped."""
    if head.pre == head.output:
        return model
    m = copy.deepcopy(model)
    g = m.graph
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(head.pre, TensorProto.FLOAT, None))
    keep = needed_nodes(g, [head.pre])
    del g.node[:]
    g.node.extend(keep)
    return m


def needed_nodes(graph: onnx.GraphProto, outputs, leaves=()) -> list:
    """The nodes ``outputs`` depend on, in graph order; the walk stops at ``leaves`` (tensors given from outside)."""
    producers = _producers(graph)
    stop = set(leaves)
    need, todo = set(), list(outputs)
    while todo:
        name = todo.pop()
        n = producers.get(name)
        if name in stop or n is None or id(n) in need:
            continue
        need.add(id(n))
        todo.extend(i for i in n.input if i)
        for a in n.attribute:  # names a subgraph reads from the outer scope
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                todo.extend(i for s in _graphs(sub) for nn in s.node for i in nn.input if i)
    return [n for n in graph.node if id(n) in need]


def check(model: onnx.ModelProto | str) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference): the gate every rewritten graph passes.

    ``model`` is a ModelProto, or the path of a saved model (the only way to check one over 2 GB)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise FnconvertError(f"the rewritten ONNX graph fails onnx.checker ({_short(e)}); report this as a bug with "
                             "the source model attached")


_short = short_reason  # one implementation, in errors.py
