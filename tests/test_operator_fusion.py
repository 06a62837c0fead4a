"""Operator fusions into onnxruntime contrib ops, and the trailing-None honesty corner."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import pytest

import tfgraph
from tests._checks import assert_matches_source


def _ops(model) -> collections.Counter:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _rules(manifest) -> dict:
    record = next(r for r in manifest["passes"] if r["name"] == "fuse-ort-operators")
    return {name: entry["matches"] for name, entry in record["rules"].items()}


def _ffn(gelu_body: str) -> onnx.ModelProto:
    text = f"""
<ir_version: 8, opset_import: ["" : 18]>
g (float[B,S,16] x, float[B,S,16] skip) => (float[B,S,16] y) {{
    h = MatMul (x, W1)
    hb = Add (h, b1)
{gelu_body}
    o = MatMul (act, W2)
    r = Add (o, skip)
    y = LayerNormalization <axis: int = -1, epsilon: float = 1e-5> (r, gamma, beta)
}}
"""
    graph = onnx.parser.parse_graph(text.split("\n", 2)[2])
    rng = np.random.default_rng(0)
    for name, shape in (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 16)), ("gamma", (16,)), ("beta", (16,))):
        graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8)


ERF_GELU = """
    sqrt2 = Constant <value_float: float = 1.4142135> ()
    d = Div (hb, sqrt2)
    e = Erf (d)
    one = Constant <value_float: float = 1.0> ()
    e1 = Add (e, one)
    m = Mul (hb, e1)
    half = Constant <value_float: float = 0.5> ()
    act = Mul (m, half)
"""


def test_erf_gelu_bias_and_skip_layernorm_fuse():
    artifact = tfgraph.compile(_ffn(ERF_GELU), "cpu-fp32", extra_passes=["fuse-ort-operators", "remove-dead"])
    assert _rules(artifact.manifest) == {"gelu-erf": 1, "gelu-tanh": 0, "bias-gelu": 1, "skip-layer-norm": 1, "skip-rms-norm": 0}
    ops = _ops(artifact.model)
    assert ops["com.microsoft::BiasGelu"] == 1 and ops["com.microsoft::SkipLayerNormalization"] == 1
    assert "Erf" not in ops and "LayerNormalization" not in ops
    assert_matches_source(artifact, _ffn(ERF_GELU))


def test_not_quite_gelu_stays():
    """Negative twin: 0.6 instead of 0.5 is not Gelu, and must not be fused."""
    artifact = tfgraph.compile(
        _ffn(ERF_GELU.replace("value_float: float = 0.5", "value_float: float = 0.6")),
        "cpu-fp32",
        extra_passes=["fuse-ort-operators", "remove-dead"],
    )
    rules = _rules(artifact.manifest)
    assert rules["gelu-erf"] == 0 and rules["bias-gelu"] == 0
    assert "Erf" in _ops(artifact.model)
    assert_matches_source(artifact, _ffn(ERF_GELU.replace("value_float: float = 0.5", "value_float: float = 0.6")))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_bert_small_operator_fusions(tmp_path, exporter):
    pytest.importorskip("torch")
    from tfgraph.compiler.export import export

    path = export("bert-small", tmp_path / "m.onnx", exporter=exporter)
    artifact = tfgraph.compile(path, "cpu-fp32", extra_passes=["fuse-ort-operators", "remove-dead"])
    rules = _rules(artifact.manifest)
    # Two layers: one BiasGelu each; SkipLayerNormalization after attention and after the FFN.
    assert rules["bias-gelu"] == 2
    assert rules["skip-layer-norm"] >= 4
    assert_matches_source(artifact, path, shapes={"batch": 3, "sequence": 11})
