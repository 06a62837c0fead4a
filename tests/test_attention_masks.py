"""Mask classification by evaluation (classify-attention-masks) and the causal lowering to GroupQueryAttention."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from tfgraph import ops
from tfgraph.compiler import verify
from tfgraph.passes.attention_lowering import LowerAttentionPass
from tfgraph.passes.attention_masks import ClassifyAttentionMasksPass, classify
from tfgraph.passes.registry import create_pass

MIN = np.finfo(np.float32).min


def _band(s, t, left=None, right=0):
    offset = np.arange(t)[None, :] - np.arange(s)[:, None] - (t - s)
    visible = offset <= right
    if left is not None:
        visible &= offset >= -left
    return visible


def _bias(visible, fill=MIN, visible_value=0.0):
    return np.where(visible, visible_value, fill).astype(np.float32)


def _padded(visible, lengths, left=False):
    """(B, 1, S, T): ``visible`` and key padding per batch row."""
    out = []
    for n in lengths:
        keys = np.zeros(visible.shape[1], bool)
        if left:
            keys[visible.shape[1] - n :] = True
        else:
            keys[:n] = True
        out.append(visible & keys[None, :])
    return np.stack(out)[:, None]


@pytest.mark.parametrize("fill", [MIN, -np.inf, -10000.0])
def test_causal(fill):
    probes = [_bias(_band(s, s), fill)[None, None] for s in (16, 7)]
    assert classify(probes) == {"kind": "causal"}


def test_causal_with_cached_keys_is_bottom_right_aligned():
    assert classify([_bias(_band(4, 12))[None, None], _bias(_band(3, 7))[None, None]]) == {"kind": "causal"}
    # Top-left aligned with cached keys is not causal in that sense: the query sees too little.
    top_left = np.tril(np.ones((4, 12), bool))
    assert classify([_bias(top_left)[None, None]])["kind"] == "bias"


def test_causal_plus_padding_is_causal_bias():
    probes = [_bias(_padded(_band(16, 16), [16, 11])), _bias(_padded(_band(7, 7), [7, 4, 2], left=True))]
    assert classify(probes) == {"kind": "causal_bias"}


def test_causal_with_position_bias_is_causal_bias():
    """ALiBi-like: future masked, visible entries a finite bias (not 0)."""
    s = 9
    slopes = -np.abs(np.arange(s)[None, :] - np.arange(s)[:, None]).astype(np.float32) * 0.5
    bias = np.where(_band(s, s), slopes, MIN)[None, None]
    assert classify([bias]) == {"kind": "causal_bias"}


def test_sliding_window():
    # Window 8 (Mistral's sliding_window=8: the current key and 7 before it). At S=7 the band
    # is not visible yet; the longer probe shows it.
    probes = [_bias(_band(7, 7, left=7))[None, None], _bias(_band(16, 16, left=7))[None, None]]
    assert classify(probes) == {"kind": "window", "window_left": 7, "window_right": 0}
    padded = [_bias(_padded(_band(16, 16, left=7), [16, 10]))]
    assert classify(padded) == {"kind": "window_bias", "window_left": 7, "window_right": 0}


def test_two_sided_window():
    probes = [_bias(_band(16, 16, left=3, right=3))[None, None], _bias(_band(9, 9, left=3, right=3))[None, None]]
    assert classify(probes) == {"kind": "window", "window_left": 3, "window_right": 3}


@pytest.mark.parametrize(
    "make",
    [
        lambda: _bias(np.triu(np.ones((8, 8), bool)))[None, None],  # anti-causal
        lambda: np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32),  # general bias
        lambda: _bias(_padded(np.ones((8, 8), bool), [8, 5])),  # key padding only
        lambda: np.where(_band(8, 8), 0.0, np.nan)[None, None],  # NaN
    ],
    ids=["anti-causal", "random", "padding-only", "nan"],
)
def test_not_causal(make):
    assert classify([make()])["kind"] == "bias"


def test_window_must_be_the_same_in_every_plane():
    """Different heads with different windows: no single band, so not a window."""
    bias = np.stack([_bias(_band(12, 12, left=3)), _bias(_band(12, 12, left=5))])[None]
    assert classify([bias])["kind"] in ("causal_bias", "window_bias")
    assert classify([bias]).get("window_left", 5) == 5  # masked at least outside the wider band


# A decoder layer's attention in the neutral form, with the mask built from the input's
# shape (Range / LessOrEqual / Where, as exporters do) and optionally the padding mask.
DECODER = """
<ir_version: 8, opset_import: ["" : 18, "tfgraph" : 1]>
g (float[B,S,16] x, int64[B,S] attention_mask) => (float[B,S,16] y) {{
    shape = Shape (x)
    seq = Gather <axis: int = 0> (shape, one)
    rows = Range (zero, seq, one)
    rows2 = Unsqueeze (rows, ax1)
    cols = Unsqueeze (rows, ax0)
    visible = LessOrEqual (cols, rows2)
    {padding}
    neg = Constant <value_float: float = -3.4028234663852886e38> ()
    zf = Constant <value_float: float = 0.0> ()
    bias = Where (allowed, zf, neg)
    q = MatMul (x, Wq)
    k = MatMul (x, Wk)
    v = MatMul (x, Wv)
    y = tfgraph.Attention <num_heads: int = 2, scale: float = 0.5, mask_kind: string = "bias"> (q, k, v, bias)
}}
"""
NO_PADDING = """ax_b = Constant <value_ints: ints = [0, 1]> ()
    allowed = Unsqueeze (visible, ax_b)"""
WITH_PADDING = """keys = Cast <to: int = 9> (attention_mask)
    keys4 = Unsqueeze (keys, ax12)
    allowed = And (visible, keys4)"""


def _decoder(padding: str) -> ir.Model:
    text = DECODER.format(padding=padding)
    graph = onnx.parser.parse_graph(text.split("\n", 2)[2])
    rng = np.random.default_rng(0)
    for name in ("Wq", "Wk", "Wv"):
        graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, name))
    for name, value in (("zero", 0), ("one", 1)):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    for name, value in (("ax0", [0]), ("ax1", [1]), ("ax12", [1, 2])):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("tfgraph", 1)], ir_version=8
    )
    model = ir.serde.deserialize_model(proto)
    ops.ensure_defined(model, "Attention")
    create_pass("infer-shapes")(model)  # the lowering reads sequence lengths from shapes
    return model


@pytest.mark.parametrize(
    "padding, kind, label",
    [(NO_PADDING, "causal", "causal"), (WITH_PADDING, "causal", "causal+padding(attention_mask)")],
)
def test_pass_classifies_and_gqa_is_exact(padding, kind, label):
    model = _decoder(padding)
    feeds = verify.generate_inputs(model, {"B": 3, "S": 10}, seed=0)
    want = verify.run(model, feeds)["y"]
    classify_pass = ClassifyAttentionMasksPass()
    assert classify_pass(model).modified
    (node,) = [n for n in model.graph if n.domain == ops.DOMAIN]
    assert node.attributes.get_string("mask_kind") == kind
    assert classify_pass.report == {label: {"matches": 1}}
    assert not ClassifyAttentionMasksPass()(model).modified  # classified blocks are not examined again
    lower = LowerAttentionPass(to="com.microsoft.MultiHeadAttention", causal_to="com.microsoft.GroupQueryAttention")
    assert lower(model).modified
    histogram = collections.Counter(n.op_type for n in model.graph)
    assert histogram["GroupQueryAttention"] == 1 and histogram["MultiHeadAttention"] == 0
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert len(gqa.inputs) == (11 if padding == WITH_PADDING else 7)  # the bias rides along only when needed
    assert lower.report == {"com.microsoft.GroupQueryAttention": {"matches": 1}}  # first match wins
    got = verify.run(model, feeds)["y"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_general_bias_stays_bias_and_lowers_to_mha():
    model = _decoder(NO_PADDING)
    # Replace the causal comparison by its opposite: an anti-causal mask.
    node = next(n for n in model.graph if n.op_type == "LessOrEqual")
    node.op_type = "GreaterOrEqual"
    classify_pass = ClassifyAttentionMasksPass()
    assert not classify_pass(model).modified
    assert classify_pass.report == {"bias": {"matches": 1}}
    LowerAttentionPass(causal_to="com.microsoft.GroupQueryAttention")(model)
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MultiHeadAttention"]


def test_gqa_needs_head_size_multiple_of_8():
    """Head size 4 (8 wide, 2 heads): GroupQueryAttention's kernel rejects it, so MultiHeadAttention."""
    model = _decoder(NO_PADDING)
    node = next(n for n in model.graph if n.domain == ops.DOMAIN)
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", 4)
    feeds = verify.generate_inputs(model, {"B": 2, "S": 6}, seed=0)
    want = verify.run(model, feeds)["y"]
    ClassifyAttentionMasksPass()(model)
    LowerAttentionPass(causal_to="com.microsoft.GroupQueryAttention")(model)
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
    np.testing.assert_allclose(verify.run(model, feeds)["y"], want, atol=1e-5, rtol=1e-5)


def test_mask_kinds_are_a_closed_set():
    """Every kind the lowerings read is a MaskKind; text outside the set is refused, not misread."""
    import onnx_ir as ir

    from tfgraph.ops import MaskKind

    assert {k.value for k in MaskKind} == {"none", "bias", "padding", "causal", "causal_bias", "window", "window_bias",
                                           "blocks", "block_sparse"}
    node = ir.node("Attention", [], domain="tfgraph", attributes={"mask_kind": "causal_bias"}, num_outputs=1)
    assert MaskKind.of(node) is MaskKind.CAUSAL_BIAS and MaskKind.of(node).causal and not MaskKind.of(node).exact
    node.attributes["mask_kind"] = ir.AttrString("mask_kind", "casual")
    with pytest.raises(ValueError):
        MaskKind.of(node)
    assert MaskKind.of(ir.node("Attention", [], domain="tfgraph", num_outputs=1)) is MaskKind.BIAS
