"""Windowed attention in standard ONNX ops, in O(S·window): the blocked formulation.

The sequence is cut into blocks of ``block`` queries. A query at ``i`` sees keys ``j`` with
``-left <= j - i <= right``, so query block ``t`` needs only key blocks ``t - c … t + r``
(``c = ceil(left / block)``, ``r = ceil(right / block)``): one Gather per tensor builds
the (B, blocks, (c + 1 + r)·block, N·H) key and value windows. Scores are a
batched MatMul of (block × window) tiles; on top come the exact band (a constant
(block, window) table, since ``j - i`` depends only on the positions inside the tile)
and the key mask: keys outside ``[0, S)`` and, when the model has one, the zeros of its
(batch, keys) padding mask, gathered into the same windows. Softmax, MatMul with the
value windows, and the padded query rows are cut off. Run-time scalars that meet a tensor in a
comparison stay 1-D: onnxruntime's OpenVINO EP left a comparison with a dynamic 0-D operand to the
CPU EP (measured with benchmarks/openvino_ep_check.py on local-small).

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

from tfgraph.analysis import BLOCKED_ATTENTION_MARK
from tfgraph.builder import Builder
from tfgraph.ops import BLOCKED_FORM, mark_attention_form

# Each of the two additive parts uses half of the lowest float, so their sum stays finite.
_HALF_MIN = float(np.finfo(np.float32).min) / 2


def _arange(b: Builder, count: int, start: int) -> ir.Value:
    """``start, start + 1, …, start + count - 1`` (int64), computed at run time."""
    return b("Range", b.const(np.array(start, np.int64)), b.const(np.array(start + count, np.int64)),
             b.const(np.array(1, np.int64)))


def _positions(b: Builder, sequence: ir.Value, blocks: ir.Value, block: int, before: int, count: int):
    """Key positions of every block's window, (blocks, count·block): ``t·block + s - before·block``,
    clipped into [0, S) for gathering, and whether each lies inside the sequence."""
    last = b("Sub", sequence, b.i64(1))
    start = b("Mul", b("Range", b.const(np.array(0, np.int64)), b("Squeeze", blocks, b.i64(0)),
                       b.const(np.array(1, np.int64))), b.const(np.array(block, np.int64)))
    slots = b("Reshape", _arange(b, count * block, -before * block), b.i64(1, -1))  # (1, width)
    positions = b("Add", b("Unsqueeze", start, b.i64(1)), slots)
    valid = b("And", b("GreaterOrEqual", positions, b.const(np.array(0, np.int64))),
              b("GreaterOrEqual", last, positions))  # last stays (1,): OpenVINO's EP rejects a dynamic 0-D side
    clipped = b("Min", b("Max", positions, b.const(np.array(0, np.int64))), b("Squeeze", last, b.i64(0)))
    return clipped, valid


def _band_bias(b: Builder, *, left: int, right: int, block: int, before: int, width: int) -> ir.Value:
    """The additive (block, width) band of a tile, the same for every tile and head: query ``u``
    of the tile and window slot ``s`` are ``j - i = s - before·block - u`` apart. Built at run
    time from two Ranges (a constant table would add block·width floats per layer); Reshape
    rather than Unsqueeze: ONNX's data propagation gets Unsqueeze of a Range wrong."""
    offset = b("Sub", b("Reshape", _arange(b, width, -before * block), b.i64(1, -1)),
               b("Reshape", _arange(b, block, 0), b.i64(-1, 1)))
    in_band = b("And", b("GreaterOrEqual", offset, b.const(np.array(-left, np.int64))),
                b("GreaterOrEqual", b.const(np.array(right, np.int64)), offset))
    return b("Where", in_band, b.const(np.array(0.0, np.float32)), b.const(np.array(_HALF_MIN, np.float32)))


KERNELS = ("standard", "com.microsoft.MultiHeadAttention")


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
    heads: int,
    head_size: int,
    key_padding: ir.Value | None = None,
    global_tokens: int = 0,
    own_block_only: bool = False,
    kernel: str = "standard",
    prefix: str = "blocked",
) -> ir.Value:
    """Attention of (B, S, N·H) ``q``/``k``/``v`` under the band ``-left <= j - i <= right``
    (and ``key_padding``, (B, S), nonzero = visible), output (B, S, N·H).

    ``own_block_only``: block-diagonal attention (Swin-like local windows): query block ``t``
    sees exactly key block ``t`` (pass ``left = right = block - 1``).

    ``global_tokens=g`` (Longformer/BigBird-style): the first ``g`` keys are visible to
    every query (to every later one when the band is causal, ``right == 0``); they join
    each tile's window as ``g`` extra slots (and are masked inside the window, so none is
    counted twice). With a two-sided band the first ``g`` queries also see every key: their
    rows are computed densely and replace the blocked ones.

    ``kernel="standard"``: the tiles' products and Softmax in standard ONNX ops (any
    runtime). ``kernel="com.microsoft.MultiHeadAttention"``: the tiles become the batch of
    one MultiHeadAttention call, (B·blocks, block, N·H) queries against (B·blocks,
    window, N·H) keys, the tile mask as its ``attention_bias`` — onnxruntime's fused
    kernel scales, masks and normalizes in one pass over the scores.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown blocked-attention kernel {kernel!r}")
    b = Builder(prefix, nodes)
    # own_block_only: block-diagonal attention (Swin-like), each tile sees its own block only.
    before = 0 if own_block_only else math.ceil(left / block)
    after = 0 if own_block_only else math.ceil(right / block)
    count = before + 1 + after
    width = count * block
    hidden = heads * head_size

    sequence = b("Shape", q, start=1, end=2)
    blocks = b("Div", b("Add", sequence, b.i64(block - 1)), b.i64(block))
    # One Gather per tensor (no padding copies): (B, blocks, block, D) query tiles (rows past
    # the end repeat the last query and are cut off at the end) and (B, blocks, width, D)
    # key/value windows (positions outside the sequence repeat an edge key and are masked).
    q_rows, _ = _positions(b, sequence, blocks, block, 0, 1)
    keys, valid = _positions(b, sequence, blocks, block, before, count)
    band = _band_bias(b, left=left, right=right, block=block, before=before, width=width)
    if kernel != "standard" and not global_tokens:
        return _tiles_mha(b, q, k, v, sequence, q_rows, keys, valid, band, scale=scale, block=block, width=width,
                          heads=heads, head_size=head_size, key_padding=key_padding)
    q_tiles = b("Gather", q, q_rows, axis=1)
    k_windows = b("Gather", k, keys, axis=1)
    v_windows = b("Gather", v, keys, axis=1)

    # The tile mask, (B|1, blocks, block, width), head-independent: the band plus keys outside
    # [0, S) and padded keys (the (B, S) padding row gathered like the keys).
    visible = b("Unsqueeze", valid, b.i64(0))  # (1, blocks, width)
    if key_padding is not None:
        padding = b("Gather", b("Cast", key_padding, to=ir.DataType.BOOL), keys, axis=1)
        visible = b("And", visible, padding)
    if global_tokens:
        # Window slots holding a global key are masked: the global slots below carry it.
        visible = b("And", visible, b("Unsqueeze", b("GreaterOrEqual", keys, b.const(np.array(global_tokens, np.int64))), b.i64(0)))
    key_bias = b("Where", visible, b.const(np.array(0.0, np.float32)), b.const(np.array(_HALF_MIN, np.float32)))
    mask = b("Add", b("Unsqueeze", key_bias, b.i64(2)), band)  # (B|1, blocks, block, width)
    if global_tokens:
        g = global_tokens
        first = b.const(np.arange(g, dtype=np.int64))
        present = b("Less", first, b("Squeeze", sequence, b.i64(0)))  # (g,): sequences shorter than g
        global_idx = b("Min", first, b("Squeeze", b("Sub", sequence, b.i64(1)), b.i64(0)))
        shape_kv = b("Concat", b("Shape", q, start=0, end=1), blocks, b.i64(g, hidden), axis=0)
        k_windows = b("Concat", k_windows, b("Expand", b("Unsqueeze", b("Gather", k, global_idx, axis=1), b.i64(1)), shape_kv), axis=2)
        v_windows = b("Concat", v_windows, b("Expand", b("Unsqueeze", b("Gather", v, global_idx, axis=1), b.i64(1)), shape_kv), axis=2)
        # Global slot j for tile row i (position t·block + u): visible if j < S, j is not
        # padding, and (two-sided band, or j <= i).
        seen = b("Unsqueeze", present, b.i64(0))  # (1, g)
        if key_padding is not None:
            seen = b("And", seen, b("Gather", b("Cast", key_padding, to=ir.DataType.BOOL), global_idx, axis=1))
        seen = b("Unsqueeze", b("Unsqueeze", seen, b.i64(1)), b.i64(1))  # (B|1, 1, 1, g)
        if right == 0:
            rows = b("Unsqueeze", b("Unsqueeze", q_rows, b.i64(0)), b.i64(3))  # (1, blocks, block, 1)
            seen = b("And", seen, b("GreaterOrEqual", rows, b("Unsqueeze", first, b.i64(0, 1, 2))))
        global_bias = b("Where", seen, b.const(np.array(0.0, np.float32)), b.const(np.array(2 * _HALF_MIN, np.float32)))
        batch = b("Max", b("Shape", mask, start=0, end=1), b("Shape", global_bias, start=0, end=1))
        lead = b("Concat", batch, blocks, b.i64(block), axis=0)
        mask = b("Concat", b("Expand", mask, b("Concat", lead, b.i64(width), axis=0)),
                 b("Expand", global_bias, b("Concat", lead, b.i64(g), axis=0)), axis=3)
        width += g

    context = _attend(b, q, q_tiles, k_windows, v_windows, mask, blocks, block=block, width=width, heads=heads,
                      head_size=head_size, scale=scale, kernel=kernel)
    context = b("Slice", context, b.i64(0), sequence, b.i64(1))
    if global_tokens and right > 0:
        rows = _global_rows(b, q, k, v, scale=scale, heads=heads, head_size=head_size, count=global_tokens,
                            key_padding=key_padding)
        context = b("Concat", rows, b("Slice", context, b.i64(global_tokens), b.i64(2**62), b.i64(1)), axis=1)
    return context


def _tiles_mha(b: Builder, q, k, v, sequence, q_rows, keys, valid, band, *, scale: float, block: int, width: int,
               heads: int, head_size: int, key_padding: ir.Value | None) -> ir.Value:
    """The MultiHeadAttention-tiles form of a band without global tokens, with the least data
    movement found on onnxruntime's CPU kernel:

    * one (block, width) band mask broadcast over the tiles (no (B, tiles, block, width) mask
      built, expanded and read at every call);
    * keys and values gathered straight into the kernel's own (tiles, N, width, H) layout:
      one Gather of H-sized rows from the (B·S·N, H) view of the (B, S, N·H) tensor, so the
      kernel transposes nothing (about two copies of K and V less than (tiles, width, N·H) windows);
    * window slots outside the sequence (clipped into it for gathering) and padded keys (the
      (B, S) padding row gathered like the keys) hidden by the kernel's (B·tiles, width) key
      padding mask, so all tiles are one call.

    ``q_rows``, ``keys``/``valid`` and ``band`` as :func:`blocked_attention` builds them.
    Rows past the end are cut off."""
    hidden = heads * head_size
    band = b("Reshape", band, b.i64(1, 1, block, width))
    batch = b("Shape", q, start=0, end=1)
    # Row of (B·S·N, H) holding key position p, head n of batch row i: (i·S + p)·N + n.
    first_row = b("Mul", b("Range", b.const(np.array(0, np.int64)), b("Squeeze", batch, b.i64(0)),
                           b.const(np.array(1, np.int64))), b("Squeeze", sequence, b.i64(0)))
    rows = b("Add", b("Reshape", first_row, b.i64(-1, 1, 1, 1)), b("Unsqueeze", keys, b.i64(0, 2)))
    rows = b("Add", b("Mul", rows, b.const(np.array(heads, np.int64))),
             b.const(np.arange(heads, dtype=np.int64).reshape(1, 1, heads, 1)))  # (B, tiles, N, width)
    split = b.i64(-1, head_size)
    tile_kv = b.i64(-1, heads, width, head_size)
    k_tiles = b("Reshape", b("Gather", b("Reshape", k, split), rows, axis=0), tile_kv)
    v_tiles = b("Reshape", b("Gather", b("Reshape", v, split), rows, axis=0), tile_kv)
    q_tiles = b("Reshape", b("Gather", q, q_rows, axis=1), b.i64(-1, block, hidden))
    if key_padding is not None:  # (B, tiles, width)
        seen = b("And", b("Unsqueeze", valid, b.i64(0)),
                 b("Gather", b("Cast", key_padding, to=ir.DataType.BOOL), keys, axis=1))
        seen = b("Cast", seen, to=ir.DataType.INT32)
    else:
        seen = b("Expand", b("Cast", valid, to=ir.DataType.INT32), b("Concat", batch, b.i64(1, 1), axis=0))
    key_mask = b("Reshape", seen, b.i64(-1, width))  # (B·tiles, width)
    attended = b("MultiHeadAttention", q_tiles, k_tiles, v_tiles, None, key_mask, band, domain="com.microsoft",
                 num_heads=heads, scale=scale, mask_filter_value=_HALF_MIN)
    context = b("Reshape", attended, b("Concat", batch, b.i64(-1, hidden), axis=0))
    return b("Slice", context, b.i64(0), sequence, b.i64(1))


def _attend(b: Builder, q: ir.Value, q_tiles: ir.Value, k_windows: ir.Value, v_windows: ir.Value, mask: ir.Value,
            blocks: ir.Value, *, block: int, width: int, heads: int, head_size: int, scale: float, kernel: str
            ) -> ir.Value:
    """Attention of every tile: (B, blocks, block, D) queries against (B, blocks, width, D)
    keys and values under the additive (B|1, blocks, block|1, width) ``mask``; the context
    as (B, blocks·block, D)."""
    hidden = heads * head_size
    if kernel == "standard":
        split = b.i64(0, 0, 0, heads, head_size)
        q_h = b("Transpose", b("Reshape", q_tiles, split), perm=[0, 1, 3, 2, 4])  # (B, blocks, N, block, H)
        q_h = b("Mul", q_h, b.const(np.array(scale, dtype=np.float32)))
        k_t = b("Transpose", b("Reshape", k_windows, split), perm=[0, 1, 3, 4, 2])  # (B, blocks, N, H, width)
        v_h = b("Transpose", b("Reshape", v_windows, split), perm=[0, 1, 3, 2, 4])  # (B, blocks, N, width, H)
        scores = b("Add", b("MatMul", q_h, k_t), b("Unsqueeze", mask, b.i64(2)))
        probs = b("Softmax", scores, axis=-1)
        probs.producer().name = f"{b.prefix}/{BLOCKED_ATTENTION_MARK}/Softmax"
        mark_attention_form(probs.producer(), BLOCKED_FORM)  # counted as fused by analysis
        context = b("MatMul", probs, v_h)  # (B, blocks, N, block, H)
        context = b("Reshape", b("Transpose", context, perm=[0, 1, 3, 2, 4]), b.i64(0, -1, hidden))
    else:
        flat = b.i64(-1, block, hidden)
        q_flat = b("Reshape", q_tiles, flat)
        k_flat = b("Reshape", k_windows, b.i64(-1, width, hidden))
        v_flat = b("Reshape", v_windows, b.i64(-1, width, hidden))
        batch = b("Shape", q, start=0, end=1)
        full = b("Concat", batch, blocks, b.i64(block, width), axis=0)
        bias = b("Reshape", b("Expand", mask, full), b.i64(-1, 1, block, width))
        attended = b("MultiHeadAttention", q_flat, k_flat, v_flat, None, None, bias, domain="com.microsoft",
                     num_heads=heads, scale=scale)
        batch_first = b("Concat", batch, b.i64(-1, hidden), axis=0)
        context = b("Reshape", attended, batch_first)
    return context


def sparse_rows(layout: np.ndarray) -> np.ndarray:
    """Query blocks of a block layout computed as tiles (the rest, which see far more key
    blocks than the typical one — global query blocks — are computed densely): a block is
    dense when it sees more than twice the median count of key blocks (and more than 2)."""
    counts = layout.sum(axis=1)
    dense = counts > max(2.0, 2 * float(np.median(counts)))
    return ~dense if not dense.all() else np.ones_like(dense)


def block_sparse_attention(
    nodes: list[ir.Node],
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    *,
    scale: float,
    block: int,
    heads: int,
    head_size: int,
    causal: bool,
    layout: np.ndarray | None = None,
    sequence_length: int | None = None,
    offsets: tuple[int, ...] | list[int] = (),
    global_blocks: int = 0,
    key_padding: ir.Value | None = None,
    kernel: str = "standard",
    prefix: str = "block_sparse",
) -> ir.Value:
    """Attention of (B, S, N·H) ``q``/``k``/``v`` under a block-sparse layout: query block ``t``
    (positions ``t·block …``) sees whole key blocks (and, when ``causal``, only keys ``j <= i``,
    so diagonal tiles are triangular), and ``key_padding`` ((B, S), nonzero = visible).

    Either a fixed ``layout`` ((n, n) bool, n = ceil(S / block)) for the static length
    ``sequence_length``: a constant (query blocks, most key blocks) table of key blocks
    (empty slots masked) feeds one Gather per tensor; query blocks that see far more key
    blocks than the others (:func:`sparse_rows`) are computed densely and put back in
    place by one Gather. Or a repeating pattern for any length (``offsets``, ``global_blocks``:
    see ``attention_masks.block_pattern``): the key blocks ``t + d`` and the first
    ``global_blocks`` blocks, computed at run time; the global query blocks (two-sided
    patterns) are computed densely.

    O(S·(most key blocks)·block) work and memory. As in :func:`blocked_attention`, a row that
    sees no key at all differs from dense attention (which averages over every key there).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown blocked-attention kernel {kernel!r}")
    b = Builder(prefix, nodes)
    hidden = heads * head_size
    slot = np.arange(block, dtype=np.int64)
    dense_rows = None
    if layout is not None:
        layout = np.asarray(layout, bool)
        length = int(sequence_length)
        tiles = np.flatnonzero(sparse_rows(layout))
        dense = np.flatnonzero(~sparse_rows(layout))
        most = int(layout[tiles].sum(axis=1).max())
        table = np.full((tiles.size, most), -1, np.int64)
        for r, t in enumerate(tiles):
            seen = np.flatnonzero(layout[t])
            table[r, : seen.size] = seen
        q_pos = tiles[:, None] * block + slot  # (tiles, block)
        k_pos = (table[:, :, None] * block + slot).reshape(tiles.size, -1)  # (tiles, width)
        valid = np.repeat(table >= 0, block, axis=1) & (k_pos < length)
        width = most * block
        blocks = b.i64(tiles.size)
        q_rows = b.const(np.minimum(q_pos, length - 1))
        k_rows = b.const(np.clip(k_pos, 0, length - 1))
        if causal:  # (1, tiles, block, width), compared at run time (a constant would be S·width)
            visible = b("And", b.const(valid[:, None, :]),
                        b("GreaterOrEqual", b.const(q_pos[:, :, None]), b.const(np.where(valid, k_pos, 0)[:, None, :])))
            visible = b("Unsqueeze", visible, b.i64(0))
        else:
            visible = b.const(valid[None, :, None, :])  # (1, tiles, 1, width)
        if dense.size:
            positions = np.arange(length)
            rows = positions[np.isin(positions // block, dense)]  # dense query positions (R,)
            dense_rows = (rows, layout[rows // block][:, positions // block] & ((positions[None, :] <= rows[:, None])
                                                                              if causal else True))
            order = np.empty(length, np.int64)
            where = np.searchsorted(tiles, positions // block)
            is_tile = np.isin(positions // block, tiles)
            order[is_tile] = where[is_tile] * block + positions[is_tile] % block
            order[~is_tile] = tiles.size * block + np.arange(rows.size)
            dense_rows += (order,)
    else:
        offsets = sorted(int(d) for d in offsets)
        g = global_blocks
        width = (len(offsets) + g) * block
        sequence = b("Shape", q, start=1, end=2)
        blocks = b("Div", b("Add", sequence, b.i64(block - 1)), b.i64(block))
        last = b("Squeeze", b("Sub", sequence, b.i64(1)), b.i64(0))
        count = b("Squeeze", blocks, b.i64(0))
        starts = b("Range", b.const(np.array(0, np.int64)), count, b.const(np.array(1, np.int64)))  # (n,)
        t = b("Reshape", starts, b.i64(-1, 1))  # (n, 1); not Unsqueeze (see blocked_attention)
        q_pos = b("Add", b("Mul", t, b.const(np.array(block, np.int64))), b.const(slot[None, :]))  # (n, block)
        q_rows = b("Min", q_pos, last)
        key_blocks = b("Add", t, b.const(np.array(offsets, np.int64)[None, :]))  # (n, K)
        in_range = b("And", b("GreaterOrEqual", key_blocks, b.const(np.array(max(0, g), np.int64))),
                     b("Less", key_blocks, count))  # a global block is seen through its own slot only
        if g:
            shape = b("Concat", blocks, b.i64(g), axis=0)
            key_blocks = b("Concat", key_blocks, b("Expand", b.const(np.arange(g, dtype=np.int64)[None, :]), shape), axis=1)
            in_range = b("Concat", in_range, b("Expand", b.const(np.ones((1, g), bool)), shape), axis=1)
        k_pos = b("Reshape", b("Add", b("Mul", b("Unsqueeze", key_blocks, b.i64(2)), b.const(np.array(block, np.int64))),
                               b.const(slot[None, None, :])), b.i64(0, -1))  # (n, width)
        in_range = b("Reshape", b("Expand", b("Unsqueeze", in_range, b.i64(2)), b.i64(1, 1, block)), b.i64(0, -1))
        valid = b("And", in_range, b("GreaterOrEqual", last, k_pos))
        k_rows = b("Min", b("Max", k_pos, b.const(np.array(0, np.int64))), last)
        if causal:
            visible = b("And", b("Unsqueeze", valid, b.i64(1)),
                        b("GreaterOrEqual", b("Unsqueeze", q_pos, b.i64(2)), b("Unsqueeze", k_pos, b.i64(1))))
            visible = b("Unsqueeze", visible, b.i64(0))  # (1, n, block, width)
        else:
            visible = b("Unsqueeze", valid, b.i64(0, 2))  # (1, n, 1, width)

    q_tiles = b("Gather", q, q_rows, axis=1)  # (B, n, block, D)
    k_windows = b("Gather", k, k_rows, axis=1)  # (B, n, width, D)
    v_windows = b("Gather", v, k_rows, axis=1)
    if key_padding is not None:
        keys = b("Cast", key_padding, to=ir.DataType.BOOL)
        visible = b("And", visible, b("Unsqueeze", b("Gather", keys, k_rows, axis=1), b.i64(2)))  # (B, n, ., width)
    mask = b("Where", visible, b.const(np.array(0.0, np.float32)), b.const(np.array(2 * _HALF_MIN, np.float32)))
    context = _attend(b, q, q_tiles, k_windows, v_windows, mask, blocks, block=block, width=width, heads=heads,
                      head_size=head_size, scale=scale, kernel=kernel)
    if layout is not None:
        if dense_rows is None:
            return b("Slice", context, b.i64(0), b.i64(length), b.i64(1))
        rows, seen, order = dense_rows
        dense_context = _dense_rows(b, q, k, v, rows, seen, scale=scale, heads=heads, head_size=head_size,
                                    key_padding=key_padding)
        return b("Gather", b("Concat", context, dense_context, axis=1), b.const(order), axis=1)
    context = b("Slice", context, b.i64(0), sequence, b.i64(1))
    if global_blocks and not causal:
        count = global_blocks * block
        rows = _global_rows(b, q, k, v, scale=scale, heads=heads, head_size=head_size, count=count,
                            key_padding=key_padding)
        context = b("Concat", rows, b("Slice", context, b.i64(count), b.i64(2**62), b.i64(1)), axis=1)
    return context


def _dense_rows(b: Builder, q, k, v, rows: np.ndarray, seen: np.ndarray, *, scale: float, heads: int,
                head_size: int, key_padding) -> ir.Value:
    """Dense attention of the queries at ``rows`` over the keys ``seen`` ((R, S) bool) and
    unpadded, (B, R, N·H)."""
    split = b.i64(0, 0, heads, head_size)
    q_r = b("Gather", q, b.const(rows.astype(np.int64)), axis=1)
    q_h = b("Mul", b("Transpose", b("Reshape", q_r, split), perm=[0, 2, 1, 3]), b.const(np.array(scale, np.float32)))
    k_t = b("Transpose", b("Reshape", k, split), perm=[0, 2, 3, 1])
    v_h = b("Transpose", b("Reshape", v, split), perm=[0, 2, 1, 3])
    visible = b.const(np.broadcast_to(seen, (rows.size, seen.shape[-1]))[None, None].copy())  # (1, 1, R, S)
    if key_padding is not None:
        keys = b("Unsqueeze", b("Cast", key_padding, to=ir.DataType.BOOL), b.i64(1, 2))
        visible = b("And", visible, keys)
    mask = b("Where", visible, b.const(np.array(0.0, np.float32)), b.const(np.array(2 * _HALF_MIN, np.float32)))
    probs = b("Softmax", b("Add", b("MatMul", q_h, k_t), mask), axis=-1)
    probs.producer().name = f"{b.prefix}/{BLOCKED_ATTENTION_MARK}/dense_rows/Softmax"
    mark_attention_form(probs.producer(), BLOCKED_FORM)
    context = b("MatMul", probs, v_h)
    return b("Reshape", b("Transpose", context, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))


def _global_rows(b: Builder, q, k, v, *, scale: float, heads: int, head_size: int, count: int, key_padding):
    """Dense attention of the first ``count`` queries over every (unpadded) key, (B, count, N·H)."""
    split = b.i64(0, 0, heads, head_size)
    q_g = b("Slice", q, b.i64(0), b.i64(count), b.i64(1))
    q_h = b("Mul", b("Transpose", b("Reshape", q_g, split), perm=[0, 2, 1, 3]), b.const(np.array(scale, np.float32)))
    k_t = b("Transpose", b("Reshape", k, split), perm=[0, 2, 3, 1])
    v_h = b("Transpose", b("Reshape", v, split), perm=[0, 2, 1, 3])
    scores = b("MatMul", q_h, k_t)  # (B, N, count, S)
    if key_padding is not None:
        keys = b("Unsqueeze", b("Cast", key_padding, to=ir.DataType.BOOL), b.i64(1, 2))
        scores = b("Add", scores, b("Where", keys, b.const(np.array(0.0, np.float32)),
                                    b.const(np.array(2 * _HALF_MIN, np.float32))))
    probs = b("Softmax", scores, axis=-1)
    probs.producer().name = f"{b.prefix}/{BLOCKED_ATTENTION_MARK}/global/Softmax"
    mark_attention_form(probs.producer(), BLOCKED_FORM)
    context = b("MatMul", probs, v_h)
    return b("Reshape", b("Transpose", context, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))



def dense_mask(
    nodes: list[ir.Node], q: ir.Value, *, left: int | None, right: int, key_padding: ir.Value | None,
    global_tokens: int = 0, sequence_axis: int = 1, prefix: str = "mask",
) -> ir.Value:
    """The additive (B|1, 1, S, S) mask of the band (``left=None``: unbounded), global tokens
    (as in :func:`blocked_attention`) and key padding, S read off ``q``'s ``sequence_axis``."""
    b = Builder(prefix, nodes)
    sequence = b("Shape", q, start=sequence_axis, end=sequence_axis + 1)
    length = b("Squeeze", sequence, b.i64(0))
    positions = b("Range", b.const(np.array(0, np.int64)), length, b.const(np.array(1, np.int64)))
    offset = b("Sub", b("Unsqueeze", positions, b.i64(0)), b("Unsqueeze", positions, b.i64(1)))  # j - i
    visible = b("GreaterOrEqual", b.const(np.array(right, np.int64)), offset)
    if left is not None:
        visible = b("And", visible, b("GreaterOrEqual", offset, b.const(np.array(-left, np.int64))))
    if global_tokens:
        g = b.const(np.array(global_tokens, np.int64))
        global_key = b("Less", b("Unsqueeze", positions, b.i64(0)), g)  # (1, S): j < g
        if right == 0:
            global_key = b("And", global_key, b("GreaterOrEqual", b.const(np.array(0, np.int64)), offset))
        visible = b("Or", visible, global_key)
        if right > 0:
            visible = b("Or", visible, b("Less", b("Unsqueeze", positions, b.i64(1)), g))  # (S, 1): i < g
    visible = b("Unsqueeze", visible, b.i64(0, 1))  # (1, 1, S, S)
    if key_padding is not None:
        keys = b("Cast", key_padding, to=ir.DataType.BOOL)
        visible = b("And", visible, b("Unsqueeze", keys, b.i64(1, 2)))
    return b("Where", visible, b.const(np.array(0.0, np.float32)),
             b.const(np.array(np.finfo(np.float32).min, np.float32)))
