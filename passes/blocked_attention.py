"""Windowed attention in standard ONNX ops, in O(S·window): the blocked formulation.

The sequence is cut into blocks of ``block`` queries. A query at ``i`` sees keys ``j`` with
``-left <= j - i <= right``, so query block ``t`` needs only key blocks ``t - c … t + r``
(``c = ceil(left / block)``, ``r = ceil(right / block)``): keys and values are padded by
``c`` blocks in front and ``r`` behind, and ``c + 1 + r`` shifted slices, each reshaped to
(B, N, blocks, block, H), are concatenated into per-block key windows. Scores are a
batched MatMul of (block × window) tiles; on top come the exact band (a constant
(block, window) table, since ``j - i`` depends only on the positions inside the tile)
and the key mask: keys outside ``[0, S)`` and, when the model has one, the zeros of its
(batch, keys) padding mask, gathered into the same windows. Softmax, MatMul with the
value windows, and the padded query rows are cut off.

Every query row sees the same keys with the same scores as dense attention under the
band mask; only a row that sees no key at all (a fully padded position) differs: dense
attention averages over every key there, the blocked form over its window.

``dense_mask`` builds the same mask densely, (B, 1, S, S), for the short-sequence
fallback, so a model does not need the exporter's own O(S²) mask tensor.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

# Each of the two additive parts uses half of the lowest float, so their sum stays finite.
_HALF_MIN = float(np.finfo(np.float32).min) / 2


class _Builder:
    """Appends nodes to ``nodes`` and returns their outputs, named ``<prefix>/<op>_<n>``
    (subgraphs of an ``If`` share one namespace with the main graph)."""

    _count = 0

    def __init__(self, nodes: list[ir.Node], prefix: str = "tfgraph"):
        self.nodes = nodes
        self.prefix = prefix

    def __call__(self, op: str, *inputs, num_outputs: int = 1, **attributes):
        node = ir.node(op, list(inputs), attributes=attributes or None, num_outputs=num_outputs)
        for i, output in enumerate(node.outputs):
            _Builder._count += 1
            output.name = f"{self.prefix}/{op}_{_Builder._count}" + (f":{i}" if i else "")
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array) -> ir.Value:
        return self("Constant", value=ir.tensor(np.asarray(array)))

    def i64(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))


def _sequence_length(b: _Builder, x: ir.Value) -> ir.Value:
    """S of a (B, N, S, H) tensor as a 1-element int64 vector."""
    return b("Shape", x, start=2, end=3)


def _windows(b: _Builder, x: ir.Value, axis: int, front: int, back_extra: int, count: int, block: int,
             padded_length: ir.Value, sequence: ir.Value, tail: list[int]) -> ir.Value:
    """Pad ``x`` along ``axis`` (``front`` in front; behind, up to ``padded_length`` plus
    ``back_extra``), then concatenate ``count`` slices shifted by one block each, every slice
    reshaped to (…, blocks, block, *tail): the per-block windows, concatenated on the block axis."""
    rank = axis + 1 + len(tail)
    back = b("Add", b("Sub", padded_length, sequence), b.i64(back_extra))
    zeros_before = b.i64(*([0] * axis))
    zeros_after = b.i64(*([0] * (rank - axis - 1)))
    pads = b("Concat", zeros_before, b.i64(front), zeros_after, zeros_before, back, zeros_after, axis=0)
    padded = b("Pad", x, pads)
    shape = b.i64(*([0] * axis), -1, block, *tail)
    parts = []
    for m in range(count):
        start = b.i64(m * block)
        end = b("Add", padded_length, start)
        piece = b("Slice", padded, start, end, b.i64(axis))
        parts.append(b("Reshape", piece, shape))
    return parts[0] if count == 1 else b("Concat", *parts, axis=axis + 1)


def blocked_attention(
    nodes: list[ir.Node],
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    *,
    scale: float,
    left: int,
    right: int,
    block: int,
    head_size: int,
    key_padding: ir.Value | None = None,
    prefix: str = "blocked",
) -> ir.Value:
    """Attention of (B, N, S, H) ``q``/``k``/``v`` under the band ``-left <= j - i <= right``
    (and ``key_padding``, (B, S), nonzero = visible), output (B, N, S, H)."""
    b = _Builder(nodes, prefix)
    before = math.ceil(left / block)
    after = math.ceil(right / block)
    count = before + 1 + after
    width = count * block

    sequence = _sequence_length(b, q)
    blocks = b("Div", b("Add", sequence, b.i64(block - 1)), b.i64(block))
    padded_length = b("Mul", blocks, b.i64(block))

    q_blocks = _windows(b, q, 2, 0, 0, 1, block, padded_length, sequence, [head_size])
    k_windows = _windows(b, k, 2, before * block, after * block, count, block, padded_length, sequence, [head_size])
    v_windows = _windows(b, v, 2, before * block, after * block, count, block, padded_length, sequence, [head_size])

    scores = b("MatMul", q_blocks, b("Transpose", k_windows, perm=[0, 1, 2, 4, 3]))
    scores = b("Mul", scores, b.const(np.array(scale, dtype=np.float32)))

    # The band inside a tile: query u of the block, window slot s: j - i = s - before·block - u.
    offset = np.arange(width)[None, :] - before * block - np.arange(block)[:, None]
    band = np.where((offset >= -left) & (offset <= right), 0.0, _HALF_MIN).astype(np.float32)
    scores = b("Add", scores, b.const(band))

    # Keys outside [0, S) and padded keys: a (B|1, S) visibility row, windowed like the keys.
    if key_padding is not None:
        visible = b("Cast", key_padding, to=ir.DataType.FLOAT)
    else:
        visible = b("ConstantOfShape", b("Concat", b.i64(1), sequence, axis=0),
                    value=ir.tensor(np.array([1.0], dtype=np.float32)))
    visible_windows = _windows(b, visible, 1, before * block, after * block, count, block, padded_length, sequence, [])
    key_bias = b("Where", b("Greater", visible_windows, b.const(np.array(0.0, np.float32))),
                 b.const(np.array(0.0, np.float32)), b.const(np.array(_HALF_MIN, np.float32)))
    key_bias = b("Unsqueeze", key_bias, b.i64(1, 3))  # (B|1, 1, blocks, 1, width)
    scores = b("Add", scores, key_bias)

    probs = b("Softmax", scores, axis=-1)
    context = b("MatMul", probs, v_windows)  # (B, N, blocks, block, H)
    context = b("Reshape", context, b.i64(0, 0, -1, head_size))
    return b("Slice", context, b.i64(0), sequence, b.i64(2))


def dense_mask(
    nodes: list[ir.Node], q: ir.Value, *, left: int | None, right: int, key_padding: ir.Value | None,
    prefix: str = "mask",
) -> ir.Value:
    """The additive (B|1, 1, S, S) mask of the band (``left=None``: unbounded) and key padding, for (B, N, S, H) ``q``."""
    b = _Builder(nodes, prefix)
    sequence = _sequence_length(b, q)
    length = b("Squeeze", sequence, b.i64(0))
    positions = b("Range", b.const(np.array(0, np.int64)), length, b.const(np.array(1, np.int64)))
    offset = b("Sub", b("Unsqueeze", positions, b.i64(0)), b("Unsqueeze", positions, b.i64(1)))  # j - i
    visible = b("LessOrEqual", offset, b.const(np.array(right, np.int64)))
    if left is not None:
        visible = b("And", visible, b("GreaterOrEqual", offset, b.const(np.array(-left, np.int64))))
    visible = b("Unsqueeze", visible, b.i64(0, 1))  # (1, 1, S, S)
    if key_padding is not None:
        keys = b("Cast", key_padding, to=ir.DataType.BOOL)
        visible = b("And", visible, b("Unsqueeze", keys, b.i64(1, 2)))
    return b("Where", visible, b.const(np.array(0.0, np.float32)),
             b.const(np.array(np.finfo(np.float32).min, np.float32)))
