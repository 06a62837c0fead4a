"""Packing sibling projections into one MatMul + Split."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser

import tfgraph

from tests._checks import assert_matches_source


def _model(*, shared_weight: bool = False) -> onnx.ModelProto:
    extra = "    xr = Relu (x)\n    z = MatMul (xr, Wq)\n" if shared_weight else ""
    outputs = "float[B,S,8] q2, float[B,S,8] k2, float[B,S,4] v2" + (", float[B,S,8] z" if shared_weight else "")
    text = f"""
g (float[B,S,16] x) => ({outputs}) {{
    q = MatMul (x, Wq)
    qb = Add (q, bq)
    k = MatMul (x, Wk)
    kb = Add (bk, k)
    v = MatMul (x, Wv)
    vb = Add (v, bv)
    q2 = Relu (qb)
    k2 = Sigmoid (kb)
    v2 = Tanh (vb)
{extra}}}
"""
    graph = onnx.parser.parse_graph(text)
    rng = np.random.default_rng(0)
    for name, shape in (("Wq", (16, 8)), ("Wk", (16, 8)), ("Wv", (16, 4)), ("bq", (8,)), ("bk", (8,)), ("bv", (4,))):
        graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8)


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def test_siblings_pack_with_biases():
    artifact = tfgraph.compile(_model(), "cpu-fp32", extra_passes=["pack-projections"])
    ops = _ops(artifact.model)
    assert (ops["MatMul"], ops["Add"], ops["Split"]) == (1, 1, 1)
    packed = next(n for n in artifact.model.graph if n.op_type == "MatMul").inputs[1].const_value
    assert list(packed.shape) == [16, 20]
    summary = artifact.manifest["summary"]
    assert summary["params_after"] == summary["params_before"] + 3  # + the 3 split sizes, nothing duplicated
    assert_matches_source(artifact, _model(), shapes={"B": 3, "S": 5})


def test_shared_weight_is_not_packed():
    """Negative twin: Wq also feeds another MatMul; packing it would store it twice."""
    artifact = tfgraph.compile(_model(shared_weight=True), "cpu-fp32", extra_passes=["pack-projections"])
    ops = _ops(artifact.model)
    # Wk and Wv still pack; Wq's two MatMuls stay.
    assert (ops["MatMul"], ops["Split"]) == (3, 1)
    summary = artifact.manifest["summary"]
    assert summary["bytes_after"] <= summary["bytes_before"] + 16
    assert_matches_source(artifact, _model(shared_weight=True))
