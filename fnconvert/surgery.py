"""Model reconstruction: the FN wrapper around the original model, and its calibrated factor head.

For a final dense layer W·h + b, splicing the factor z in gives W·h + b + z·C. So the FN model is

    z = (x − μ)·V,   r = x − z·B̂,   out = tail(body(r) + z·C)

where ``body`` is the original model up to the final dense layer's pre-activation and ``tail`` is a trailing
softmax or log-softmax (or nothing). The residual keeps the input's mean on purpose: the original model was trained
on inputs with that mean (its biases and BatchNorm statistics expect it), so only the factor's variation is removed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import FnconvertError, short_reason

# Ops that merely reshape or copy the final layer's output: z·C can be added after them just as well.
_PASSTHROUGH = {
    "aten::view", "aten::reshape", "aten::flatten", "aten::squeeze", "aten::contiguous", "aten::clone",
    "aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::detach", "aten::to",
    "aten::type_as", "prim::TupleUnpack",
}
_DENSE = {"aten::linear", "aten::addmm", "aten::matmul", "aten::mm", "aten::bmm", "aten::einsum"}
_TAILS = {"aten::softmax": "softmax", "aten::log_softmax": "log_softmax", "aten::_softmax": "softmax",
          "aten::_log_softmax": "log_softmax"}


@dataclass(frozen=True)
class OutputAnalysis:
    tail: str  # "none" | "softmax" | "log_softmax"
    dim: int
    dense_op: str  # the op that produced the pre-activation, e.g. aten::linear
    num_classes: int


def analyze_output(module: nn.Module, example: torch.Tensor) -> OutputAnalysis:
    """Walk the traced graph back from the output: find a trailing softmax and check a dense layer precedes it."""
    with torch.no_grad():
        try:
            out = module(example)
        except Exception as e:
            raise FnconvertError(
                f"the model rejects inputs of shape {tuple(example.shape)} from the data ({_short(e)}); "
                "give data of the shape the model was trained on, or the matching --normalize"
            )
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FnconvertError(
            f"the model's output is {shape}; fnconvert needs a classifier returning (batch, classes) scores"
        )
    graph = _torchscript_graph(module, example)
    node = _producer(list(graph.return_node().inputs())[0])
    tail, dim = "none", -1
    node = _skip_passthrough(node)
    if node is not None and node.kind() in _TAILS:
        tail = _TAILS[node.kind()]
        dim = _const_int(list(node.inputs())[1], default=-1)
        node = _skip_passthrough(_producer(list(node.inputs())[0]))
    kind = node.kind() if node is not None else "the input"
    if kind == "aten::add" or kind == "aten::add_":
        ins = [_skip_passthrough(_producer(v)) for v in list(node.inputs())[:2]]
        if any(n is not None and n.kind() in _DENSE for n in ins):
            kind = "aten::matmul+add"
    if kind not in _DENSE and kind != "aten::matmul+add":
        raise FnconvertError(
            f"no final dense layer: the model's {'pre-softmax ' if tail != 'none' else ''}output comes from "
            f"{kind!r}; FN adds the factor at a final Linear/Gemm layer, so end the model with one"
        )
    if dim < 0:
        dim += 2
    if tail != "none" and dim != 1:
        raise FnconvertError(f"the model's final {tail} runs over dim {dim}; fnconvert needs it over the classes (dim 1)")
    return OutputAnalysis(tail, dim, kind, int(out.shape[1]))


def _torchscript_graph(module: nn.Module, example: torch.Tensor):
    if isinstance(module, torch.jit.ScriptModule):
        return module.inlined_graph
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values are irrelevant for the walk
            traced = torch.jit.trace(module, example, check_trace=False)
        return traced.inlined_graph
    except Exception as e:
        raise FnconvertError(f"the model cannot be traced to find its final layer ({_short(e)}); "
                             "save it as TorchScript or torch.export (.pt2) and retry")


def _producer(value):
    node = value.node()
    return None if node.kind() == "prim::Param" else node


def _skip_passthrough(node):
    while node is not None and node.kind() in _PASSTHROUGH:
        node = _producer(next(iter(node.inputs())))
    return node


def _const_int(value, default: int) -> int:
    node = value.node()
    if node.kind() == "prim::Constant":
        try:
            return int(node.i("value"))
        except Exception:
            return default
    return default


def split_body(module: nn.Module, analysis: OutputAnalysis) -> tuple[nn.Module, str]:
    """Return (body, pre) where ``body`` ends at the final layer's pre-activation when it can be cut out.

    ``pre`` is how to map the body's output back to pre-activation space: "none" when the body was cut before the
    softmax, "log" when the softmax could not be cut (softmax(log p + z·C) = softmax(l + z·C), since softmax is
    invariant to a per-row shift), "none" for log-softmax bodies too (log_softmax(log p + z·C) = log_softmax(l + z·C)).
    """
    if analysis.tail == "none":
        return module, "none"
    cut = _fx_cut_softmax(module)
    if cut is not None:
        return cut, "none"
    return module, ("log" if analysis.tail == "softmax" else "none")


def _fx_cut_softmax(module: nn.Module):
    """Cut a trailing softmax off an fx-traceable module; None when that is not possible (e.g. TorchScript)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    import torch.fx as fx

    try:
        gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
        gm = copy.deepcopy(gm) if gm is module else gm
    except Exception:
        return None
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    arg = out_node.args[0]
    wrapped = isinstance(arg, (tuple, list))  # exported graphs return a flat tuple of leaves: keep that form
    if wrapped:
        if len(arg) != 1:
            return None
        arg = arg[0]
    node = arg
    # fx nodes for reshapes after the softmax are rare; only a direct softmax is cut.
    if not isinstance(node, fx.Node) or not _is_fx_softmax(gm, node):
        return None
    out_node.args = ((node.args[0],),) if wrapped else (node.args[0],)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _is_fx_softmax(gm, node) -> bool:
    import torch.nn.functional as F

    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Softmax, nn.LogSoftmax))
    if node.op == "call_method":
        return node.target in ("softmax", "log_softmax")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return node.target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax) or "softmax" in name
    return False


class FNModel(nn.Module):
    """The trainable FN model. One parameter per factor row of C, so each factor gets its own optimizer group."""

    def __init__(self, body: nn.Module, mean, V, B, C, *, tail: str = "none", pre: str = "none"):
        super().__init__()
        self.body = body
        self.register_buffer("fn_mean", _f32(mean))
        self.register_buffer("fn_V", _f32(V))
        self.register_buffer("fn_B", _f32(B))
        C = _f32(C)
        self.factor_heads = nn.ParameterList([nn.Parameter(C[j : j + 1].clone()) for j in range(C.shape[0])])
        self.tail = tail
        self.pre = pre

    @property
    def C(self) -> torch.Tensor:
        return torch.cat(list(self.factor_heads), 0)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor z (n, d), residual r shaped like x)."""
        flat = x.reshape(x.shape[0], -1)
        z = (flat - self.fn_mean) @ self.fn_V
        r = x - (z @ self.fn_B).reshape(x.shape)
        return z, r

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        z, r = self.split(x)
        return _body_out(self.body(r), self.pre) + z @ self.C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_tail(self.pre_activation(x), self.tail)

    def deploy(self) -> "FNDeploy":
        """A frozen copy for export: C as one buffer, a forward simple enough for TorchScript and ONNX."""
        with torch.no_grad():
            C = self.C.detach().clone()
        return FNDeploy(self.body, self.fn_mean, self.fn_V, self.fn_B, C, self.tail, self.pre).eval()


class FNDeploy(nn.Module):
    """The FN model as exported: a drop-in replacement that takes and returns what the original did."""

    def __init__(self, body, mean, V, B, C, tail: str, pre: str):
        super().__init__()
        self.body = body
        self.register_buffer("fn_mean", mean.detach().clone())
        self.register_buffer("fn_V", V.detach().clone())
        self.register_buffer("fn_B", B.detach().clone())
        self.register_buffer("fn_C", C)
        self.log_pre = pre == "log"
        self.tail_softmax = tail == "softmax"
        self.tail_log_softmax = tail == "log_softmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        z = (flat - self.fn_mean) @ self.fn_V
        r = x - (z @ self.fn_B).reshape(x.shape)
        h = self.body(r)
        if self.log_pre:
            h = torch.log(torch.clamp(h, min=1e-38))
        out = h + z @ self.fn_C
        if self.tail_softmax:
            out = torch.softmax(out, dim=1)
        elif self.tail_log_softmax:
            out = torch.log_softmax(out, dim=1)
        return out


def _f32(a) -> torch.Tensor:
    """A float32 CPU copy of a tensor or an array (any strides, e.g. a reversed eigenvector matrix)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32).clone()
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _body_out(h: torch.Tensor, pre: str) -> torch.Tensor:
    # A softmax body we could not cut: log p equals the logits up to a per-row shift, which softmax ignores.
    return torch.log(torch.clamp(h, min=1e-38)) if pre == "log" else h


def _apply_tail(h: torch.Tensor, tail: str) -> torch.Tensor:
    if tail == "softmax":
        return torch.softmax(h, dim=1)
    if tail == "log_softmax":
        return torch.log_softmax(h, dim=1)
    return h


def to_pre_activation(out: torch.Tensor, tail: str) -> torch.Tensor:
    """The original model's output mapped to pre-activation space (up to a per-row shift for softmax tails)."""
    if tail == "softmax":
        return torch.log(torch.clamp(out, min=1e-38))
    return out


def calibrate_head(model: nn.Module, fn: FNModel, batches, analysis: OutputAnalysis) -> np.ndarray:
    """Least-squares factor head C: FN pre-activations match the original model's on the calibration batches.

    Minimizes Σ‖t − body(r) − z·C‖² with t the original pre-activation. It is exact for a linear model
    (C = B̂·Wᵀ) and the best start the data allows for a deep one. With a softmax tail the logits are known only up
    to a per-row shift, so both sides are centred per row first. Sums are accumulated in float64.
    """
    ztz = zty = None  # created on the first batch's device (the GPU when the model runs there)
    was_training = (model.training, fn.training)
    model.eval()
    fn.eval()
    with torch.no_grad():
        for x in batches:
            x = x[0] if isinstance(x, (tuple, list)) else x
            t = to_pre_activation(model(x), analysis.tail)
            z, r = fn.split(x)
            resid = t - _body_out(fn.body(r), fn.pre)
            if analysis.tail != "none":
                resid = resid - resid.mean(dim=1, keepdim=True)
            z64 = z.double()
            ztz = z64.T @ z64 if ztz is None else ztz + z64.T @ z64
            part = z64.T @ resid.double()
            zty = part if zty is None else zty + part
    model.train(was_training[0])
    fn.train(was_training[1])
    if zty is None:
        raise FnconvertError("no calibration samples to fit the factor head; give --calib-samples ≥ 1")
    from .distributed import all_reduce_sum_

    all_reduce_sum_(ztz)  # under torchrun every rank saw its shard: the normal equations add up exactly
    all_reduce_sum_(zty)
    C = torch.linalg.lstsq(ztz, zty).solution
    return C.cpu().numpy()


def build_fn_model(model: nn.Module, factors, calib_batches, example: torch.Tensor) -> tuple[FNModel, OutputAnalysis]:
    """Wrap ``model`` into its FN form with a calibrated factor head. ``model`` becomes the FN model's body."""
    analysis = analyze_output(model, example)
    body, pre = split_body(model, analysis)
    zeros = np.zeros((factors.d, analysis.num_classes))
    fn = FNModel(body, factors.mean, factors.V, factors.B, zeros, tail=analysis.tail, pre=pre)
    C = calibrate_head(model, fn, calib_batches, analysis)
    with torch.no_grad():
        for j, p in enumerate(fn.factor_heads):
            p.copy_(torch.as_tensor(C[j : j + 1], dtype=torch.float32))
    return fn, analysis


_short = short_reason  # one implementation, in errors.py
