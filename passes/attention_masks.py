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
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common is used below; importing onnx_ir alone does not load it

from tfgraph.ops import MaskKind
from tfgraph import ops
from tfgraph.passes.attention_mask_blocks import (  # noqa: F401 - part of this module's API
    MASKED,
    _broadcast_bias,
    _explains,
    block_pattern,
    block_sparse_confirm_length,
    classify_block_sparse,
    classify_blocks,
)
from tfgraph.passes.context import current
from tfgraph.passes.registry import register_pass

MAX_PROBE = 4096  # longest probe sequence; a larger integer constant in a mask keeps the mask as a bias
_NEUTRAL = {"Attention": 1, "AttentionBHSD": 2}  # op → axis of the query's sequence dim



def _symbols(model: ir.Model) -> set[str]:
    """Names of the symbolic dimensions of the graph's inputs."""
    return {d.value for v in model.graph.inputs if v.shape is not None for d in v.shape
            if not isinstance(d, int) and getattr(d, "value", None)}

def _slice_model(model: ir.Model, values: list[ir.Value]) -> ir.Model:
    """A copy of ``model`` whose outputs are ``values`` (by name), with everything else removed."""
    copy = model.clone()  # weights shared, not copied
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
    symbols = _symbols(model)
    default = current().need("generate_inputs", "classify-attention-masks")(model, {}, seed=1)
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
        sizes = _with_total(model, sizes, symbols, default)
        feeds = current().need("generate_inputs", "classify-attention-masks")(model, sizes, seed=1)
        if flip:
            feeds = {k: (v[..., ::-1].copy() if "mask" in k.lower() and v.ndim >= 2 else v) for k, v in feeds.items()}
        probes.append(feeds)
    return probes, unprobed


def _with_total(model: ir.Model, sizes: dict, symbols: set[str], default: dict[str, np.ndarray]) -> dict:
    """A KV-cached decoder's mask spans past and current tokens: when the inputs have one ``past``,
    one ``total`` and one other sequence dimension, size ``total`` as ``past + sequence`` (sizes left
    open take the default probe's); otherwise the probe could not run."""
    past = [d for d in symbols if "past" in d.lower()]
    total = [d for d in symbols if "total" in d.lower()]
    rest = [d for d in symbols if d not in past + total and "batch" not in d.lower()]
    if len(past) != 1 or len(total) != 1 or len(rest) != 1:
        return sizes
    known = dict(sizes)
    for value in model.graph.inputs:
        if value.shape is not None and value.name in default:
            for dim, size in zip(value.shape, default[value.name].shape):
                if getattr(dim, "value", None) and not isinstance(dim, int):
                    known.setdefault(dim.value, int(size))
    return {**sizes, total[0]: known[past[0]] + known[rest[0]]}


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
                outputs = current().need("run", "classify-attention-masks")(sliced, feeds)
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
                symbols = _symbols(sliced)
                feeds = current().need("generate_inputs", "classify-attention-masks")(sliced, {s: (2 if "batch" in s.lower() else length) for s in symbols},
                                               seed=2)
                try:
                    confirm = current().need("run", "classify-attention-masks")(sliced, feeds)
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
            node.attributes["mask_kind"] = ir.AttrString("mask_kind", MaskKind(kind["kind"]).value)
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
