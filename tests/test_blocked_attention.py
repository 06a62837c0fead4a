"""The blocked O(S·window) attention form and the dense band mask, against a numpy reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tfgraph.compiler import verify
from tfgraph.passes.blocked_attention import KERNELS, blocked_attention, dense_mask

HEADS, HEAD_SIZE = 2, 8


def _model(left, right, block, padding, kernel, global_tokens):
    width = HEADS * HEAD_SIZE
    q, k, v = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", width])) for n in "qkv")
    mask = ir.Value(name="m", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    nodes: list[ir.Node] = []
    out = blocked_attention(nodes, q, k, v, scale=0.3, left=left, right=right, block=block, heads=HEADS,
                            head_size=HEAD_SIZE, key_padding=mask if padding else None, kernel=kernel,
                            global_tokens=global_tokens)
    out.name = "y"
    dense = dense_mask(nodes, q, left=left, right=right, key_padding=mask if padding else None,
                       global_tokens=global_tokens)
    dense.name = "mask"
    graph = ir.Graph([q, k, v, mask], [out, dense], nodes=nodes, opset_imports={"": 18, "com.microsoft": 1})
    return ir.Model(graph, ir_version=9)


def _reference(q, k, v, keys, left, right, global_tokens, scale=0.3):
    b, s, d = q.shape
    split = lambda x: x.reshape(b, s, HEADS, HEAD_SIZE).transpose(0, 2, 1, 3)  # noqa: E731
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = (j - i <= right) & (j - i >= -left)
    if global_tokens:
        visible |= (j < global_tokens) & ((j <= i) if right == 0 else True)
        if right > 0:
            visible |= i < global_tokens
    visible = visible[None, None] & (keys[:, None, None, :] != 0)
    scores = np.where(visible, split(q) @ split(k).transpose(0, 1, 3, 2) * scale, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, d), visible


CASES = [
    # left, right, block, sequence, padding, global tokens
    (7, 0, 8, 24, False, 0),  # causal window, S a multiple of the block
    (7, 0, 8, 21, True, 0),  # not a multiple, padding
    (7, 0, 4, 21, True, 0),  # block smaller than the window
    (255, 0, 128, 300, True, 0),  # the benchmark's window
    (3, 3, 4, 19, True, 0),  # two-sided
    (5, 2, 8, 30, False, 0),  # asymmetric
    (7, 0, 8, 5, True, 0),  # shorter than one block
    (7, 0, 8, 24, False, 1),  # causal + a global (sink) token
    (3, 3, 4, 19, True, 2),  # two-sided + global tokens (dense global rows)
    (3, 3, 4, 2, True, 3),  # sequence shorter than the global tokens
    # Causal, no padding: the MultiHeadAttention kernel's shared band mask (first tiles apart)
    (7, 0, 4, 21, False, 0),  # two first tiles, S not a multiple
    (7, 0, 4, 6, False, 0),  # fewer tiles than the first ones + 1
    (255, 0, 128, 300, False, 0),
    (0, 0, 4, 10, False, 0),  # window of the current key only: no first tiles
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("left, right, block, length, padding, global_tokens", CASES)
def test_blocked_matches_dense_reference(kernel, left, right, block, length, padding, global_tokens):
    model = _model(left, right, block, padding, kernel, global_tokens)
    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((2, length, HEADS * HEAD_SIZE)).astype(np.float32) for _ in range(3))
    keys = np.ones((2, length), np.int64)
    keys[1, max(1, length - 5):] = 0
    got = verify.run(model, {"q": q, "k": k, "v": v, "m": keys})
    want, visible = _reference(q, k, v, keys if padding else np.ones_like(keys), left, right, global_tokens)
    rows = visible.any(-1)[:, 0]  # (B, S): queries that see at least one key
    np.testing.assert_allclose(got["y"][rows], want[rows], atol=2e-6, rtol=1e-5)
    assert np.array_equal(np.broadcast_to(got["mask"] == 0, visible.shape), visible)
    assert np.all(got["mask"][got["mask"] != 0] == np.finfo(np.float32).min)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("length", [12, 14, 3])
def test_own_block_only_is_block_diagonal(kernel, length):
    """Swin-like local windows: a query sees exactly the keys of its own block (last block partial)."""
    block = 4
    width = HEADS * HEAD_SIZE
    q, k, v = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", width])) for n in "qkv")
    nodes: list[ir.Node] = []
    out = blocked_attention(nodes, q, k, v, scale=0.3, left=block - 1, right=block - 1, block=block, heads=HEADS,
                            head_size=HEAD_SIZE, own_block_only=True, kernel=kernel)
    out.name = "y"
    model = ir.Model(ir.Graph([q, k, v], [out], nodes=nodes, opset_imports={"": 18, "com.microsoft": 1}), ir_version=9)
    rng = np.random.default_rng(1)
    x = {n: rng.standard_normal((2, length, width)).astype(np.float32) for n in "qkv"}
    got = verify.run(model, x)["y"]
    b, s, d = x["q"].shape
    split = lambda t: t.reshape(b, s, HEADS, HEAD_SIZE).transpose(0, 2, 1, 3)  # noqa: E731
    positions = np.arange(s)
    visible = (positions[:, None] // block) == (positions[None, :] // block)
    scores = np.where(visible, split(x["q"]) @ split(x["k"]).transpose(0, 1, 3, 2) * 0.3, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = (probs @ split(x["v"])).transpose(0, 2, 1, 3).reshape(b, s, d)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
