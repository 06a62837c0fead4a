"""decompose-unsupported: contrib ops a target's table lacks become standard ONNX with the same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tfgraph.passes import create_pass

H = 16


def _model(opset: int = 20):
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("FusedMatMul", ["x", "w"], ["m"], domain="com.microsoft", transB=1, alpha=0.5),
        helper.make_node("BiasGelu", ["m", "b"], ["g1"], domain="com.microsoft"),
        helper.make_node("FastGelu", ["g1", "b"], ["g2"], domain="com.microsoft"),
        helper.make_node("Gelu", ["g2"], ["g3"], domain="com.microsoft"),
        helper.make_node("QuickGelu", ["g3"], ["g4"], domain="com.microsoft", alpha=1.5),
        helper.make_node("Gelu", ["g4"], ["g5"], approximate="tanh"),
        helper.make_node("SkipLayerNormalization", ["g5", "x", "gamma", "beta", "b"], ["n1", "", "", "sum1"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("SkipSimplifiedLayerNormalization", ["n1", "sum1", "gamma"], ["y"], domain="com.microsoft",
                         epsilon=1e-6),
    ]
    graph = helper.make_graph(nodes, "contrib", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, H])],
                              [init("w", H, H), init("b", H), init("gamma", H), init("beta", H)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_contrib_ops_decompose_for_tensorrt():
    proto = _model()
    x = np.random.default_rng(1).standard_normal((2, 5, H)).astype(np.float32)
    want = _run(proto, x)
    model = ir.serde.deserialize_model(proto)
    p = create_pass("decompose-unsupported", table="tensorrt")
    assert p(model).modified
    assert {n.domain for n in model.graph} <= {""}
    assert p.report["left"] == {}
    # Every contrib op; ai.onnx Gelu (opset 20) is in TensorRT 10.1's list and stays.
    assert sum(p.report["decomposed"].values()) == 7 and "Gelu" not in p.report["decomposed"]
    assert [n.op_type for n in model.graph].count("Gelu") == 1
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), x), want, rtol=1e-5, atol=1e-5)


def test_supported_ops_are_left_alone():
    """The CPU runtime has every one of these kernels: nothing to do, modified is False."""
    model = ir.serde.deserialize_model(_model())
    before = [n.op_type for n in model.graph]
    p = create_pass("decompose-unsupported", table="runtime:CPUExecutionProvider")
    assert not p(model).modified
    assert [n.op_type for n in model.graph] == before


def test_unknown_decomposition_is_reported_not_dropped():
    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    p = create_pass("decompose-unsupported", table="tensorrt")
    assert not p(model).modified
    assert p.report["left"] == {"Det": 1}
