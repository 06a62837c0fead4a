"""fuse-normalization (decomposed LayerNorm / RMSNorm) and the skip-RMSNorm lowering, each with a negative twin."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from tfgraph.compiler import verify
from tfgraph.passes.registry import create_pass

HIDDEN = 16


def _model(body: str, opset: int = 18, extra_inputs: str = "") -> ir.Model:
    text = f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[B,S,{HIDDEN}] x{extra_inputs}) => (float[B,S,{HIDDEN}] y) {{
{body}
}}
"""
    graph = onnx.parser.parse_graph(text.split("\n", 2)[2])
    rng = np.random.default_rng(0)
    for name in ("gamma", "beta"):
        graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), name))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def _layer_norm(axes_as_input: bool, axis: int = -1) -> str:
    if axes_as_input:
        mean = f"axes = Constant <value_ints: ints = [{axis}]> ()\n    mu = ReduceMean (x, axes)"
        var = "var = ReduceMean (sq, axes)"
    else:
        mean = f"mu = ReduceMean <axes: ints = [{axis}]> (x)"
        var = f"var = ReduceMean <axes: ints = [{axis}]> (sq)"
    return f"""
    {mean}
    d = Sub (x, mu)
    two = Constant <value_float: float = 2.0> ()
    sq = Pow (d, two)
    {var}
    eps = Constant <value_float: float = 1e-5> ()
    ve = Add (var, eps)
    std = Sqrt (ve)
    n = Div (d, std)
    m = Mul (n, gamma)
    y = Add (m, beta)"""


def _rms(exponent: float = 2.0, division: str = "reciprocal") -> str:
    divide = {
        "reciprocal": "r = Reciprocal (std)\n    n = Mul (x, r)",
        "div": "n = Div (x, std)",
    }[division]
    return f"""
    axes = Constant <value_ints: ints = [-1]> ()
    p = Constant <value_float: float = {exponent}> ()
    sq = Pow (x, p)
    var = ReduceMean (sq, axes)
    eps = Constant <value_float: float = 1e-6> ()
    ve = Add (var, eps)
    std = Sqrt (ve)
    {divide}
    y = Mul (gamma, n)"""


def _histogram(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph if n.op_type != "Constant"
    )


def _fuse(model: ir.Model, name: str = "fuse-normalization"):
    feeds = verify.generate_inputs(model, {"B": 2, "S": 5}, seed=0)
    want = verify.run(model, feeds)
    fusion = create_pass(name)
    result = fusion(model)
    got = verify.run(model, feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5)
    return result, fusion.report


@pytest.mark.parametrize("opset, axes_as_input", [(18, True), (17, False)])
def test_layer_norm(opset, axes_as_input):
    model = _model(_layer_norm(axes_as_input), opset=opset)
    result, report = _fuse(model)
    assert result.modified and report["layer-norm"]["matches"] == 1
    assert _histogram(model) == {"LayerNormalization": 1}
    node = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-5)


def test_layer_norm_over_another_axis_is_left_alone():
    model = _model(_layer_norm(True, axis=1))
    result, report = _fuse(model)
    assert not result.modified and report["layer-norm"]["matches"] == 0
    assert "near_miss" in report["layer-norm"]


def test_layer_norm_needs_opset_17():
    model = _model(_layer_norm(False), opset=16)
    result, report = _fuse(model)
    assert not result.modified
    assert report["layer-norm"] == {"matches": 0, "skipped": "model opset 16 < 17"}


@pytest.mark.parametrize("division", ["reciprocal", "div"])
def test_rms_norm(division):
    model = _model(_rms(division=division))
    result, report = _fuse(model)
    assert result.modified and report["rms-norm"]["matches"] == 1
    assert _histogram(model) == {"tfgraph::RMSNormalization": 1}
    assert ("tfgraph", "RMSNormalization", "") in model.functions


def test_rms_norm_with_another_exponent_is_left_alone():
    model = _model(_rms(exponent=3.0))
    result, report = _fuse(model)
    assert not result.modified and report["rms-norm"]["matches"] == 0


def test_skip_rms_norm_keeps_the_residual_sum():
    """Add → RMSNorm, the sum also feeding the next residual: SkipSimplifiedLayerNormalization's 4th output."""
    body = "    h = Add (x, skip)\n" + _rms().replace("(x, p)", "(h, p)").replace("(x, r)", "(h, r)").replace(
        "y = Mul (gamma, n)", "o = Mul (gamma, n)\n    y = Add (o, h)"
    )
    model = _model(body, extra_inputs=f", float[B,S,{HIDDEN}] skip")
    _fuse(model)
    result, report = _fuse(model, "fuse-ort-operators")
    assert result.modified and report["skip-rms-norm"]["matches"] == 1
    assert _histogram(model) == {"com.microsoft::SkipSimplifiedLayerNormalization": 1, "Add": 1}
    skip = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    residual = next(n for n in model.graph if n.op_type == "Add")
    assert residual.inputs[1] is skip.outputs[3]
