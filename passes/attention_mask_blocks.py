"""Block structures of attention masks (block-diagonal local windows, block-sparse layouts) and
the comparisons every mask classifier shares; :mod:`tfgraph.passes.attention_masks` uses them."""

from __future__ import annotations

import numpy as np

MASKED = -1e4


def _explains(bias: np.ndarray, expected: np.ndarray) -> bool:
    """``bias`` masks (``<= MASKED``) exactly where ``expected`` is False and adds 0 elsewhere."""
    masked = bias <= MASKED
    shape = np.broadcast_shapes(masked.shape, expected.shape)
    if not np.array_equal(np.broadcast_to(masked, shape), np.broadcast_to(~expected, shape)):
        return False
    return bool(np.all(bias[~masked] == 0))


def _broadcast_bias(bias: np.ndarray) -> np.ndarray:
    while bias.ndim < 4:
        bias = bias[None]
    return bias


def _same_block(s: int, w: int) -> np.ndarray:
    positions = np.arange(s)
    return (positions[:, None] // w) == (positions[None, :] // w)


def classify_blocks(biases: list[np.ndarray], paddings: list[dict[str, np.ndarray]]) -> dict | None:
    """Block-diagonal masks (Swin-like local windows: a query sees the keys of its own block of
    ``w`` positions), optionally combined with a padding input: ``{"kind": "blocks",
    "block_size": w[, "key_padding": name]}``, or None."""
    size = None
    for raw in biases:
        bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
        s, t = bias.shape[-2:]
        if s != t or np.isnan(bias).any():
            return None
        visible = (bias > MASKED).reshape(-1, s, t).any(axis=0)  # padding only removes keys
        w = int(visible[0].sum())
        if size not in (None, w) and w < s:
            return None
        if w < s:
            size = w
    if size is None or size < 1:
        return None
    for name in [None] + sorted(set.intersection(*(set(p) for p in paddings)) if paddings else []):
        for raw, pads in zip(biases, paddings or [{}] * len(biases)):
            bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
            s = bias.shape[-1]
            expected = _same_block(s, size)[None, None]
            if name is not None:
                keys = np.asarray(pads[name]) != 0
                if keys.shape != (bias.shape[0] if bias.shape[0] > 1 else keys.shape[0], s):
                    break
                expected = expected & keys[:, None, None, :]
            if not _explains(bias, expected):
                break
        else:
            return {"kind": "blocks", "block_size": size, **({"key_padding": name} if name else {})}
    return None


MIN_BLOCK = 4  # smallest block size a block-sparse layout may have


def _block_changes(visible: np.ndarray, causal: bool) -> int:
    """The gcd of the positions where a row (column) of ``visible`` (S, S) differs from the
    one before (on the part both see when ``causal``: keys ``j < i``); 0 when none does.
    A tile layout of block size ``b`` can only change at multiples of ``b``."""
    rows, cols = visible[1:] != visible[:-1], visible[:, 1:] != visible[:, :-1]
    if causal:
        rows, cols = np.tril(rows), np.tril(cols, -1)  # row i vs i - 1 on j <= i - 1; column j vs j - 1 on i >= j
    changes = np.concatenate([np.flatnonzero(rows.any(axis=1)), np.flatnonzero(cols.any(axis=0))]) + 1
    return int(np.gcd.reduce(changes)) if changes.size else 0


def _expand(layout: np.ndarray, block: int, s: int, causal: bool) -> np.ndarray:
    """The (S, S) visible set of a block layout (``j <= i`` too when ``causal``)."""
    blocks = np.arange(s) // block
    visible = layout[blocks[:, None], blocks[None, :]]
    return visible & np.tril(np.ones((s, s), bool)) if causal else visible


def block_pattern(n: int, offsets, global_blocks: int, causal: bool) -> np.ndarray:
    """The (n, n) layout of a repeating block pattern: query block ``t`` sees key blocks
    ``t + d`` for ``d`` in ``offsets``, and the first ``global_blocks`` key blocks; those
    query blocks see every key block unless ``causal`` (then only blocks ``<= t``)."""
    qb, kb = np.arange(n)[:, None], np.arange(n)[None, :]
    layout = np.isin(kb - qb, list(offsets)) | (kb < global_blocks)
    if causal:
        return layout & (kb <= qb)
    return layout | (qb < global_blocks)


def _fit_pattern(layout: np.ndarray, causal: bool) -> tuple[list[int], int] | None:
    """(offsets, global blocks) of :func:`block_pattern` that give ``layout``, or None."""
    n = layout.shape[0]
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    g = 0
    while g < n - 1 and np.array_equal(layout[:, g], allowed[:, g]) and (causal or layout[g].all()):
        g += 1
    offsets = []
    for d in range(-(n - 1), n):
        qb = np.arange(max(g, g - d), min(n, n - d))
        if qb.size == 0:
            continue
        values = layout[qb, qb + d]
        if values.all():
            offsets.append(d)
        elif values.any():
            return None
    if not np.array_equal(block_pattern(n, offsets, g, causal), layout):
        return None
    return offsets, g


def classify_block_sparse(biases: list[np.ndarray], paddings: list[dict[str, np.ndarray]]) -> dict | None:
    """Block-sparse masks: every (query block, key block) tile of ``block_size`` positions is
    entirely visible or entirely masked, except that, when no query sees a later key
    (``block_causal``), the visible diagonal tiles are lower-triangular; optionally
    combined with a (batch, keys) padding input. Queries and keys of one length only, and
    every query sees at least one key.

    All probes of one size (static shapes, or a mask built from constants): the layout
    itself, ``block_layout`` (n × n 0/1, n = ceil(S / block_size)) for ``block_sequence = S``.
    Probes of several sizes: only a layout that repeats along the diagonal, as
    :func:`block_pattern` (``block_offsets`` and ``global_blocks``); any other layout
    that changes with the length stays a bias. Returns the kind's attributes or None."""
    structures = []
    causal = True
    for raw in biases:
        bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
        s, t = bias.shape[-2:]
        if s != t or s < 2 or np.isnan(bias).any():
            return None
        visible = (bias > MASKED).reshape(-1, s, t).any(axis=0)  # padding only removes keys
        structures.append(visible)
        causal &= not np.triu(visible, 1).any()
    block = int(np.gcd.reduce([_block_changes(visible, causal) for visible in structures]))
    if block < MIN_BLOCK:  # 0: uniform at every probe (no block structure to see)
        return None
    layouts = []
    for visible in structures:
        s = visible.shape[0]
        layout = visible[::block, ::block]
        if not np.array_equal(_expand(layout, block, s, causal), visible) or not visible.any(axis=1).all():
            return None
        layouts.append(layout)
    sizes = {v.shape[0] for v in structures}
    kind: dict = {"kind": "block_sparse", "block_size": block, "block_causal": int(causal)}
    if len(sizes) == 1:
        layout = layouts[0]
        n = layout.shape[0]
        if n < 2 or layout.all() or (causal and layout[np.tril_indices(n)].all()) or (
                not causal and np.array_equal(layout, np.eye(n, dtype=bool))):
            return None  # everything visible, plainly causal, or block-diagonal (kind "blocks")
        kind.update(block_layout=[int(x) for x in layout.reshape(-1)], block_sequence=sizes.pop())
    else:
        largest = max(layouts, key=lambda layout: layout.shape[0])
        fitted = _fit_pattern(largest, causal)
        if fitted is None:
            return None
        offsets, g = fitted
        full = list(range(-(largest.shape[0] - 1), 1 if causal else largest.shape[0]))
        if offsets == full or (offsets == [0] and not g and not causal):
            return None  # causal / everything visible, or block-diagonal (kind "blocks"; causal chunks stay here)
        if any(not np.array_equal(block_pattern(layout.shape[0], offsets, g, causal), layout) for layout in layouts):
            return None
        kind.update(block_offsets=offsets, global_blocks=g)
    for name in [None] + sorted(set.intersection(*(set(p) for p in paddings)) if paddings else []):
        for raw, pads, visible in zip(biases, paddings or [{}] * len(biases), structures):
            bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
            expected = visible[None, None]
            if name is not None:
                keys = np.asarray(pads[name]) != 0
                if keys.ndim != 2 or keys.shape[1] != visible.shape[0] or bias.shape[0] not in (1, keys.shape[0]):
                    break
                expected = expected & keys[:, None, None, :]
            if not _explains(bias, expected):
                break
        else:
            return {**kind, **({"key_padding": name} if name else {})}
    return None


def block_sparse_confirm_length(kind: dict) -> int:
    """A sequence length at which a repeating block pattern shows every offset away from the
    edges, and that is not a multiple of the block size."""
    reach = max(abs(d) for d in kind["block_offsets"]) if kind["block_offsets"] else 0
    return kind["block_size"] * (2 * reach + kind["global_blocks"] + 4) + max(1, kind["block_size"] // 2)
