"""lower-cached-attention (issue 18): a decoder layer's KV-cached causal attention (past input, Concat,
present output, transformers' repeat_kv, RoPE by rotate_half) becomes com.microsoft.GroupQueryAttention
with com.microsoft.RotaryEmbedding, equal to the neutral graph on a left-padded prompt and on decode steps;
blocks it cannot take keep the neutral op, with the reason."""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from tfgraph import ops
from tfgraph.compiler import verify
from tfgraph.passes import create_pass
from tfgraph.ir import GENERATION_TASK, TASK_KEY

HEADS, KV_HEADS, SIZE = 4, 2, 8

LAYER = """
<ir_version: 8, opset_import: ["" : 18, "tfgraph" : 1]>
layer (float[B, S, 32] xq, float[B, S, 16] xk, float[B, S, 16] xv, float[B, 2, P, 8] past_k, float[B, 2, P, 8] past_v,
       int64[B, S] pos, float[B, 1, S, T] bias) => (float[B, S, 32] y, float[B, 2, T, 8] present_k, float[B, 2, T, 8] present_v)
{{
    q4 = Reshape (xq, q_shape)
    q = Transpose <perm = [0, 2, 1, 3]> (q4)
    k4 = Reshape (xk, kv_shape)
    k = Transpose <perm = [0, 2, 1, 3]> (k4)
    v4 = Reshape (xv, kv_shape)
    v = Transpose <perm = [0, 2, 1, 3]> (v4)
    pos3 = Unsqueeze (pos, ax2)
    posf = Cast <to = 1> (pos3)
    freqs = Mul (posf, inv_freq)
    angles = Concat <axis = -1> (freqs, freqs)
    cos0 = Cos (angles)
    sin0 = Sin (angles)
    cos1 = Mul (cos0, attention_scaling)
    sin1 = Mul (sin0, attention_scaling)
    cos = Unsqueeze (cos1, ax1)
    sin = Unsqueeze (sin1, ax1)
    q_hi = Slice (q, half, big, ax3)
    q_lo = Slice (q, zero1, half, ax3)
    q_neg = Neg (q_hi)
    q_rh = Concat <axis = -1> (q_neg, q_lo)
    q_c = Mul (q, cos)
    q_s = Mul (q_rh, sin)
    q_rot = Add (q_c, q_s)
    k_hi = Slice (k, half, big, ax3)
    k_lo = Slice (k, zero1, half, ax3)
    k_neg = Neg (k_hi)
    k_rh = Concat <axis = -1> (k_neg, k_lo)
    k_c = Mul ({k_cos_order})
    k_s = Mul (k_rh, sin)
    k_rot = Add (k_s, k_c)
    present_k = Concat <axis = -2> (past_k, k_rot)
    present_v = Concat <axis = -2> (past_v, v)
    k5 = Unsqueeze (present_k, ax2)
    k5e = Expand (k5, repeat)
    k_all = Reshape (k5e, rep_shape)
    v5 = Unsqueeze (present_v, ax2)
    v5e = Expand (v5, repeat)
    v_all = Reshape (v5e, rep_shape)
    o = tfgraph.AttentionBHSD <scale = 0.35355339, mask_kind = "{kind}"> (q_rot, k_all, v_all, bias)
    o_t = Transpose <perm = [0, 2, 1, 3]> (o)
    y = Reshape (o_t, merge)
}}
"""


def _layer(kind: str = "causal_bias", k_cos_order: str = "cos, k") -> ir.Model:
    graph = onnx.parser.parse_graph(LAYER.format(kind=kind, k_cos_order=k_cos_order).split("\n", 2)[2])
    consts = {
        "q_shape": [0, 0, HEADS, SIZE], "kv_shape": [0, 0, KV_HEADS, SIZE], "ax1": [1], "ax2": [2], "ax3": [3],
        "half": [SIZE // 2], "big": [2**62], "zero1": [0], "repeat": [1, 1, HEADS // KV_HEADS, 1, 1],
        "rep_shape": [0, HEADS, -1, SIZE], "merge": [0, 0, -1],
    }
    for name, value in consts.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
    inv_freq = 1.0 / (10000 ** (np.arange(0, SIZE, 2, dtype=np.float32) / SIZE))
    graph.initializer.append(onnx.numpy_helper.from_array(inv_freq.astype(np.float32), "inv_freq"))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.25, np.float32), "attention_scaling"))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("tfgraph", 1)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    model.metadata_props[TASK_KEY] = GENERATION_TASK  # as compile --task text-generation marks a decoder
    ops.ensure_defined(model, "AttentionBHSD")
    create_pass("infer-shapes")(model)
    return model


def _feeds(batch: int, past: int, seq: int, mask: np.ndarray, seed: int = 0) -> dict:
    """Inputs of one step: ``mask`` (batch, past + seq) 0/1, left padding; positions and the additive
    causal + padding bias as transformers computes them (-inf where masked)."""
    rng = np.random.default_rng(seed)
    total = past + seq
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)[:, -seq:]
    causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
    allowed = causal[None, None] & (mask[:, None, None, :] == 1)
    return {
        "xq": rng.standard_normal((batch, seq, HEADS * SIZE)).astype(np.float32),
        "xk": rng.standard_normal((batch, seq, KV_HEADS * SIZE)).astype(np.float32),
        "xv": rng.standard_normal((batch, seq, KV_HEADS * SIZE)).astype(np.float32),
        "past_k": rng.standard_normal((batch, KV_HEADS, past, SIZE)).astype(np.float32),
        "past_v": rng.standard_normal((batch, KV_HEADS, past, SIZE)).astype(np.float32),
        "pos": positions.astype(np.int64),
        "bias": np.where(allowed, 0.0, -np.inf).astype(np.float32),
    }


@pytest.mark.parametrize("k_cos_order, context", [("cos, k", None), ("k, cos", None), ("cos, k", 16)])
def test_cached_layer_becomes_group_query_attention_with_rotary(k_cos_order, context):
    """Without a known context each token's cos/sin row is computed from the graph's angles; with one
    (the compile driver's metadata) the kernel reads constant tables over the context at the graph's positions."""
    from tfgraph.ir import CONTEXT_KEY

    model = _layer(k_cos_order=k_cos_order)
    if context:
        model.metadata_props[CONTEXT_KEY] = str(context)
    mask_prompt = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)  # row 1 left-padded
    steps = [_feeds(2, 0, 6, mask_prompt), _feeds(2, 6, 1, np.concatenate([mask_prompt, np.ones((2, 1), np.int64)], 1), 1),
             _feeds(1, 5, 1, np.ones((1, 6), np.int64), 2)]
    want = [verify.run(model, f) for f in steps]
    lower = create_pass("lower-cached-attention")
    assert lower(model).modified
    assert lower.report == {"lowered": 1, "rotary_fused": 1, "rotary_tables": 1 if context else 0}
    histogram = collections.Counter(n.op_type for n in model.graph)
    assert histogram["GroupQueryAttention"] == 1 and histogram["RotaryEmbedding"] == 2
    assert histogram["AttentionBHSD"] == 0 and histogram["Neg"] == 0 and histogram["Cos"] == (0 if context else 1)
    if context:  # (context, H/2) tables, read at the graph's positions input
        rotary = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
        assert rotary.inputs[1].name == "pos" and rotary.inputs[2].const_value.shape == (context, SIZE // 2)
    assert not any(v.uses() for v in model.graph.outputs[1:])  # the present caches: no repeat_kv reads them
    assert [v.name for v in model.graph.outputs] == ["y", "present_k", "present_v"]
    for feeds, expected in zip(steps, want):
        got = verify.run(model, feeds)
        for name in ("y", "present_k", "present_v"):
            a, b = expected[name], got[name]
            if name == "y":  # a fully masked (padded) query row is undefined: compare real tokens only
                real = feeds["bias"].max(axis=-1)[:, 0, :] == 0
                a, b = a[real], b[real]
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=name)


def _padded_layer() -> ir.Model:
    """The layer with its mask classified causal + the key padding of an ``attention_mask`` (B, T) input."""
    model = _layer(kind="causal")
    mask_input = ir.Value(name="attention_mask", shape=ir.Shape(["B", "T"]), type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(mask_input)
    node = next(n for n in model.graph if n.op_type == "AttentionBHSD")
    node.attributes["key_padding"] = ir.AttrString("key_padding", "attention_mask")
    return model


def test_key_padding_input_gives_the_lengths_and_the_bias():
    """A causal mask whose padding is a (B, T) graph input (classify-attention-masks' key_padding): the
    kernel's lengths and its attention_bias are built from that input, not from the exporter's (B, 1, S, T)
    tensor or the past's length, so nothing but the kernel reads the past cache; same outputs."""
    model = _padded_layer()
    mask_prompt = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)
    masks = [mask_prompt, np.concatenate([mask_prompt, np.ones((2, 1), np.int64)], 1)]
    steps = [{**_feeds(2, 0, 6, masks[0]), "attention_mask": masks[0]},
             {**_feeds(2, 6, 1, masks[1], 1), "attention_mask": masks[1]}]
    want = [verify.run(model, f) for f in steps]
    assert create_pass("lower-cached-attention")(model).modified
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")

    def sources(value, seen=None):  # the graph inputs a value is computed from
        seen = set() if seen is None else seen
        node = value.producer()
        if node is None:
            return {value.name} if value in model.graph.inputs else set()
        if id(node) in seen:
            return set()
        seen.add(id(node))
        return set().union(*[sources(i, seen) for i in node.inputs if i is not None])

    bias_sources = sources(gqa.inputs[10])  # attention_bias: from the mask (and the query's length)
    assert "attention_mask" in bias_sources and not bias_sources & {"bias", "past_k", "past_v"}
    assert sources(gqa.inputs[6]) == {"attention_mask"}  # total_sequence_length
    assert all(user is gqa for name in ("past_k", "past_v")
               for user, _ in next(v for v in model.graph.inputs if v.name == name).uses())
    for feeds, expected in zip(steps, want):
        got = verify.run(model, feeds)
        real = feeds["bias"].max(axis=-1)[:, 0, :] == 0
        np.testing.assert_allclose(got["y"][real], expected["y"][real], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(got["present_k"], expected["present_k"], atol=2e-5, rtol=1e-4)


def test_shared_buffer_only_when_the_kernels_alone_read_the_past():
    """shares_cache_buffer: the exported layer (a Concat reads the past) cannot share; lowered with lengths
    from the mask it can; a reader of the past's sequence length (not its batch) forbids it again."""
    from tfgraph.compiler.decoder import shares_cache_buffer
    from tfgraph.deploy.kv_layout import CacheLayout

    layout = CacheLayout(convention="optimum", input_ids="xq", attention_mask="attention_mask", position_ids=None,
                         logits="y", past=(("past_k", "past_v"),), present=(("present_k", "present_v"),),
                         kv_heads=KV_HEADS, head_size=SIZE, dtype="float32", vocab_size=None, dims={})
    model = _padded_layer()
    assert not shares_cache_buffer(model, layout)
    assert create_pass("lower-cached-attention")(model).modified
    assert shares_cache_buffer(model, layout)
    past = next(v for v in model.graph.inputs if v.name == "past_k")
    batch = ir.node("Shape", [past], attributes={"start": 0, "end": 1})
    model.graph.append(batch)
    assert shares_cache_buffer(model, layout)  # the batch is the same in a shared buffer
    length = ir.node("Shape", [past], attributes={"start": 2, "end": 3})
    model.graph.append(length)
    assert not shares_cache_buffer(model, replace(layout))
    assert not shares_cache_buffer(model, replace(layout, attention_mask=None))


def test_without_the_generation_task_blocks_are_left_to_lower_attention():
    """Compiled as one forward pass (no --task), the model may get a multi-token chunk after a filled cache at
    batch > 1, which onnxruntime's CPU GroupQueryAttention refuses: the pass lowers nothing and says why."""
    model = _layer()
    del model.metadata_props[TASK_KEY]
    lower = create_pass("lower-cached-attention")
    assert not lower(model).modified
    assert "not compiled for generation" in lower.report["skipped"]


def test_non_causal_block_is_left_with_the_reason():
    model = _layer(kind="bias")
    lower = create_pass("lower-cached-attention")
    assert not lower(model).modified
    assert lower.report["lowered"] == 0
    assert "not causal" in lower.report["near_misses"]["com.microsoft.GroupQueryAttention (cached)"]


@pytest.mark.parametrize("exporter, from_onnx", [("dynamo", False), ("torchscript", True)])
def test_decoder_with_cached_group_query_attention_generates_transformers_tokens(exporter, from_onnx, tmp_path):
    """cpu-fp32's lowering (lower-cached-attention before lower-attention), without its finalize phase: the tiny Llama's
    greedy tokens, left-padded batches included, equal transformers' (int4 weights would change them)."""
    import dataclasses
    import json

    import tfgraph
    from _decoders import checkpoint, onnx_file
    from test_generate import compare_greedy
    from tfgraph.targets.cpu import CLEANUP, CPU_FP32, CPU_LOWERING, FUSION
    from tfgraph.targets.profile import phases

    assert any(spec.name == "lower-cached-attention" for spec in CPU_LOWERING)
    target = dataclasses.replace(CPU_FP32, name="cpu-fp32-cached", phases=phases(normalize=CLEANUP, fuse=FUSION,
                                                                                 lower=CPU_LOWERING))
    source = onnx_file("llama", exporter) if from_onnx else checkpoint("llama")
    tfgraph.compile(source, target, output=tmp_path / "a", task="text-generation", exporter=exporter)
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"))
    histogram = collections.Counter(n.op_type for n in graph.graph.node)
    assert histogram["GroupQueryAttention"] == 2 and histogram["MultiHeadAttention"] == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # RoPE fused on both exporters (TorchScript's rotate_half split point, Gather(Concat(shape pieces, 16), 3) / 2,
    # is read back as a constant by simplify-reshapes' gather-of-concat)
    lowering = next(p for p in manifest["passes"] if p["name"] == "lower-cached-attention")["report"]
    assert lowering["rotary_fused"] == 2 and histogram["RotaryEmbedding"] == 4, lowering
    steps = manifest["generation"]["verification"]["steps"]  # a prompt with an empty cache, then decode steps
    assert len(steps) >= 2 and any(s["past"] > 0 for s in steps)
    assert all(s["max_abs"] < 1e-4 and s["next_tokens_equal"] for s in steps), steps
    compare_greedy("llama", tmp_path / "a")
