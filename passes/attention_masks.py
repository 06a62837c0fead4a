"""What the additive mask of each fused attention block means: causal, windowed, or a general bias.

``fuse-attention`` keeps the exporter's own additive mask, so fusion is exact whatever
the mask is. A target can run a causal or windowed block much faster when it knows the
structure (GroupQueryAttention skips the upper triangle; a windowed block can be
computed in O(n)), but exporters build the same mask in many graph shapes (Range and
comparisons, Trilu, constant tables, ``finfo.min`` or ``-inf`` fills, combined with the
padding mask or not). Instead of matching those graphs, this pass *evaluates* each
mask: the subgraph computing it is cut out and run on onnxruntime for a few probe
sizes and padding patterns, and the result is compared with the structures below.

Kinds written to the node's ``mask_kind`` attribute (relative to the bottom-right
aligned diagonal ``j - i <= T - S``, so cached keys count as visible):

* ``causal``: the mask is exactly the causal mask (0 where visible, a large negative
  value elsewhere) for every probe, whatever the padding — it does not depend on any
  input's values, so a target may drop it and use its causal kernel alone.
* ``causal_bias``: every future position is masked, plus more (typically padding): a
  causal kernel that also takes the bias is exact.
* ``window``: exactly a band, ``-left <= j - i - (T - S) <= right`` (``window_left``,
  ``window_right`` attributes; ``right == 0`` is causal with a sliding window).
* ``window_bias``: the band is masked as above, plus more (padding).
* ``blocks``: block-diagonal (Swin-like local windows): a query sees exactly the keys of its
  own block of ``block_size`` positions.
* ``block_sparse``: a block-sparse layout (BigBird/Longformer-style sliding, global and
  random blocks, Child et al.'s fixed pattern, …): for some block size ``b`` >= 4
  (``block_size``), every (query block, key block) tile is entirely visible or entirely
  masked, except that when no query sees a later key (``block_causal=1``) the visible
  diagonal tiles are lower-triangular (``j <= i``); queries and keys of one length, every
  query sees a key. Probes of one size (a static length, or a mask built from constants):
  any such layout, ``block_layout`` (n × n 0/1 row-major, n = ceil(S / b)) for
  ``block_sequence = S``. Probes of several sizes: only a layout that repeats along the
  diagonal — query block ``t`` sees key blocks ``t + d`` for ``d`` in ``block_offsets`` and
  the first ``global_blocks`` key blocks, and (two-sided) the first ``global_blocks`` query
  blocks see every key — fitted on the probes and confirmed at a longer one
  (:func:`block_pattern`); other layouts that change with the length stay ``bias``. A
  block band is not a ``window``: its reach depends on the query's place in its block.
  Only tried when nothing exact (causal, window, blocks, padding) explains the mask.
* ``bias``: anything else; stays a general additive bias.

When the extra masking of a ``*_bias`` kind is exactly the zeros of a ``(batch, keys)``
mask input (the usual ``attention_mask``), the kind becomes ``causal``/``window`` with a
``key_padding`` attribute (``blocks`` and ``block_sparse`` take it too) naming that input (and a ``bias`` that is nothing but such
padding becomes ``padding``): a target can then build the mask in O(S)
from the structure and that input instead of reading the exporter's (B, 1, S, T) tensor.

A value counts as masked when it is ``<= -1e4`` (exporters use ``finfo.min``, ``-inf``
or ``-10000``); a structural kind also needs every visible entry to be exactly 0 (or,
for the ``*_bias`` kinds, anything finite). Probes cover two sizes, right and left
padding; a mask that only looks causal at other sizes still runs correctly, because
the fused op keeps the bias and the numeric-diff instrument checks the lowering.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph import ops, verify
from tfgraph.passes.registry import register_pass

MASKED = -1e4
MAX_PROBE = 4096  # longest probe sequence; a larger integer constant in a mask keeps the mask as a bias
_NEUTRAL = {"Attention": 1, "AttentionBHSD": 2}  # op → axis of the query's sequence dim


def _slice_model(model: ir.Model, values: list[ir.Value]) -> ir.Model:
    """A copy of ``model`` whose outputs are ``values`` (by name), with everything else removed."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    by_name = {v.name: v for v in _all_values(copy.graph)}
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(by_name[v.name] for v in values)
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    used = {v.name for n in copy.graph for v in n.inputs if v is not None} | {v.name for v in copy.graph.outputs}
    copy.graph.inputs[:] = [v for v in copy.graph.inputs if v.name in used]
    copy.functions.clear()
    return copy


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _integer_constants(model: ir.Model) -> set[int]:
    found = set()
    for value in _all_values(model.graph):
        tensor = value.const_value
        if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
            attr = value.producer().attributes.get("value")
            tensor = attr.as_tensor() if attr is not None else None
        if tensor is not None and tensor.size == 1 and tensor.dtype.is_integer():
            found.add(int(np.asarray(tensor.numpy()).reshape(())))
    return found


def _probe_feeds(model: ir.Model) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Feeds for the probes: default sizes with right padding, a small size with left
    padding, and, when the mask's subgraph holds an integer constant that could be a
    window size beyond the default sequence length, a size just above it (batch 1)."""
    symbols = {d for info in verify.input_signature(model) for d in info.shape if isinstance(d, str)}
    default = verify.generate_inputs(model, {}, seed=1)
    seq_default = max((v.shape[-1] for k, v in default.items() if v.ndim >= 2), default=16)
    small = {s: (3 if "batch" in s.lower() else 7) for s in symbols}
    plans = [({}, False), (small, True)]
    constants = _integer_constants(model)
    window = max((c for c in constants if seq_default <= c <= MAX_PROBE), default=None)
    unprobed = any(MAX_PROBE < c < 2**31 - 1 for c in constants)
    if window is not None:
        plans.append(({s: (1 if "batch" in s.lower() else window + 2) for s in symbols}, False))
    probes = []
    for sizes, flip in plans:
        feeds = verify.generate_inputs(model, sizes, seed=1)
        if flip:
            feeds = {k: (v[..., ::-1].copy() if "mask" in k.lower() and v.ndim >= 2 else v) for k, v in feeds.items()}
        probes.append(feeds)
    return probes, unprobed


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


def _band(s: int, t: int, left: int | None, right: int) -> np.ndarray:
    """Visible positions (S, T): ``-left <= j - i - (t - s) <= right`` (``left=None``: unbounded)."""
    offset = np.arange(t)[None, :] - np.arange(s)[:, None] - (t - s)
    visible = offset <= right
    if left is not None:
        visible &= offset >= -left
    return visible


def _extent(visible: np.ndarray, s: int, t: int) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """For a visible set (S, T): the intervals of left and right window sizes it is consistent with.

    A size is exact when the band ends inside the plane; when it reaches the plane's
    corner (the first key from the last query, the last key from the first query), any
    larger size fits too.
    """
    if not visible.any():
        return None
    offset = np.arange(t)[None, :] - np.arange(s)[:, None] - (t - s)
    hi, lo = int(offset[visible].max()), int(offset[visible].min())
    left = (t - 1, np.inf) if lo <= -(t - 1) else (-lo, -lo)
    right = (s - 1, np.inf) if hi >= s - 1 else (hi, hi)
    return left, right


def _meet(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return max(a[0], b[0]), min(a[1], b[1])


def classify(biases: list[np.ndarray]) -> dict:
    """The kind of mask shown by ``biases`` (one array per probe, each broadcastable to (B, N, S, T))."""
    everything = (-np.inf, np.inf)
    exact: tuple | None = (everything, everything)  # (left, right) intervals all probes agree on
    union_left, union_right = everything, everything
    for raw in biases:
        bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
        s, t = bias.shape[-2:]
        if np.isnan(bias).any():
            return {"kind": "bias"}
        masked = bias <= MASKED
        planes = masked.reshape(-1, s, t)
        # Exact structure: every plane the same band, visible entries exactly 0.
        extent = _extent(~planes[0], s, t)
        if exact is not None and extent is not None and (planes == planes[0]).all() and np.all(bias[~masked] == 0):
            left, right = extent
            band = _band(s, t, None if left[1] == np.inf else int(left[0]), int(right[0]))
            if right[1] == np.inf:
                band = _band(s, t, None if left[1] == np.inf else int(left[0]), s - 1)
            exact = (_meet(exact[0], left), _meet(exact[1], right)) if np.array_equal(~planes[0], band) else None
        else:
            exact = None
        # Containment: the band that the union of visible entries stays inside.
        union = _extent(~planes.all(axis=0), s, t)
        if union is None:
            return {"kind": "bias"}
        union_left = (max(union_left[0], union[0][0]), union_left[1] if union[0][1] == np.inf else union[0][0])
        union_right = (max(union_right[0], union[1][0]), union_right[1] if union[1][1] == np.inf else union[1][0])
    if exact is not None and all(lo <= hi for lo, hi in exact):
        (left_lo, left_hi), (right_lo, right_hi) = exact
        if right_hi != np.inf and right_lo == right_hi:
            if left_hi == np.inf and right_lo == 0:
                return {"kind": "causal"}
            if left_hi != np.inf and left_lo == left_hi:
                return {"kind": "window", "window_left": int(left_lo), "window_right": int(right_lo)}
        return {"kind": "bias"}
    # Containment needs the largest bound seen (a bound that some probe showed; inf if none did).
    left = union_left[0] if union_left[1] != np.inf else np.inf
    right = union_right[0] if union_right[1] != np.inf else np.inf
    if right == 0:
        if left == np.inf:
            return {"kind": "causal_bias"}
        return {"kind": "window_bias", "window_left": int(left), "window_right": 0}
    if right != np.inf and left != np.inf:
        return {"kind": "window_bias", "window_left": int(left), "window_right": int(right)}
    return {"kind": "bias"}


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


def explain_padding(biases: list[np.ndarray], paddings: list[dict[str, np.ndarray]], kind: dict) -> str | None:
    """The name of the (batch, keys) input whose zeros, combined with ``kind``'s band, are
    exactly the masked entries of every probe's bias (visible entries exactly 0); or None."""
    if kind["kind"] not in ("causal_bias", "window_bias", "bias"):
        return None
    left = kind.get("window_left")
    right = kind.get("window_right", 0) if kind["kind"] != "bias" else None
    names = set.intersection(*(set(p) for p in paddings)) if paddings else set()
    for name in sorted(names):
        for raw, pads in zip(biases, paddings):
            bias = _broadcast_bias(np.asarray(raw, dtype=np.float64))
            keys = np.asarray(pads[name]) != 0
            s, t = bias.shape[-2:]
            if keys.ndim != 2 or keys.shape[1] != t or bias.shape[0] not in (1, keys.shape[0]):
                break
            band = _band(s, t, left, right) if right is not None else np.ones((s, t), bool)
            expected = ~(band[None, None] & keys[:, None, None, :])
            masked = bias <= MASKED
            shape = np.broadcast_shapes(masked.shape, expected.shape)
            if not np.array_equal(np.broadcast_to(masked, shape), np.broadcast_to(expected, shape)):
                break
            if not np.all(bias[~masked] == 0):
                break
        else:
            return name
    return None


@register_pass("classify-attention-masks")
class ClassifyAttentionMasksPass(ir.passes.InPlacePass):
    """Set ``mask_kind`` (and window sizes) of neutral attention ops by evaluating their masks.

    Only blocks with ``mask_kind="bias"`` are examined. The masks of all blocks are
    computed in one onnxruntime run per probe. A mask that cannot be evaluated (an
    input the probes cannot generate) stays ``bias``.
    """

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [
            n
            for n in model.graph
            if n.domain == ops.DOMAIN and n.op_type in _NEUTRAL and n.attributes.get_string("mask_kind", "bias") == "bias"
        ]
        self.report = {}
        if not nodes:
            return ir.passes.PassResult(model, False)
        values = list({id(n.inputs[3]): n.inputs[3] for n in nodes}.values())
        sliced = _slice_model(model, values)
        results: list[list[np.ndarray]] = [[] for _ in values]
        paddings: list[dict[str, np.ndarray]] = []
        probes, unprobed = _probe_feeds(sliced)
        for feeds in probes:
            try:
                outputs = verify.run(sliced, feeds)
            except Exception:  # noqa: BLE001 - e.g. a probe longer than a precomputed mask table
                unprobed = True
                continue
            for i, value in enumerate(values):
                results[i].append(outputs[value.name])
            paddings.append({k: v for k, v in feeds.items() if v.ndim == 2 and "mask" in k.lower()})
        kinds = {}
        fallback: dict[int, dict] = {}  # what a block-sparse mask was classified as before
        for value, result in zip(values, results):
            kind = classify(result) if result else {"kind": "bias"}
            if kind["kind"] in ("bias", "window_bias") and result:  # block-diagonal fits inside a band
                kind = classify_blocks(result, paddings) or kind
            padding = explain_padding(result, paddings, kind)
            if padding is not None:  # structure + the key padding of a (batch, keys) input, exactly
                base = "padding" if kind["kind"] == "bias" else kind["kind"].removesuffix("_bias")
                kind = {**kind, "kind": base, "key_padding": padding}
            if kind["kind"] in ("bias", "causal_bias", "window_bias") and result:
                sparse = classify_block_sparse(result, paddings)
                if sparse is not None:
                    fallback[id(value)], kind = kind, sparse
            kinds[id(value)] = kind
        # A repeating block pattern was fitted on short probes: confirm it at a length that
        # shows every offset away from the edges (or keep the kind found before).
        repeating = [v for v in values if "block_offsets" in kinds[id(v)]]
        if repeating:
            length = max(block_sparse_confirm_length(kinds[id(v)]) for v in repeating)
            confirm = None
            if length <= MAX_PROBE:
                symbols = {d for info in verify.input_signature(sliced) for d in info.shape if isinstance(d, str)}
                feeds = verify.generate_inputs(sliced, {s: (2 if "batch" in s.lower() else length) for s in symbols},
                                               seed=2)
                try:
                    confirm = verify.run(sliced, feeds)
                except Exception:  # noqa: BLE001 - e.g. longer than a precomputed mask table
                    confirm = None
            for value in repeating:
                i = values.index(value)
                again = None
                if confirm is not None:
                    pads = {k: v for k, v in feeds.items() if v.ndim == 2 and "mask" in k.lower()}
                    again = classify_block_sparse(results[i] + [confirm[value.name]], paddings + [pads])
                if again != kinds[id(value)]:
                    kinds[id(value)] = fallback.pop(id(value))
        if unprobed:  # structure not confirmed at every size the model may run: keep the bias in the op
            for key, kind in kinds.items():
                if kind["kind"] == "block_sparse":
                    kinds[key] = kind = fallback[key]
                if kind["kind"] in ("causal", "window", "padding", "blocks"):
                    kind["kind"] = "bias" if kind["kind"] in ("padding", "blocks") else kind["kind"] + "_bias"
                    kind.pop("key_padding", None)
                    kind.pop("block_size", None)
        counts: dict[str, int] = {}
        modified = False
        for node in nodes:
            kind = kinds[id(node.inputs[3])]
            label = kind["kind"] + (f"+padding({kind['key_padding']})" if "key_padding" in kind else "")
            counts[label] = counts.get(label, 0) + 1
            if kind["kind"] == "bias":
                continue
            node.attributes["mask_kind"] = ir.AttrString("mask_kind", kind["kind"])
            for key in ("window_left", "window_right", "block_size", "block_causal", "block_sequence", "global_blocks"):
                if key in kind:
                    node.attributes[key] = ir.AttrInt64(key, kind[key])
            for key in ("block_layout", "block_offsets"):
                if key in kind:
                    node.attributes[key] = ir.AttrInt64s(key, kind[key])
            if "key_padding" in kind:
                node.attributes["key_padding"] = ir.AttrString("key_padding", kind["key_padding"])
            modified = True
        self.report = {kind: {"matches": n} for kind, n in sorted(counts.items())}
        return ir.passes.PassResult(model, modified)
