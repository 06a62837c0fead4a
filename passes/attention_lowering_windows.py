"""Lowering windowed and block-sparse attention (and the helpers the GroupQueryAttention lowering
shares): the blocked form in standard ops, MultiHeadAttention tiles, or GroupQueryAttention with a
local window, chosen by the block's length; :mod:`tfgraph.passes.attention_lowering` dispatches here."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from tfgraph.builder import Builder
from tfgraph.passes import blocked_attention as blocked


def _same_dim(a, b) -> bool:
    return a is not None and b is not None and a == b


GQA_HEAD_SIZE_MULTIPLE = 8


def _prompt_lengths(b: Builder, q: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's ``seqlens_k`` (S - 1 per batch row) and ``total_sequence_length`` (S)
    for a prompt without past, from (B, S, D) queries."""
    shape = b("Shape", q)
    total = b("Cast", b("Gather", shape, b.const(np.array(1, np.int64))), to=ir.DataType.INT32)
    seqlens = b("Expand", b("Sub", total, b.const(np.array(1, np.int32))), b("Gather", shape, b.i64(0)))
    return seqlens, total


WINDOW_LOWERINGS = ("blocked", "auto", "fused")


def _window_applies(node: ir.Node) -> bool:
    """An exactly banded, block-diagonal or block-sparse block (``classify-attention-masks`` kinds
    ``window``, ``blocks``, ``block_sparse``) with static heads and head size; a fixed
    block-sparse layout also needs the static sequence length it was found for."""
    kind = node.attributes.get_string("mask_kind", "bias")
    if kind not in ("window", "blocks", "block_sparse"):
        return False
    if kind == "block_sparse" and node.attributes.get_ints("block_layout") is not None:
        q = node.inputs[0]
        axis = 2 if node.op_type == "AttentionBHSD" else 1
        if q.shape is None or q.shape[axis] != node.attributes.get_int("block_sequence"):
            return False
    return _heads_and_size(node) is not None and is_self_attention(node)


def is_self_attention(node: ir.Node) -> bool:
    """Queries and keys of one length (no cached keys): what the windowed forms assume."""
    q, k = node.inputs[0], node.inputs[1]
    axis = 2 if node.op_type == "AttentionBHSD" else 1
    return q.shape is not None and k.shape is not None and _same_dim(q.shape[axis], k.shape[axis])


def _heads_and_size(node: ir.Node) -> tuple[int, int] | None:
    q = node.inputs[0]
    if q.shape is None:
        return None
    if node.op_type == "AttentionBHSD":
        heads, size = q.shape[1], q.shape[3]
    else:
        heads, width = node.attributes.get_int("num_heads"), q.shape[2]
        size = width // heads if isinstance(width, int) and width % heads == 0 else None
    return (heads, size) if isinstance(heads, int) and isinstance(size, int) else None


def _key_padding(graph: ir.Graph, node: ir.Node) -> ir.Value | None:
    name = node.attributes.get_string("key_padding")
    if name is None:
        return None
    return next((v for v in graph.inputs if v.name == name), None)


def _window_small(nodes: list[ir.Node], node: ir.Node, q: ir.Value, k: ir.Value, v: ir.Value, heads: int,
                  size: int, left: int, right: int, padding: ir.Value | None, global_tokens: int) -> ir.Value:
    """The short-sequence form, on (B, S, N·H) tensors: GroupQueryAttention with
    ``local_window_size = left + 1`` (it counts the current key) for causal windows,
    else MultiHeadAttention; the mask, when one is needed, built densely from the band and
    the padding input (not the exporter's tensor, which would be computed at every length)."""
    prefix = f"{node.name or node.outputs[0].name}/short"
    b = Builder(prefix, nodes)
    scale = node.attributes.get_float("scale")
    if right == 0 and size % GQA_HEAD_SIZE_MULTIPLE == 0 and not global_tokens:
        seqlens, total = _prompt_lengths(b, q)
        inputs = [q, k, v, None, None, seqlens, total]
        if padding is not None:
            inputs += [None, None, None,
                       blocked.dense_mask(nodes, q, left=left, right=right, key_padding=padding, prefix=prefix)]
        return b("GroupQueryAttention", *inputs, domain="com.microsoft", num_outputs=3, num_heads=heads,
                 kv_num_heads=heads, scale=scale, local_window_size=left + 1)[0]
    mask = blocked.dense_mask(nodes, q, left=left, right=right, key_padding=padding,
                              global_tokens=global_tokens, prefix=prefix)
    return b("MultiHeadAttention", q, k, v, None, None, mask, domain="com.microsoft", num_heads=heads, scale=scale)


def _lower_window(graph: ir.Graph, node: ir.Node, mode: str, threshold: int, block: int | None, kernel: str
                  ) -> tuple[list[ir.Node], ir.Value, str]:
    """A banded block: the blocked form (O(S·window)) when the sequence is at least
    ``threshold`` long, the fused kernel below; decided from the static length, or at
    run time with an ``If`` on it. Returns the nodes, the output and the form chosen."""
    if node.attributes.get_string("mask_kind") == "block_sparse":
        return _lower_block_sparse(graph, node, kernel)
    q, k, v = node.inputs[:3]
    heads, size = _heads_and_size(node)
    own_block = node.attributes.get_string("mask_kind") == "blocks"
    if own_block:  # block-diagonal: tiles of the block size, always blocked (O(S·block) at every length)
        block = node.attributes.get_int("block_size")
        left = right = block - 1
        mode = "blocked"
    else:
        left, right = node.attributes.get_int("window_left"), node.attributes.get_int("window_right")
    global_tokens = node.attributes.get_int("global_tokens", 0)
    block = block or default_block(left, right)
    padding = _key_padding(graph, node)
    new: list[ir.Node] = []
    stem = node.name or node.outputs[0].name
    b = Builder(stem, new)
    bhsd = node.op_type == "AttentionBHSD"
    length = q.shape[2] if bhsd else q.shape[1]
    if bhsd:  # to (B, S, N·H)
        merge = b.i64(0, 0, -1)
        q, k, v = (b("Reshape", b("Transpose", x, perm=[0, 2, 1, 3]), merge) for x in (q, k, v))
    scale = node.attributes.get_float("scale")

    def long_form(nodes):
        return blocked.blocked_attention(nodes, q, k, v, scale=scale, left=left, right=right, block=block,
                                         heads=heads, head_size=size, key_padding=padding, kernel=kernel,
                                         global_tokens=global_tokens, own_block_only=own_block,
                                         prefix=f"{stem}/blocked")

    def short_form(nodes):
        return _window_small(nodes, node, q, k, v, heads, size, left, right, padding, global_tokens)

    if mode == "fused":  # GroupQueryAttention's window at every length where it applies (CUDA skips the work)
        mode = "fused" if right == 0 and size % GQA_HEAD_SIZE_MULTIPLE == 0 and not global_tokens else "auto"
    if mode == "fused":
        out, form = short_form(new), "fused"
    elif mode == "blocked" or (isinstance(length, int) and length >= threshold):
        out, form = long_form(new), "blocked"
    elif isinstance(length, int):
        out, form = short_form(new), "fused"
    else:
        branches = {}
        for name, build in (("then_branch", long_form), ("else_branch", short_form)):
            nodes: list[ir.Node] = []
            result = build(nodes)
            result.type = ir.TensorType(ir.DataType.FLOAT)
            branches[name] = ir.Graph([], [result], nodes=nodes, name=f"{stem}/{name}")
        long_enough = b("GreaterOrEqual", b("Shape", q, start=1, end=2), b.i64(threshold))
        out, form = b("If", b("Squeeze", long_enough, b.i64(0)), **branches), "if"
    if bhsd:
        out = b("Transpose", b("Reshape", out, b.i64(0, 0, heads, size)), perm=[0, 2, 1, 3])
    return new, out, form


def _lower_block_sparse(graph: ir.Graph, node: ir.Node, kernel: str) -> tuple[list[ir.Node], ir.Value, str]:
    """A block-sparse block: the generalised blocked form (per query block, a list of key
    blocks) at every length, O(S·(most key blocks)·block_size)."""
    q, k, v = node.inputs[:3]
    heads, size = _heads_and_size(node)
    block = node.attributes.get_int("block_size")
    layout = node.attributes.get_ints("block_layout")
    options: dict = {}
    if layout is not None:
        n = math.isqrt(len(layout))
        options = {"layout": np.array(layout, bool).reshape(n, n),
                   "sequence_length": node.attributes.get_int("block_sequence")}
    else:
        options = {"offsets": list(node.attributes.get_ints("block_offsets")),
                   "global_blocks": node.attributes.get_int("global_blocks", 0)}
    new: list[ir.Node] = []
    stem = node.name or node.outputs[0].name
    b = Builder(stem, new)
    bhsd = node.op_type == "AttentionBHSD"
    if bhsd:  # to (B, S, N·H)
        merge = b.i64(0, 0, -1)
        q, k, v = (b("Reshape", b("Transpose", x, perm=[0, 2, 1, 3]), merge) for x in (q, k, v))
    out = blocked.block_sparse_attention(
        new, q, k, v, scale=node.attributes.get_float("scale"), block=block, heads=heads, head_size=size,
        causal=bool(node.attributes.get_int("block_causal", 0)), key_padding=_key_padding(graph, node),
        kernel=kernel, prefix=f"{stem}/block_sparse", **options)
    if bhsd:
        out = b("Transpose", b("Reshape", out, b.i64(0, 0, heads, size)), perm=[0, 2, 1, 3])
    return new, out, "block_sparse"


def default_block(left: int, right: int) -> int:
    """Half the wider side of the window, rounded up to a multiple of 8 (at least 8): keys per
    query row are then window + block instead of 2 × window with block = window."""
    side = max(left, right, 1)
    return max(8, int(math.ceil(side / 2 / 8)) * 8)
