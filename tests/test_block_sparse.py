"""Block-sparse attention masks (issue 4): detection by classify-attention-masks and the
generalised blocked lowering (a list of key blocks per query block).

Layouts: BigBird-like (sliding blocks, global first/last blocks, fixed random blocks) and
Child et al.'s causal "fixed" pattern as constant masks for a static length; a repeating
block band with global blocks built from positions at any length (two torch exporters).
The lowered graphs are compared with the dense definition within 1e-5 relative, at
lengths that are and are not multiples of the block size, with key padding. A mask with
one tile only partly masked is not block-sparse.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from tfgraph import ops
from tfgraph.compiler import verify
from tfgraph.passes.attention_lowering import LowerAttentionPass
from tfgraph.passes.attention_masks import ClassifyAttentionMasksPass, block_pattern, classify_block_sparse
from tfgraph.passes.blocked_attention import KERNELS, block_sparse_attention
from tfgraph.passes.registry import create_pass

HEADS, HEAD_SIZE = 2, 8
WIDTH = HEADS * HEAD_SIZE
MIN = np.finfo(np.float32).min


def _tiles(layout: np.ndarray, block: int, length: int, causal: bool) -> np.ndarray:
    blocks = np.arange(length) // block
    visible = layout[blocks[:, None], blocks[None, :]]
    return visible & np.tril(np.ones((length, length), bool)) if causal else visible


def bigbird(n: int, seed: int = 0) -> np.ndarray:
    """Sliding blocks ±1, global first and last block, two fixed random key blocks per row."""
    rng = np.random.default_rng(seed)
    layout = block_pattern(n, [-1, 0, 1], 1, False)
    layout[:, -1] = layout[-1, :] = True
    for t in range(1, n - 1):
        layout[t, rng.choice(n, 2, replace=False)] = True
    return layout


def child_fixed(n: int, stride: int = 3) -> np.ndarray:
    """Child et al. "fixed" pattern in blocks (causal): the key blocks of the query's own chunk of
    ``stride`` blocks and the last block of every earlier chunk."""
    qb, kb = np.arange(n)[:, None], np.arange(n)[None, :]
    return ((qb // stride == kb // stride) | (kb % stride == stride - 1)) & (kb <= qb)


def _bias(visible: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
    visible = visible[None, None]
    if keys is not None:
        visible = visible & (keys[:, None, None, :] != 0)
    return np.where(visible, 0.0, MIN).astype(np.float32)


def _padding(batch: int, length: int, left: bool = False) -> np.ndarray:
    keys = np.ones((batch, length), np.int64)
    keys[1:, length - 3:] = 0
    return keys[:, ::-1].copy() if left else keys


# --- detection --------------------------------------------------------------------------------


def test_static_bigbird_layout_is_found_exactly():
    layout = bigbird(8)
    visible = _tiles(layout, 4, 30, False)  # 30: the last block is partial
    keys = _padding(2, 30)
    kind = classify_block_sparse([_bias(visible, keys), _bias(visible, keys[:, ::-1])],
                                 [{"attention_mask": keys}, {"attention_mask": keys[:, ::-1].copy()}])
    assert kind == {"kind": "block_sparse", "block_size": 4, "block_causal": 0, "block_sequence": 30,
                    "block_layout": [int(x) for x in layout.reshape(-1)], "key_padding": "attention_mask"}


def test_static_causal_fixed_pattern():
    layout = child_fixed(8)
    kind = classify_block_sparse([_bias(_tiles(layout, 8, 64, True))], [])
    assert kind["block_causal"] == 1 and kind["block_size"] == 8
    assert np.array_equal(np.array(kind["block_layout"], bool).reshape(8, 8), layout)


@pytest.mark.parametrize("offsets, g, causal", [([-1, 0, 1], 1, False), ([-2, -1, 0], 0, True),
                                                ([-2, 0, 2], 0, False), ([-1, 0], 2, True),
                                                ([0], 0, True)])  # causal chunks (Llama 4's chunked attention)
def test_repeating_pattern_at_several_lengths(offsets, g, causal):
    probes = [_bias(_tiles(block_pattern(-(-s // 4), offsets, g, causal), 4, s, causal)) for s in (16, 7, 45)]
    assert classify_block_sparse(probes, []) == {"kind": "block_sparse", "block_size": 4, "block_causal": int(causal),
                                                 "block_offsets": offsets, "global_blocks": g}


def test_layout_that_changes_with_length_is_not_repeating():
    probes = [_bias(_tiles(bigbird(-(-s // 4)), 4, s, False)) for s in (32, 20)]
    assert classify_block_sparse(probes, []) is None


@pytest.mark.parametrize("where", ["off-diagonal", "diagonal"])
def test_near_miss_is_not_block_sparse(where):
    """One tile only partly masked (one entry flipped): no block size ≥ 4 explains the mask."""
    for causal, layout in ((False, bigbird(8)), (True, child_fixed(8))):
        visible = _tiles(layout, 4, 32, causal)
        i, j = (21, 9) if where == "off-diagonal" else (22, 21)
        if where == "off-diagonal" and causal:
            visible[i, j - 8] = not visible[i, j - 8]
        else:
            visible[i, j] = not visible[i, j]
        assert classify_block_sparse([_bias(visible)], []) is None


def test_existing_kinds_are_not_block_sparse():
    s = 16
    causal = np.tril(np.ones((s, s), bool))
    blocks = (np.arange(s)[:, None] // 4) == (np.arange(s)[None, :] // 4)
    for visible in (causal, np.ones((s, s), bool), blocks):
        assert classify_block_sparse([_bias(visible)], []) is None
    # A token band is not tile-exact (it changes at every row).
    offset = np.arange(s)[None, :] - np.arange(s)[:, None]
    assert classify_block_sparse([_bias((offset <= 0) & (offset >= -5))], []) is None


# --- the lowered form against a numpy reference ---------------------------------------------


def _reference(x: dict[str, np.ndarray], visible: np.ndarray, keys: np.ndarray | None, scale: float = 0.3):
    b, s, d = x["q"].shape
    split = lambda t: t.reshape(b, s, HEADS, HEAD_SIZE).transpose(0, 2, 1, 3)  # noqa: E731
    seen = visible[None, None] & ((keys[:, None, None, :] != 0) if keys is not None else True)
    scores = np.where(seen, split(x["q"]) @ split(x["k"]).transpose(0, 1, 3, 2) * scale, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(x["v"])).transpose(0, 2, 1, 3).reshape(b, s, d), np.broadcast_to(seen.any(-1)[:, 0], (b, s))


def _run_form(length, padding, kernel, **options):
    dims = [2, length, WIDTH] if "layout" in options else ["B", "S", WIDTH]
    q, k, v = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims)) for n in "qkv")
    mask = ir.Value(name="m", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(dims[:2]))
    nodes: list[ir.Node] = []
    out = block_sparse_attention(nodes, q, k, v, scale=0.3, heads=HEADS, head_size=HEAD_SIZE,
                                 key_padding=mask if padding else None, kernel=kernel, **options)
    out.name = "y"
    model = ir.Model(ir.Graph([q, k, v, mask], [out], nodes=nodes, opset_imports={"": 18, "com.microsoft": 1}),
                     ir_version=9)
    create_pass("infer-shapes")(model)  # shape inference with data propagation must not get the form wrong
    rng = np.random.default_rng(length)
    x = {n: rng.standard_normal((2, length, WIDTH)).astype(np.float32) for n in "qkv"}
    x["m"] = _padding(2, length, left=length % 2 == 1)
    return verify.run(model, x)["y"], x


FIXED = [  # layout maker, block, length, causal
    (bigbird, 4, 32, False),  # global rows (first/last block) computed densely
    (bigbird, 4, 30, False),  # last block partial
    (bigbird, 4, 62, False),  # 16 blocks: the global first and last query blocks are computed densely
    (child_fixed, 4, 29, True),  # causal: triangular diagonal tiles
    (lambda n: block_pattern(n, [-2, -1, 0], 0, True), 8, 40, True),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("make, block, length, causal", FIXED)
def test_fixed_layout_matches_dense(make, block, length, causal, padding, kernel):
    layout = make(-(-length // block))
    got, x = _run_form(length, padding, kernel, layout=layout, sequence_length=length, block=block, causal=causal)
    visible = _tiles(layout, block, length, causal)
    want, rows = _reference(x, visible, x["m"] if padding else None)
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("offsets, g, causal", [([-1, 0, 1], 1, False), ([-2, -1, 0], 0, True), ([-1, 0], 1, True),
                                                ([-2, 0, 2], 2, False), ([0], 0, True)])
def test_repeating_pattern_matches_dense_at_any_length(offsets, g, causal, kernel):
    for length in (3, 16, 22):
        got, x = _run_form(length, True, kernel, offsets=offsets, global_blocks=g, block=4, causal=causal)
        visible = _tiles(block_pattern(-(-length // 4), offsets, g, causal), 4, length, causal)
        want, rows = _reference(x, visible, x["m"])
        np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5, err_msg=str(length))


# --- the passes on a neutral graph with a constant mask (static length) -----------------------


def _neutral(length: int, visible: np.ndarray, padding: bool) -> ir.Model:
    """x (B, S, 16) → tfgraph.Attention with a constant block-sparse (S, S) mask (and key padding)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, length, WIDTH]))
    inputs = [x]
    rng = np.random.default_rng(0)
    nodes = []
    projections = []
    for name in "qkv":
        w = ir.Value(name=f"W{name}", const_value=ir.tensor(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4))
        nodes.append(ir.node("MatMul", [x, w]))
        projections.append((w, nodes[-1].outputs[0]))
    table = ir.node("Constant", [], attributes={"value": ir.tensor(visible[None, None])})
    nodes.append(table)
    allowed = table.outputs[0]
    if padding:
        mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, length]))
        inputs.append(mask)
        cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.BOOL})
        axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1, 2], np.int64))})
        keys = ir.node("Unsqueeze", [cast.outputs[0], axes.outputs[0]])
        both = ir.node("And", [allowed, keys.outputs[0]])
        nodes += [cast, axes, keys, both]
        allowed = both.outputs[0]
    zero = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0.0, np.float32))})
    low = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(MIN, np.float32))})
    bias = ir.node("Where", [allowed, zero.outputs[0], low.outputs[0]])
    nodes += [zero, low, bias]
    attention = ir.node("Attention", [p[1] for p in projections] + [bias.outputs[0]], domain=ops.DOMAIN,
                        attributes={"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5, "mask_kind": "bias"})
    attention.outputs[0].name = "y"
    attention.outputs[0].shape = ir.Shape([2, length, WIDTH])
    nodes.append(attention)
    graph = ir.Graph(inputs, attention.outputs, nodes=nodes, initializers=[p[0] for p in projections],
                     opset_imports={"": 18})
    model = ir.Model(graph, ir_version=9)
    ops.ensure_defined(model, "Attention")
    for node in graph:  # the lowering reads the length off the projections' shapes
        if node.op_type == "MatMul":
            node.outputs[0].shape = ir.Shape([2, length, WIDTH])
            node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return model


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make, block, length, causal", [(bigbird, 4, 30, False), (child_fixed, 4, 32, True)])
def test_pass_on_constant_mask(make, block, length, causal, kernel):
    layout = make(-(-length // block))
    model = _neutral(length, _tiles(layout, block, length, causal), padding=True)
    feeds = verify.generate_inputs(model, {}, seed=3)
    want = verify.run(model, feeds)["y"]
    classify = ClassifyAttentionMasksPass()
    assert classify(model).modified
    assert classify.report == {"block_sparse+padding(attention_mask)": {"matches": 1}}
    node = next(n for n in model.graph if n.domain == ops.DOMAIN)
    assert node.attributes.get_int("block_size") == block
    assert np.array_equal(np.array(node.attributes.get_ints("block_layout"), bool).reshape(layout.shape), layout)
    # Without window_to the block stays dense, with its bias.
    dense = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    LowerAttentionPass()(dense)
    assert [n.op_type for n in dense.graph if n.domain == "com.microsoft"] == ["MultiHeadAttention"]
    if causal:  # with causal_to alone, a causal layout goes to GroupQueryAttention with its bias (as causal_bias did)
        gqa = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        LowerAttentionPass(causal_to="com.microsoft.GroupQueryAttention")(gqa)
        assert [n.op_type for n in gqa.graph if n.domain == "com.microsoft"] == ["GroupQueryAttention"]
        got = verify.run(gqa, feeds)["y"]
        np.testing.assert_allclose(got[feeds["attention_mask"].astype(bool)],
                                   want[feeds["attention_mask"].astype(bool)], atol=2e-6, rtol=1e-5)
    lower = LowerAttentionPass(window_to="auto", window_kernel=kernel)
    assert lower(model).modified
    assert lower.report["window:block_sparse"] == {"matches": 1}
    got = verify.run(model, feeds)["y"]
    rows = feeds["attention_mask"].astype(bool)  # padded query positions have no defined value
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5)


def test_pass_keeps_near_miss_as_bias():
    layout = bigbird(8)
    visible = _tiles(layout, 4, 32, False)
    visible[21, 9] = not visible[21, 9]
    model = _neutral(32, visible, padding=False)
    classify = ClassifyAttentionMasksPass()
    classify(model)
    assert "block_sparse" not in str(classify.report)


# --- exported torch models: a repeating block band + global block, any length ------------------


def _export_block_band(path, exporter: str, block: int = 4):
    """One attention layer; the mask, from positions: key blocks t-1 … t+1 and block 0 (global
    both ways), with key padding (Longformer/BigBird-style sliding blocks)."""
    import torch

    class BlockBand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(50, WIDTH)
            self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, HEADS, HEAD_SIZE).transpose(1, 2) for t in self.qkv(x).split(WIDTH, dim=-1))
            blocks = torch.arange(s) // block
            near = (blocks[None, :] - blocks[:, None]).abs() <= 1
            glob = (blocks[None, :] == 0) | (blocks[:, None] == 0)
            keys = attention_mask[:, None, None, :].bool()
            bias = torch.where((near | glob)[None, None] & keys, 0.0, torch.finfo(x.dtype).min)
            probs = torch.softmax(q @ k.transpose(-1, -2) * HEAD_SIZE ** -0.5 + bias, dim=-1)
            return (probs @ v).transpose(1, 2).reshape(b, s, WIDTH)

    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int64)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["y"])
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2)
        torch.onnx.export(BlockBand().eval(), (ids, mask), path, dynamo=True, **kwargs,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    else:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        torch.onnx.export(BlockBand().eval(), (ids, mask), path, dynamo=False, dynamic_axes=axes, opset_version=18,
                          **kwargs)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exported_block_band(tmp_path, exporter):
    pytest.importorskip("torch")
    import tfgraph

    raw = _export_block_band(tmp_path / "band.onnx", exporter)
    artifact = tfgraph.compile(raw, "cpu-fp32", output=tmp_path / "out", verify=False)  # checked below
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "classify-attention-masks")
    assert {k: v["matches"] for k, v in record["rules"].items()} == {"block_sparse+padding(attention_mask)": 1}
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "lower-attention")
    assert record["rules"]["window:block_sparse"]["matches"] == 1
    assert artifact.manifest["attention"]["unfused"] == 0
    compiled = ir.load(tmp_path / "out" / "model.onnx")
    node_types = collections.Counter(n.op_type for n in compiled.graph)
    assert node_types["If"] == 0
    for length in (5, 16, 23):  # multiples of the block and not, shorter than the confirming probe
        for left in (False, True):
            feeds = verify.generate_inputs(ir.load(raw), {"batch": 3, "sequence": length}, seed=length)
            if left:
                feeds = {k: (v[..., ::-1].copy() if "mask" in k else v) for k, v in feeds.items()}
            want = verify.run(ir.load(raw), feeds)["y"]
            got = verify.run(compiled, feeds)["y"]
            rows = feeds["attention_mask"].astype(bool)
            np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5, err_msg=f"{length} {left}")


def _fixed_layout_module(torch, layout: np.ndarray, block: int, length: int, crop: bool):
    """One attention layer whose mask is a constant layout (a buffer of the model) combined with
    key padding; ``crop``: the buffer cut to the input's length (``[:s, :s]``)."""

    class FixedLayout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(50, WIDTH)
            self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
            self.register_buffer("visible", torch.from_numpy(_tiles(layout, block, length, False)))

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, HEADS, HEAD_SIZE).transpose(1, 2) for t in self.qkv(x).split(WIDTH, dim=-1))
            visible = self.visible[:s, :s] if crop else self.visible
            allowed = visible[None, None] & attention_mask[:, None, None, :].bool()
            bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)
            probs = torch.softmax(q @ k.transpose(-1, -2) * HEAD_SIZE ** -0.5 + bias, dim=-1)
            return (probs @ v).transpose(1, 2).reshape(b, s, WIDTH)

    return FixedLayout().eval()


def test_exported_static_bigbird_layout(tmp_path):
    """A static-length export whose mask is a constant BigBird-like layout (a buffer of the model)
    combined with key padding: the exact layout is found and lowered (dense global rows)."""
    torch = pytest.importorskip("torch")
    import tfgraph

    length, block = 30, 4
    layout = bigbird(-(-length // block), seed=1)

    raw = tmp_path / "bigbird.onnx"
    ids, mask = torch.randint(0, 50, (2, length)), torch.ones(2, length, dtype=torch.int64)
    module = _fixed_layout_module(torch, layout, block, length, crop=False)
    torch.onnx.export(module, (ids, mask), raw, dynamo=False, opset_version=18,
                      input_names=["input_ids", "attention_mask"], output_names=["y"])
    artifact = tfgraph.compile(raw, "cpu-fp32", output=tmp_path / "out", verify=False)  # checked below
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "classify-attention-masks")
    assert {k: v["matches"] for k, v in record["rules"].items()} == {"block_sparse+padding(attention_mask)": 1}
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "lower-attention")
    assert record["rules"]["window:block_sparse"]["matches"] == 1
    compiled = ir.load(tmp_path / "out" / "model.onnx")
    for left in (False, True):
        feeds = verify.generate_inputs(ir.load(raw), {}, seed=5)
        if left:
            feeds = {k: (v[..., ::-1].copy() if "mask" in k else v) for k, v in feeds.items()}
        want = verify.run(ir.load(raw), feeds)["y"]
        got = verify.run(compiled, feeds)["y"]
        rows = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exported_fixed_layout_cropped_to_the_length(tmp_path, exporter):
    """A constant layout for the longest sequence, cropped to the input's length (``[:s, :s]``)
    with a dynamic sequence axis: compiles (onnxruntime's symbolic shape inference broadcast
    (1, 1, Min(30, S), Min(30, S)) with (B, 1, 1, S) into (B, 2, S, S) here, which the
    checker rejected after ``infer-shapes``) and equals the export at several lengths."""
    torch = pytest.importorskip("torch")
    import tfgraph

    length, block = 30, 4
    layout = bigbird(-(-length // block), seed=1)

    raw = tmp_path / "cropped.onnx"
    ids, mask = torch.randint(0, 50, (2, length)), torch.ones(2, length, dtype=torch.int64)
    module = _fixed_layout_module(torch, layout, block, length, crop=True)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["y"])
    if exporter == "dynamo":
        s, b = torch.export.Dim("S", max=length), torch.export.Dim("B")
        torch.onnx.export(module, (ids, mask), raw, dynamo=True, dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), **names)
    else:
        axes = {0: "B", 1: "S"}
        torch.onnx.export(module, (ids, mask), raw, dynamo=False, opset_version=18,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes}, **names)
    tfgraph.compile(raw, "cpu-fp32", output=tmp_path / "out")
    compiled = ir.load(tmp_path / "out" / "model.onnx")
    rng = np.random.default_rng(0)
    for s in (30, 17, 5):
        feeds = {"input_ids": rng.integers(0, 50, (2, s)), "attention_mask": np.ones((2, s), np.int64)}
        feeds["attention_mask"][1, s - 2:] = 0
        want = verify.run(ir.load(raw), feeds)["y"]
        got = verify.run(compiled, feeds)["y"]
        rows = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[rows], want[rows], atol=2e-6, rtol=1e-5, err_msg=f"S={s}")
