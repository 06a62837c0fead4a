"""Small hand-built ONNX models for the front-door and hostile-input tests (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(graph: onnx.GraphProto, opset: int = 18, extra_opsets: tuple = ()) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              producer_name="tfgraph-tests")
    model.ir_version = 10
    return model


def positions_model(positions: int = 8, vocab: int = 10, hidden: int = 4) -> onnx.ModelProto:
    """input_ids[batch, sequence] → word + position embeddings, the positions a Range over the
    sequence gathered from a table of ``positions`` rows (as GPT-2's dynamo export does)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "wte"),
        numpy_helper.from_array(rng.standard_normal((positions, hidden)).astype(np.float32), "wpe"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"]),
        helper.make_node("Gather", ["wpe", "positions"], ["pos"], axis=0),
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"], axis=0),
        helper.make_node("Add", ["tok", "pos"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "positions",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        inits,
    )
    return _model(graph)


def dropout_model(training: bool = True) -> onnx.ModelProto:
    """x → MatMul → Dropout(ratio 0.5, training_mode) → y: random outputs when ``training``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        numpy_helper.from_array(np.array(training), "training"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Dropout", ["h", "ratio", "training"], ["y"], name="train_dropout"),
    ]
    graph = helper.make_graph(
        nodes, "dropout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    return _model(graph)


def static_input_model(dim: int) -> onnx.ModelProto:
    """One float input of a fixed (possibly enormous) size → Relu."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 4])],
    )
    return _model(graph)


def transposed_dims_model() -> onnx.ModelProto:
    """Two inputs sharing dimensions in opposite orders: a[batch, sequence], b[sequence, batch]."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]), helper.make_node("Add", ["a", "bt"], ["y"])],
        "transposed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "sequence"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["sequence", "batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    return _model(graph)


def attention_model(batch: int = 2, seq: int = 5, hidden: int = 8, heads: int = 2, fused: bool = True) -> onnx.ModelProto:
    """Self-attention on q = k = v = x[batch, seq, hidden]: com.microsoft.MultiHeadAttention when
    ``fused``, else the same computation in standard ops (MatMul, Softmax, MatMul)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, hidden])
    if fused:
        node = helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["y"], domain="com.microsoft", num_heads=heads)
        graph = helper.make_graph([node], "mha", [x], [y])
        return _model(graph, extra_opsets=(helper.make_opsetid("com.microsoft", 1),))
    head = hidden // heads
    inits = [
        numpy_helper.from_array(np.array([batch, seq, heads, head], np.int64), "split"),
        numpy_helper.from_array(np.array([batch, seq, hidden], np.int64), "merge"),
        numpy_helper.from_array(np.array(1 / np.sqrt(head), np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["xs"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "q"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctxt", "merge"], ["y"]),
    ]
    return _model(helper.make_graph(nodes, "attention", [x], [y], inits))
