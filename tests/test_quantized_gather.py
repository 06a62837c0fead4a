"""fuse-quantized-gather: quantize's int8 embedding lookup (Gather, Cast, Gather, Mul) as one
com.microsoft.GatherBlockQuantized, exact."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tfgraph.passes import create_pass
from tfgraph.targets.cpu import INT4_EMBEDDINGS


def _lookup(width: int, vocab: int = 64) -> ir.Model:
    graph = onnx.parser.parse_graph(f"""
g (int64[B,S] ids) => (float[B,S,{width}] y) {{
    e = Gather <axis: int = 0> (table, ids)
    y = Mul (e, two)
}}""")
    rng = np.random.default_rng(0)
    graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "table"))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("width, block", [(48, 16), (576, 64), (512, 512)])
def test_int8_lookup_becomes_one_node_with_the_same_values(width, block):
    model = _lookup(width)
    create_pass("quantize", **INT4_EMBEDDINGS.to_options())(model)
    assert _ops(model)["Gather"] == 2  # the rows and their scales
    ids = np.array([[0, 5, 63], [7, 7, 1]], np.int64)
    before = _run(model, ids)
    fuse = create_pass("fuse-quantized-gather")
    assert fuse(model).modified
    assert fuse.report["quantized-gather"]["matches"] == 1
    assert _ops(model) == {"GatherBlockQuantized": 1, "Mul": 1}  # the Mul is the graph's own (y = e * 2)
    node = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert node.attributes.get_int("block_size") == block and node.attributes.get_int("bits") == 8
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.UINT8, ir.DataType.FLOAT}
    np.testing.assert_array_equal(_run(model, ids), before)


def test_rows_without_a_power_of_two_block_stay_four_nodes():
    model = _lookup(40)  # 40 = 8 * 5: no block of at least 16 divides a row
    create_pass("quantize", **INT4_EMBEDDINGS.to_options())(model)
    fuse = create_pass("fuse-quantized-gather")
    assert not fuse(model).modified
    assert "power-of-two block" in str(fuse.report["quantized-gather"])


def test_a_table_looked_up_twice_is_converted_once():
    graph = onnx.parser.parse_graph("""
g (int64[B,S] ids, int64[B,S] other) => (float[B,S,32] y) {
    e = Gather <axis: int = 0> (table, ids)
    f = Gather <axis: int = 0> (table, other)
    y = Add (e, f)
}""")
    graph.initializer.append(onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "table"))
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    create_pass("quantize", **INT4_EMBEDDINGS.to_options())(model)
    create_pass("dedup-initializers")(model)  # both lookups now read one int8 table
    ids, other = np.array([[1, 2]]), np.array([[3, 63]])
    feeds = {"ids": ids, "other": other}
    session = lambda m: ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),  # noqa: E731
                                             providers=["CPUExecutionProvider"])
    before = session(model).run(None, feeds)[0]
    assert create_pass("fuse-quantized-gather")(model).modified
    lookups = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 2 and lookups[0].inputs[0] is lookups[1].inputs[0]
    assert len(model.graph.initializers) == 2  # one uint8 table, one set of scales
    np.testing.assert_array_equal(session(model).run(None, feeds)[0], before)
