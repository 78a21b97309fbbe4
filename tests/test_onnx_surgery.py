"""FN surgery on ONNX graphs, and the torch view used to fine-tune them.

Graphs are built by hand with ``onnx.helper`` (every head form, every refusal) or exported from small torch models;
every numeric check runs the real onnxruntime against an independent numpy computation of the FN formula.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fnconvert import onnx_surgery as S
from fnconvert.errors import FnconvertError
from fnconvert.onnx_io import OnnxModule, write_back

SHAPE = (2, 3, 3)  # C, H, W of the hand-made graphs' inputs
P = int(np.prod(SHAPE))
K = 4  # classes


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def classifier(head: str = "gemm", tail: str | None = None, *, after: tuple = (), opset: int = 17, seed: int = 0,
               input_name: str = "x", output_name: str = "y", extra_nodes=(), batch="N"):
    """Flatten → dense (Gemm | MatMul+Add | MatMul) → [pass-throughs] → [tail]: a logistic regression graph."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(size=(K, P)), rng.normal(size=K)
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "b"),
             numpy_helper.from_array(W.T.astype(np.float32).copy(), "Wt")]
    nodes = [helper.make_node("Flatten", [input_name], ["flat"], name="flatten", axis=1)]
    if head == "gemm":
        nodes.append(helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], name="fc", transB=1))
    elif head == "matmul_add":
        nodes += [helper.make_node("MatMul", ["flat", "Wt"], ["mm"], name="fc_mm"),
                  helper.make_node("Add", ["mm", "b"], ["logits"], name="fc_add")]
    else:
        nodes.append(helper.make_node("MatMul", ["flat", "Wt"], ["logits"], name="fc_mm"))
    last = "logits"
    for i, op in enumerate(after):
        if op == "Reshape":
            inits.append(numpy_helper.from_array(np.array([-1, K], np.int64), f"shape{i}"))
            nodes.append(helper.make_node("Reshape", [last, f"shape{i}"], [f"after{i}"], name=f"reshape{i}"))
        else:
            nodes.append(helper.make_node(op, [last], [f"after{i}"], name=f"{op.lower()}{i}"))
        last = f"after{i}"
    nodes += list(extra_nodes)
    used = {i for n in nodes for i in n.input}
    inits = [i for i in inits if i.name in used]
    b = b if "b" in used else np.zeros(K)
    if tail:
        nodes.append(helper.make_node(tail, [last], [output_name], name="tail", axis=1))
    else:
        nodes[-1].output[0] = output_name
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                            [batch, *SHAPE])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model, W, b


def factors(seed: int = 1, d: int = 2):
    rng = np.random.default_rng(seed)
    V = np.linalg.qr(rng.normal(size=(P, d)))[0]
    return rng.normal(size=P) * 0.1, V, V.T.copy(), rng.normal(size=(d, K))


def fn_reference(x, W, b, mean, V, B, C, tail=None):
    """The FN formula in float64 numpy: tail(W·r + b + z·C) with z = (x − μ)V, r = x − zB."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    z = (flat - mean) @ V
    pre = (flat - z @ B) @ W.T + b + z @ C
    if tail == "Softmax":
        e = np.exp(pre - pre.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    if tail == "LogSoftmax":
        return pre - pre.max(1, keepdims=True) - np.log(np.exp(pre - pre.max(1, keepdims=True)).sum(1, keepdims=True))
    return pre


@pytest.fixture
def x():
    return np.random.default_rng(2).uniform(size=(5, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("head,tail,after", [
    ("gemm", None, ()), ("matmul_add", None, ()), ("matmul", None, ()), ("gemm", "Softmax", ()),
    ("matmul_add", "LogSoftmax", ()), ("gemm", "Softmax", ("Identity", "Reshape", "Flatten")),
    ("gemm", None, ("Identity", "Reshape")),
])
def test_fn_graph_matches_the_numpy_formula_for_every_head_form(head, tail, after, x):
    model, W, b = classifier(head, tail, after=after)
    spec, h = S.analyze(model)
    assert h.tail == {None: "none", "Softmax": "softmax", "LogSoftmax": "log_softmax"}[tail]
    assert h.num_classes == K and ("MatMul" in h.dense or "Gemm" in h.dense)
    mean, V, B, C = factors()
    fn = S.insert_fn(model, spec, h, mean, V, B, C, {"fnconvert.factors": "2"})
    S.check(fn)
    got = run(fn, x)
    np.testing.assert_allclose(got, fn_reference(x, W, b, mean, V, B, C, tail), atol=2e-5, rtol=1e-5)
    if tail == "Softmax":
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_the_drop_in_keeps_names_types_dynamic_batch_and_opset_and_carries_metadata(x):
    model, *_ = classifier("gemm", "Softmax", opset=13, input_name="pixels", output_name="probs", batch="B")
    spec, h = S.analyze(model)
    meta = {"fnconvert.version": "0.1.0", "fnconvert.factors": "2", "fnconvert.singular_values": [3.0, 2.0, 1.0],
            "fnconvert.output": "softmax"}
    fn = S.insert_fn(model, spec, h, *factors(), meta)
    S.check(fn)
    assert fn.graph.input[0] == model.graph.input[0] and fn.graph.output[0] == model.graph.output[0]
    assert S.opset_of(fn) == 13 and fn.ir_version == model.ir_version
    props = {p.key: p.value for p in fn.metadata_props}
    assert props["fnconvert.singular_values"] == "[3.0, 2.0, 1.0]" and props["fnconvert.factors"] == "2"
    for n in (1, 7):  # the batch stays dynamic
        assert run(fn, np.repeat(x[:1], n, 0)).shape == (n, K)
    assert model.graph.node[0].input[0] == "pixels", "the source model must not be edited in place"


def test_names_already_in_the_graph_do_not_collide(x):
    # A graph that already uses fnconvert's preferred names: fresh ones are chosen, and the checker passes.
    taken = helper.make_node("Identity", ["logits"], ["fnconvert/V"], name="fnconvert/V_node")
    model, W, b = classifier("gemm", extra_nodes=[taken])
    spec, h = S.analyze(model)
    mean, V, B, C = factors()
    fn = S.insert_fn(model, spec, h, mean, V, B, C)
    S.check(fn)
    np.testing.assert_allclose(run(fn, x), fn_reference(x, W, b, mean, V, B, C), atol=2e-5)


def test_a_symbolic_sample_dim_stays_symbolic(x):
    model, W, b = classifier("gemm")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"  # (N, 2, H, 3): the reshape reads Shape(x)
    spec, h = S.analyze(model)
    mean, V, B, C = factors()
    fn = S.insert_fn(model, spec, h, mean, V, B, C)
    S.check(fn)
    assert "Shape" in {n.op_type for n in fn.graph.node}
    assert fn.graph.input[0] == model.graph.input[0]
    np.testing.assert_allclose(run(fn, x), fn_reference(x, W, b, mean, V, B, C), atol=2e-5)


def test_a_flat_input_needs_no_reshape():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(K, P))
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "flat",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", P])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", K])],
                          [numpy_helper.from_array(W.astype(np.float32), "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    spec, h = S.analyze(model)
    mean, V, B, C = factors()
    fn = S.insert_fn(model, spec, h, mean, V, B, C)
    S.check(fn)
    assert not any(n.op_type in ("Reshape", "Flatten") for n in fn.graph.node)
    xs = rng.uniform(size=(3, P)).astype(np.float32)
    np.testing.assert_allclose(run(fn, xs), fn_reference(xs, W, 0.0, mean, V, B, C), atol=2e-5)


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_refuses_several_inputs():
    model, *_ = classifier()
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1]))
    with pytest.raises(FnconvertError, match="2 inputs .*'x', 'mask'.*single"):
        S.analyze(model)


def test_initializers_listed_as_inputs_are_not_inputs():
    model, *_ = classifier()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [K, P]))  # IR < 4 style
    assert S.analyze(model)[0].name == "x"


@pytest.mark.parametrize("elem,needle", [(TensorProto.INT64, "non-float type INT64"),
                                         (TensorProto.UINT8, "non-float type UINT8"),
                                         (TensorProto.FLOAT16, "FLOAT16; fnconvert converts float32")])
def test_refuses_a_non_float32_input(elem, needle):
    model, *_ = classifier()
    model.graph.input[0].type.tensor_type.elem_type = elem
    with pytest.raises(FnconvertError, match=needle):
        S.input_spec(model)


def test_refuses_a_fixed_batch_and_names_the_fix():
    model, *_ = classifier(batch=1)
    with pytest.raises(FnconvertError, match="fixed batch size 1.*dynamic"):
        S.input_spec(model)


@pytest.mark.parametrize("after,tail,found", [(("Relu",), None, "Relu 'relu0'"),
                                              (("Sigmoid",), "Softmax", "Sigmoid 'sigmoid0'")])
def test_refuses_a_graph_without_final_dense_layer_and_names_what_it_found(after, tail, found):
    model, *_ = classifier("gemm", tail, after=after)
    with pytest.raises(FnconvertError, match=f"no final dense layer.*from {found}"):
        S.find_head(model)


def test_refuses_a_conv_net_ending_in_pooling():
    model = _export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), (2, 3, 8, 8))
    with pytest.raises(FnconvertError, match="no final dense layer.*GlobalAveragePool"):
        S.find_head(model)


def test_refuses_a_softmax_over_the_batch():
    model, *_ = classifier("gemm", "Softmax")
    model.graph.node[-1].attribute[0].i = 0
    with pytest.raises(FnconvertError, match="axis 0, the batch"):
        S.find_head(model)


def test_factor_shapes_must_fit_the_input():
    model, *_ = classifier()
    spec, h = S.analyze(model)
    mean, V, B, C = factors()
    with pytest.raises(FnconvertError, match="17 features but the ONNX input 'x' has 18"):
        S.insert_fn(model, spec, h, mean[:-1], V[:-1], B[:, :-1], C)


# ---- the torch view (fine-tuning) --------------------------------------------------------------------------------


def _export(module: nn.Module, shape, **kw) -> onnx.ModelProto:
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buf, dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **kw)
    return onnx.load_from_string(buf.getvalue())


class _ManyOps(nn.Module):
    """Every op family the converter documents, with BatchNorm left unfolded."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6 * 2 * 2 + 6, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = nn.functional.max_pool2d(torch.tanh(self.c2(h)), 2, ceil_mode=True)
        a = nn.functional.avg_pool2d(torch.sigmoid(h), 2)
        g = h.mean(dim=(2, 3))
        return torch.log_softmax(self.fc(torch.cat([torch.flatten(a, 1), g], 1)), dim=1)


@pytest.fixture(scope="module")
def many_ops():
    torch.manual_seed(0)
    m = _ManyOps()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return _export(m, (2, 3, 16, 16), do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)


def test_torch_view_matches_onnxruntime_on_many_ops(many_ops):
    assert "BatchNormalization" in {n.op_type for n in many_ops.graph.node}
    x = np.random.default_rng(0).uniform(size=(3, 3, 16, 16)).astype(np.float32)
    module = OnnxModule(many_ops, "output").eval()
    got = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, run(many_ops, x), atol=1e-5)


def test_training_changes_are_written_back_into_the_graph(many_ops):
    x = torch.from_numpy(np.random.default_rng(1).uniform(size=(4, 3, 16, 16)).astype(np.float32))
    module = OnnxModule(many_ops, "output")
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    loss = -module(x)[:, 0].mean()
    loss.backward()
    opt.step()  # parameters move; BatchNorm statistics moved during the train-mode forward
    module.eval()
    trained = write_back(many_ops, module)
    onnx.checker.check_model(trained, full_check=True)
    want = module(x).detach().numpy()
    np.testing.assert_allclose(run(trained, x.numpy()), want, atol=1e-5)
    assert np.abs(run(many_ops, x.numpy()) - want).max() > 1e-3, "training should have changed the outputs"


def test_initializers_shared_through_identity_are_trained_as_separate_weights():
    # The legacy exporter deduplicates equal initializers through Identity nodes; each use gets its own parameter.
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w1"]), helper.make_node("Identity", ["w"], ["w2"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    module = OnnxModule(model, "y")
    assert len(list(module.parameters())) == 2
    with torch.no_grad():
        list(module.parameters())[0].mul_(3.0)
    out = write_back(model, module)
    onnx.checker.check_model(out, full_check=True)
    assert sorted(i.name for i in out.graph.initializer) == ["w1", "w2"]
    assert not any(n.op_type == "Identity" for n in out.graph.node)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_allclose(run(out, x), module(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_unsupported_ops_are_refused_by_name_with_the_fix():
    model = _export(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Hardswish(), nn.Softplus(), nn.Linear(8, 3)),
                    (2, 3, 2, 2), opset_version=18)
    with pytest.raises(FnconvertError, match="does not support HardSwish, Softplus; use --no-finetune"):
        OnnxModule(model, "output")
    S.analyze(model)  # the graph surgery itself takes any op onnxruntime runs


def test_same_upper_padding_is_refused_as_an_attribute():
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")])
    with pytest.raises(FnconvertError, match=r"Conv\(auto_pad=SAME_UPPER\)"):
        OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "y")
