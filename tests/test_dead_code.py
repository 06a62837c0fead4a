"""remove-dead on contrib ops: optional outputs nothing reads are left unnamed (onnxruntime skips them)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tfgraph.passes import create_pass


def _skip_norm_model(read_sum: bool, expose_mean: bool = False) -> onnx.ModelProto:
    """SkipSimplifiedLayerNormalization with all four outputs named; the sum (output 3) read by an Add when
    ``read_sum``, the mean (output 1) a graph output when ``expose_mean``."""
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y", "mean", "inv_std", "sum"],
                              domain="com.microsoft", epsilon=1e-6)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8])]
    nodes.append(helper.make_node("Add", ["y", "sum"], ["out"]) if read_sum else helper.make_node("Identity", ["y"], ["out"]))
    if expose_mean:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8]) for n in ("x", "skip")],
                              outputs, [numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "gamma")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _after(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    model = ir.serde.deserialize_model(proto)
    result = create_pass("remove-dead")(model)
    return ir.serde.serialize_model(result.model), result.modified


def test_unread_optional_outputs_of_a_contrib_op_are_unnamed_and_trailing_ones_dropped():
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 3, 8)).astype(np.float32) for n in ("x", "skip")}
    for read_sum, want in ((True, ["y", "", "", "sum"]), (False, ["y"])):
        proto = _skip_norm_model(read_sum)
        after, modified = _after(proto)
        node = next(n for n in after.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
        assert modified and list(node.output) == want, (read_sum, list(node.output))
        np.testing.assert_array_equal(_run(after, feeds)[0], _run(proto, feeds)[0])


def test_graph_outputs_and_required_outputs_keep_their_names():
    after, _ = _after(_skip_norm_model(read_sum=True, expose_mean=True))
    node = next(n for n in after.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert list(node.output) == ["y", "mean", "", "sum"]  # the mean is a graph output
    proto = _skip_norm_model(read_sum=True)
    for n in proto.graph.node:  # only the sum read: output 0 is required by the schema, so it stays
        if n.op_type == "Add":
            n.input[:] = ["sum", "sum"]
    after, modified = _after(proto)
    node = next(n for n in after.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert modified and list(node.output) == ["y", "", "", "sum"]


def test_nothing_to_drop_is_not_a_change():
    proto = _skip_norm_model(read_sum=True)
    once, _ = _after(proto)
    again, modified = _after(once)
    assert not modified and [list(n.output) for n in again.graph.node] == [list(n.output) for n in once.graph.node]
