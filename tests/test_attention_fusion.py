"""Attention fusion rules on small hand-written graphs, each with a negative twin.

Every positive graph must fuse to one ``tfgraph.Attention`` (and then one
``com.microsoft.MultiHeadAttention``) with outputs equal to the unfused graph; every
negative twin differs in one detail that changes the math, and must stay unfused with
the near miss reported.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import tfgraph
from tests._checks import assert_matches_source
from tfgraph.errors import StrictError

HEADS, SIZE = 4, 8
HIDDEN = HEADS * SIZE
SCALE = 1 / math.sqrt(SIZE)
QUARTER = math.sqrt(SCALE)


def _model(body: str, *, mask: bool = True, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.2 for n in ("Wq", "Wk", "Wv")}
    inputs = f"float[B,S,{HIDDEN}] x" + (", float[B,1,1,S] mask" if mask else "")
    text = f"""
<ir_version: 8, opset_import: ["" : 18]>
g ({inputs}) => (float[B,S,{HIDDEN}] y) {{
    q = MatMul (x, Wq)
    k = MatMul (x, Wk)
    v = MatMul (x, Wv)
    shape4 = Constant <value_ints: ints = [0, 0, {HEADS}, {SIZE}]> ()
    shape3 = Constant <value_ints: ints = [0, 0, {HIDDEN}]> ()
    q4 = Reshape (q, shape4)
    k4 = Reshape (k, shape4)
    v4 = Reshape (v, shape4)
    qh = Transpose <perm: ints = [0, 2, 1, 3]> (q4)
    vh = Transpose <perm: ints = [0, 2, 1, 3]> (v4)
{body}
    ctx = MatMul (probs, vh)
    ctx_t = Transpose <perm: ints = [0, 2, 1, 3]> (ctx)
    y = Reshape (ctx_t, shape3)
}}
"""
    graph = onnx.parser.parse_graph(text.split("\n", 2)[2])
    graph.initializer.extend(onnx.numpy_helper.from_array(w, n) for n, w in weights.items())
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


EAGER = f"""
    kt = Transpose <perm: ints = [0, 2, 3, 1]> (k4)
    raw = MatMul (qh, kt)
    div = Constant <value_float: float = {math.sqrt(SIZE)}> ()
    scaled = Div (raw, div)
    scores = Add (scaled, mask)
    probs = Softmax <axis: int = -1> (scores)
"""

SDPA = f"""
    kh = Transpose <perm: ints = [0, 2, 1, 3]> (k4)
    kt = Transpose <perm: ints = [0, 1, 3, 2]> (kh)
    quarter = Constant <value_float: float = {QUARTER}> ()
    qs = Mul (qh, quarter)
    ks = Mul (kt, quarter)
    raw = MatMul (qs, ks)
    scores = Add (mask, raw)
    p = Softmax <axis: int = -1> (scores)
    nan = IsNaN (p)
    zero = Constant <value_floats: floats = [0.0]> ()
    probs = Where (nan, zero, p)
"""

NO_MASK = f"""
    kt = Transpose <perm: ints = [0, 2, 3, 1]> (k4)
    raw = MatMul (qh, kt)
    s = Constant <value_float: float = {SCALE}> ()
    scores = Mul (raw, s)
    probs = Softmax <axis: int = -1> (scores)
"""

SWAP_3D = f"""
    zero_i = Constant <value_ints: ints = [0]> ()
    two_i = Constant <value_ints: ints = [2]> ()
    three_i = Constant <value_ints: ints = [3]> ()
    four_i = Constant <value_ints: ints = [4]> ()
    minus1 = Constant <value_ints: ints = [-1]> ()
    kh = Transpose <perm: ints = [0, 2, 1, 3]> (k4)
    kshape = Shape (kh)
    b_h = Slice (kshape, zero_i, two_i)
    s_dim = Slice (kshape, two_i, three_i)
    d_dim = Slice (kshape, three_i, four_i)
    flat_shape = Concat <axis: int = 0> (minus1, s_dim, d_dim)
    flat = Reshape (kh, flat_shape)
    flat_t = Transpose <perm: ints = [0, 2, 1]> (flat)
    back_shape = Concat <axis: int = 0> (b_h, d_dim, s_dim)
    kt = Reshape (flat_t, back_shape)
    raw = MatMul (qh, kt)
    s = Constant <value_float: float = {SCALE}> ()
    sc = Mul (raw, s)
    scores = Add (sc, mask)
    probs = Softmax <axis: int = -1> (scores)
"""


def _feeds(mask: bool = True, seq: int = SIZE, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((2, seq, HIDDEN)).astype(np.float32)}
    if mask:
        m = np.zeros((2, 1, 1, seq), np.float32)
        m[1, ..., 4:] = np.finfo(np.float32).min  # padding in the second row
        feeds["mask"] = m
    return feeds


def _ops(model: ir.Model) -> dict:
    counts: dict = {}
    for node in model.graph:
        counts[(node.domain, node.op_type)] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


def _fuse_rule(manifest) -> dict:
    return next(r for r in manifest["passes"] if r["name"] == "fuse-attention")["rules"]["attention"]


@pytest.mark.parametrize("body,mask", [(EAGER, True), (SDPA, True), (NO_MASK, False), (SWAP_3D, True)],
                         ids=["eager", "sdpa-split-scale-nan-guard", "no-mask", "dynamo-3d-key-swap"])
def test_attention_forms_fuse(body, mask):
    model = _model(body, mask=mask)
    artifact = tfgraph.compile(model, "cpu-fp32", inputs=_feeds(mask))
    assert _fuse_rule(artifact.manifest)["matches"] == 1
    ops = _ops(artifact.model)
    # cpu-fp32 lowers to the packed com.microsoft.Attention: projections inside the op.
    assert ops.get(("com.microsoft", "Attention")) == 1
    assert ("", "Softmax") not in ops and ("", "MatMul") not in ops
    # The (B, S, H·d) output needs no Reshape after the fused op.
    assert ("", "Reshape") not in ops
    assert artifact.manifest["attention"] == {**artifact.manifest["attention"], "found": 1, "fused": 1, "unfused": 0}
    mha = next(n for n in artifact.model.graph if n.op_type == "Attention")
    assert mha.attributes.get_int("num_heads") == HEADS
    assert mha.attributes.get_float("scale") == pytest.approx(SCALE, rel=1e-6)
    assert (len(mha.inputs) > 5 and mha.inputs[5] is not None) == mask  # the mask travels as attention_bias
    assert_matches_source(artifact, model, feeds=_feeds(mask, seed=7))


def test_lowering_to_mha():
    artifact = tfgraph.compile(_model(SDPA), _target_lowering("lower-attention:to=com.microsoft.MultiHeadAttention"), inputs=_feeds())
    ops = _ops(artifact.model)
    assert ops.get(("com.microsoft", "MultiHeadAttention")) == 1 and ops.get(("", "MatMul")) == 3
    assert_matches_source(artifact, _model(SDPA), feeds=_feeds(seed=7))


def test_neutral_op_runs_unlowered():
    """Without lowering, tfgraph.Attention runs as its ONNX function: same outputs as the input graph."""
    from tfgraph.targets import get_target

    base = get_target("cpu-fp32")
    target = tfgraph.Target(
        name="test-neutral", description="fusion only", providers=base.providers, precision="fp32",
        phases=base.map_passes(lambda p: None if p.name in ("lower-attention", "pack-projections") else p).phases,
        tolerance=base.tolerance,
    )
    artifact = tfgraph.compile(_model(EAGER), target, inputs=_feeds())
    assert _ops(artifact.model).get(("tfgraph", "Attention")) == 1
    assert ("tfgraph", "Attention", "") in artifact.model.functions
    assert_matches_source(artifact, _model(EAGER), feeds=_feeds(seed=7))


NEGATIVES = {
    # Softmax over the query axis is not attention over keys.
    "softmax-axis": (EAGER.replace("Softmax <axis: int = -1>", "Softmax <axis: int = 2>"), True, None),
    # A NaN guard that fills with 1 changes fully-masked rows.
    "nan-guard-fill-1": (SDPA.replace("value_floats: floats = [0.0]", "value_floats: floats = [1.0]"), True, "does not fill with 0"),
    # Q·K instead of Q·Kᵀ (shapes only line up because the test sequence length equals the head size).
    "key-not-transposed": (EAGER.replace("perm: ints = [0, 2, 3, 1]> (k4)", "perm: ints = [0, 2, 1, 3]> (k4)"), True, None),
    # A scale that is a tensor, not a scalar.
    "tensor-scale": (NO_MASK.replace(f"value_float: float = {SCALE}", "value_floats: floats = [" + ", ".join([str(SCALE)] * SIZE) + "]"), False, "not a constant non-zero scalar"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_negative_twins_stay_unfused(name):
    body, mask, reason = NEGATIVES[name]
    model = _model(body, mask=mask)
    artifact = tfgraph.compile(model, "cpu-fp32", inputs=_feeds(mask))
    rule = _fuse_rule(artifact.manifest)
    assert rule["matches"] == 0
    assert "near_miss" in rule
    if reason:
        assert reason in rule["near_miss"]["reason"]
    assert not any(op == "MultiHeadAttention" for _, op in _ops(artifact.model))
    assert_matches_source(artifact, model, feeds=_feeds(mask, seed=7))


def test_swap_rule_negative_twin():
    """A 3-D reshape that does not swap the last two axes must not become a Transpose."""
    body = SWAP_3D.replace("back_shape = Concat <axis: int = 0> (b_h, d_dim, s_dim)", "back_shape = Concat <axis: int = 0> (b_h, s_dim, d_dim)")
    body = body.replace("flat_t = Transpose <perm: ints = [0, 2, 1]> (flat)", "flat_t = Transpose <perm: ints = [0, 1, 2]> (flat)")
    model = _model(body)
    artifact = tfgraph.compile(model, "cpu-fp32", inputs=_feeds(), verify=False)
    swap = next(r for r in artifact.manifest["passes"] if r["name"] == "simplify-reshapes")["rules"]["swap-last-two-via-3d"]
    assert swap["matches"] == 0


def test_partial_fusion_warns_and_strict_fails(cli, tmp_path):
    model = _model(NEGATIVES["key-not-transposed"][0])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = cli("compile", path, "-o", tmp_path / "out", "--quiet")
    assert result.code == 0
    assert "WARNING: partial attention fusion: 1 of 1 attention blocks left unfused" in " ".join(result.err.split())
    result = cli("compile", path, "-o", tmp_path / "out2", "--strict")
    assert result.code == 1 and "strict" in result.err
    assert not (tmp_path / "out2").exists()
    with pytest.raises(StrictError):
        tfgraph.compile(model, "cpu-fp32", strict=True, verify=False)


ROTARY_LIKE = f"""
    cos = Constant <value_float: float = 0.8> ()
    qr = Mul (qh, cos)
    kh = Transpose <perm: ints = [0, 2, 1, 3]> (k4)
    kr = Mul (kh, cos)
    kt = Transpose <perm: ints = [0, 1, 3, 2]> (kr)
    raw = MatMul (qr, kt)
    s = Constant <value_float: float = {SCALE}> ()
    sc = Mul (raw, s)
    scores = Add (sc, mask)
    probs = Softmax <axis: int = -1> (scores)
"""


def test_head_split_form_fuses():
    """Q and K transformed after the head split (as rotary embeddings do) → AttentionBHSD → MHA."""
    artifact = tfgraph.compile(_model(ROTARY_LIKE), "cpu-fp32", inputs=_feeds())
    rules = next(r for r in artifact.manifest["passes"] if r["name"] == "fuse-attention")["rules"]
    assert rules["attention"]["matches"] == 0 and rules["attention-bhsd"]["matches"] == 1
    assert _ops(artifact.model).get(("com.microsoft", "MultiHeadAttention")) == 1
    assert_matches_source(artifact, _model(ROTARY_LIKE), feeds=_feeds(seed=7))


def test_head_split_form_negative_twin():
    """Softmax over the query axis in the head-split form stays unfused."""
    body = ROTARY_LIKE.replace("Softmax <axis: int = -1>", "Softmax <axis: int = 2>")
    artifact = tfgraph.compile(_model(body), "cpu-fp32", inputs=_feeds())
    rules = next(r for r in artifact.manifest["passes"] if r["name"] == "fuse-attention")["rules"]
    assert rules["attention-bhsd"]["matches"] == 0 and "near_miss" in rules["attention-bhsd"]
    assert artifact.manifest["attention"]["unfused"] == 1


def _target_lowering(*passes: str) -> tfgraph.Target:
    from tfgraph.passes import PassSpec
    from tfgraph.targets import get_target
    from tfgraph.targets.profile import phases

    base = get_target("cpu-fp32")
    pipeline = tuple(p for p in base.passes if p.name not in ("lower-attention", "pack-projections"))
    pipeline = pipeline[:-1] + tuple(PassSpec.parse(p) for p in passes) + pipeline[-1:]
    return tfgraph.Target(
        name="test-lowering", description="", providers=base.providers, precision="fp32",
        phases=phases(rewrite=pipeline), tolerance=base.tolerance, session_options=base.session_options,
    )


@pytest.mark.parametrize("pack", [False, True], ids=["separate-projections", "packed-projections"])
def test_lowering_to_packed_attention(pack):
    passes = (["pack-projections"] if pack else []) + ["lower-attention:to=com.microsoft.Attention"]
    artifact = tfgraph.compile(_model(EAGER), _target_lowering(*passes), inputs=_feeds())
    ops = _ops(artifact.model)
    # The projections moved into the op: no MatMul, no Split left behind, no weight stored twice.
    assert ops.get(("com.microsoft", "Attention")) == 1
    assert ("", "MatMul") not in ops and ("", "Split") not in ops
    summary = artifact.manifest["summary"]
    assert summary["bytes_after"] <= summary["bytes_before"] + 64
    assert_matches_source(artifact, _model(EAGER), feeds=_feeds(seed=7))


def test_packed_lowering_falls_back_to_mha():
    """Head-split blocks (Q/K transformed after the split) cannot take packed weights: MultiHeadAttention."""
    target = _target_lowering("lower-attention:to=com.microsoft.Attention")
    artifact = tfgraph.compile(_model(ROTARY_LIKE), target, inputs=_feeds())
    ops = _ops(artifact.model)
    assert ops.get(("com.microsoft", "MultiHeadAttention")) == 1 and ("com.microsoft", "Attention") not in ops
    assert_matches_source(artifact, _model(ROTARY_LIKE), feeds=_feeds(seed=7))


def test_lowering_rules_first_match_wins_and_report_why():
    """lower-attention is ordered rules: the first whose check passes lowers the block; a rule that
    took nothing says why; without a rule that takes the block the neutral op stays."""
    from tfgraph.passes.attention_lowering import shorthand_rules

    from tfgraph.passes import PassSpec
    from tfgraph.targets import get_target
    from tfgraph.targets.profile import phases

    base = get_target("cpu-fp32")

    def target(rules):
        pipeline = tuple(p for p in base.passes if p.name not in ("lower-attention", "pack-projections"))
        pipeline = pipeline[:-1] + (PassSpec("lower-attention", {"rules": rules}),) + pipeline[-1:]
        return tfgraph.Target(name="test-rules", description="", providers=base.providers, precision="fp32",
                              phases=phases(rewrite=pipeline), tolerance=base.tolerance)

    def lowering(artifact):
        return next(r for r in artifact.manifest["passes"] if r["name"] == "lower-attention")["rules"]

    # ROTARY_LIKE: Q/K transformed after the split, so "packed" misses and "multi-head" takes it.
    artifact = tfgraph.compile(_model(ROTARY_LIKE), target(["group-query", "packed", "multi-head"]), inputs=_feeds())
    report = lowering(artifact)
    assert report["com.microsoft.MultiHeadAttention"] == {"matches": 1}
    assert "head-split block" in report["com.microsoft.Attention"]["near_miss"]
    assert "not causal" in report["com.microsoft.GroupQueryAttention"]["near_miss"]
    assert _ops(artifact.model).get(("com.microsoft", "MultiHeadAttention")) == 1
    assert_matches_source(artifact, _model(ROTARY_LIKE), feeds=_feeds(seed=7))
    # Order matters: multi-head first takes the block packed would have taken.
    first = tfgraph.compile(_model(SDPA), target(["multi-head", "packed"]), inputs=_feeds())
    assert _ops(first.model).get(("com.microsoft", "MultiHeadAttention")) == 1
    assert ("com.microsoft", "Attention") not in _ops(first.model)
    # No rule takes it: the neutral op stays (its ONNX function), outputs unchanged.
    kept = tfgraph.compile(_model(SDPA), target(["packed"]), inputs=_feeds())
    assert _ops(kept.model).get(("com.microsoft", "Attention")) == 1  # SDPA's projections pack
    none = tfgraph.compile(_model(ROTARY_LIKE), target(["packed"]), inputs=_feeds())
    assert _ops(none.model).get(("tfgraph", "AttentionBHSD")) == 1
    assert_matches_source(none, _model(ROTARY_LIKE), feeds=_feeds(seed=7))
    # The shorthand is a rule list.
    assert shorthand_rules(to="com.microsoft.Attention") == ["packed", "multi-head"]
    assert shorthand_rules(to="function", causal_to="com.microsoft.GroupQueryAttention") == ["group-query"]
    with pytest.raises(tfgraph.BadInputError, match="unknown attention lowering rule"):
        PassSpec("lower-attention", {"rules": ["nope"]}).create()
    with pytest.raises(tfgraph.BadInputError, match="not both"):
        PassSpec("lower-attention", {"rules": ["packed"], "to": "function"}).create()


def _gather_of_concat_model(index: int) -> ir.Model:
    """y = Gather(Concat(Shape(x)[0:1], [4], Shape(x)[1:2], [16]), index) as TorchScript assembles a shape and
    reads one dimension back; z = y / 2 (rotate_half's split point)."""
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[B, S, 64] x) => (int64 z) {{
        b = Shape <start = 0, end = 1> (x)
        four = Constant <value = int64[1] {{4}}> ()
        s = Shape <start = 1, end = 2> (x)
        sixteen = Constant <value = int64[1] {{16}}> ()
        dims = Concat <axis = 0> (b, four, s, sixteen)
        at = Constant <value = int64 {{{index}}}> ()
        y = Gather <axis = 0> (dims, at)
        two = Constant <value = int64 {{2}}> ()
        z = Div (y, two)
    }}
    """
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


@pytest.mark.parametrize("index, folds_to", [(3, 8), (-1, 8), (1, 2), (2, None)])
def test_gather_of_concat_reads_the_piece(index, folds_to):
    """A constant piece folds to its value; a computed one (Shape(x)[1:2]) becomes Gather on that piece."""
    from tfgraph.compiler.verify import run
    from tfgraph.passes import create_pass

    model = _gather_of_concat_model(index)
    x = np.zeros((3, 5, 64), np.float32)
    want = run(_gather_of_concat_model(index), {"x": x})["z"]
    simplify = create_pass("simplify-reshapes")
    assert simplify(model).modified and simplify.report["gather-of-concat"]["matches"] == 1
    create_pass("fold-constants")(model)
    create_pass("remove-dead")(model)
    np.testing.assert_array_equal(run(model, {"x": x})["z"], want)
    ops = [n.op_type for n in model.graph]
    if folds_to is not None:
        assert "Concat" not in ops and "Gather" not in ops
        assert int(ir.convenience.get_const_tensor(model.graph.outputs[0]).numpy()) == folds_to
    else:
        assert "Concat" not in ops and ops.count("Shape") == 1  # Gather(Shape(x)[1:2], 0)
