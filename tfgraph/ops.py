"""tfgraph's neutral operators (domain ``tfgraph``), each defined by an ONNX function.

Fusion passes rewrite subgraphs to these operators; a target's lowering pass then
replaces them with the operator its execution provider runs best. Because every
neutral operator carries its reference decomposition as a model-local ONNX function,
a model holding them still runs on onnxruntime (which inlines functions): the
numeric-diff instrument verifies fusion and lowering separately, and a target that
lowers nothing gets a correct standard-ONNX graph.

``tfgraph.Attention(query, key, value, attention_bias)``
    Multi-head scaled dot-product attention in ``(batch, sequence, heads·head_size)``
    layout: ``softmax(Q·Kᵀ·scale + attention_bias)·V`` per head, heads merged back.
    ``attention_bias`` is additive and broadcasts to ``(batch, heads, q_len, kv_len)``
    (a scalar 0 when the attention has no mask). Attributes: ``num_heads`` (int),
    ``scale`` (float), ``mask_kind`` (``"none"``, ``"bias"``, or what
    ``classify-attention-masks`` found: ``"padding"``, ``"causal"``, ``"causal_bias"``, ``"window"``,
    ``"window_bias"``, the last two with ``window_left``/``window_right``, ``"blocks"`` and
    ``"block_sparse"`` with ``block_size`` and the layout (see ``classify-attention-masks``); informs
    lowering only: the bias always holds the whole mask). A query row whose keys are all
    masked with ``-inf`` gives 0 (the NaN guard transformers' SDPA exports carry), not NaN.

``tfgraph.AttentionBHSD(query, key, value, attention_bias)``
    The same computation on tensors already split into heads,
    ``(batch, heads, sequence, head_size)``, output in that layout too: the form
    attention takes when something happens between the head split and the product
    (rotary embeddings on Q and K, grouped K/V heads repeated to the query's count).
    Attributes: ``scale``, ``mask_kind`` (and window sizes), as above, and ``softcap`` (float,
    default 0 = none): ``c > 0`` caps the scaled scores before the bias,
    ``c·tanh(Q·Kᵀ·scale / c) + attention_bias`` (Gemma-2's soft-capping). The body that honours it
    is installed only in a model that has a soft-capped block (:func:`ensure_defined` with
    ``softcap=True``; its ``Where`` keeps ``softcap = 0`` nodes exact), so other models' bodies carry
    no Tanh.

``tfgraph.RMSNormalization(x, scale)``
    ``x / sqrt(mean(x², last axis) + epsilon) · scale`` (Llama-style RMSNorm; ai.onnx has
    it only from opset 23, and onnxruntime's ``SimplifiedLayerNormalization`` sits in the
    ai.onnx domain, where the ONNX checker rejects it). Attribute: ``epsilon`` (float).
    The body needs opset 18 (ReduceMean with axes as an input).
"""

from __future__ import annotations

import enum
import functools
import logging

import onnx.parser
import onnx_ir as ir

DOMAIN = "tfgraph"
OPSET_VERSION = 1


# Attention computed in standard ops on purpose (a blocked/windowed lowering, or a neutral op inlined
# for a runtime without fused kernels) is marked on its Softmax node's metadata, which survives renames
# and serialization: analysis counts such a block as fused by this mark, never by node names.
ATTENTION_FORM_KEY = "tfgraph.attention_form"
BLOCKED_FORM = "blocked"
STANDARD_FORM = "standard"


def mark_attention_form(node: ir.Node, form: str) -> None:
    """Record that ``node`` (the Softmax of an attention block in standard ops) belongs to a fused form."""
    node.metadata_props[ATTENTION_FORM_KEY] = form


def attention_form(node: ir.Node) -> str | None:
    return node.metadata_props.get(ATTENTION_FORM_KEY)


class MaskKind(str, enum.Enum):
    """What the additive mask of a neutral attention op means: its ``mask_kind`` attribute, set by
    ``classify-attention-masks`` (see :mod:`tfgraph.passes.attention_masks` for each kind's exact
    definition) and read by the lowerings. A ``str`` enum: it compares equal to the attribute text."""

    NONE = "none"  # no mask at all
    BIAS = "bias"  # a general additive bias (the default before classification)
    PADDING = "padding"  # key padding only
    CAUSAL = "causal"  # exactly the causal mask, whatever the inputs
    CAUSAL_BIAS = "causal_bias"  # causal plus more (padding)
    WINDOW = "window"  # exactly a band (window_left / window_right attributes)
    WINDOW_BIAS = "window_bias"  # a band plus more (padding)
    BLOCKS = "blocks"  # block-diagonal local windows (block_size)
    BLOCK_SPARSE = "block_sparse"  # a block-sparse layout (block_size, block_layout or block_offsets)

    @classmethod
    def of(cls, node: ir.Node) -> MaskKind:
        """The kind a neutral attention node carries (``bias`` when unset); unknown text raises ValueError."""
        return cls(node.attributes.get_string("mask_kind", cls.BIAS.value))

    @property
    def causal(self) -> bool:
        """Every future key is masked (a causal kernel is exact, possibly with the bias)."""
        return self in (MaskKind.CAUSAL, MaskKind.CAUSAL_BIAS)

    @property
    def windowed(self) -> bool:
        return self in (MaskKind.WINDOW, MaskKind.WINDOW_BIAS)

    @property
    def exact(self) -> bool:
        """The mask is fully described by the kind (and its attributes): a kernel may drop it."""
        return self in (MaskKind.NONE, MaskKind.PADDING, MaskKind.CAUSAL, MaskKind.WINDOW)

_ATTENTION = """
<domain: "tfgraph", opset_import: ["" : 18]>
Attention <num_heads, scale, mask_kind> (query, key, value, attention_bias) => (output) {
    heads = Constant <value_int: int = @num_heads> ()
    keep2 = Constant <value_ints: ints = [0, 0]> ()
    minus1 = Constant <value_ints: ints = [-1]> ()
    axis0 = Constant <value_ints: ints = [0]> ()
    heads1 = Unsqueeze (heads, axis0)
    split_shape = Concat <axis: int = 0> (keep2, heads1, minus1)
    merge_shape = Concat <axis: int = 0> (keep2, minus1)
    alpha = Constant <value_float: float = @scale> ()
    q4 = Reshape (query, split_shape)
    q = Transpose <perm: ints = [0, 2, 1, 3]> (q4)
    k4 = Reshape (key, split_shape)
    kt = Transpose <perm: ints = [0, 2, 3, 1]> (k4)
    v4 = Reshape (value, split_shape)
    v = Transpose <perm: ints = [0, 2, 1, 3]> (v4)
    raw = MatMul (q, kt)
    scaled = Mul (raw, alpha)
    scores = Add (scaled, attention_bias)
    raw_probs = Softmax <axis: int = -1> (scores)
    nan = IsNaN (raw_probs)
    zero = Constant <value_float: float = 0.0> ()
    zero_t = CastLike (zero, raw_probs)
    probs = Where (nan, zero_t, raw_probs)
    ctx = MatMul (probs, v)
    ctx_t = Transpose <perm: ints = [0, 2, 1, 3]> (ctx)
    output = Reshape (ctx_t, merge_shape)
}
"""

_ATTENTION_BHSD = """
<domain: "tfgraph", opset_import: ["" : 18]>
AttentionBHSD <scale, mask_kind> (query, key, value, attention_bias) => (output) {
    alpha = Constant <value_float: float = @scale> ()
    kt = Transpose <perm: ints = [0, 1, 3, 2]> (key)
    raw = MatMul (query, kt)
    scaled = Mul (raw, alpha)
    scores = Add (scaled, attention_bias)
    raw_probs = Softmax <axis: int = -1> (scores)
    nan = IsNaN (raw_probs)
    zero = Constant <value_float: float = 0.0> ()
    zero_t = CastLike (zero, raw_probs)
    probs = Where (nan, zero_t, raw_probs)
    output = MatMul (probs, value)
}
"""

# RMS normalization over the last axis, written as onnxruntime's own load-time fusion
# expects it (Pow, ReduceMean, Add, Sqrt, Div, Mul), so an inlined body is fused again.
_RMS_NORMALIZATION = """
<domain: "tfgraph", opset_import: ["" : 18]>
RMSNormalization <epsilon> (x, scale) => (y) {
    two = Constant <value_float: float = 2.0> ()
    two_t = CastLike (two, x)
    eps = Constant <value_float: float = @epsilon> ()
    eps_t = CastLike (eps, x)
    last = Constant <value_ints: ints = [-1]> ()
    squared = Pow (x, two_t)
    mean = ReduceMean <keepdims: int = 1> (squared, last)
    shifted = Add (mean, eps_t)
    rms = Sqrt (shifted)
    normed = Div (x, rms)
    y = Mul (normed, scale)
}
"""

# The soft-capping body (AttentionBHSD with softcap): the attribute declared with its default 0,
# the capped scores selected only where softcap != 0 (tanh(x/0) is never used).
_SOFTCAP_ATTRIBUTES = ("AttentionBHSD <scale, mask_kind>", "AttentionBHSD <scale, mask_kind, softcap: float = 0.0>")
_SOFTCAP_SCORES = ("    scores = Add (scaled, attention_bias)\n", """    cap = Constant <value_float: float = @softcap> ()
    cap_t = CastLike (cap, scaled)
    no_cap = Constant <value_float: float = 0.0> ()
    no_cap_t = CastLike (no_cap, scaled)
    uncapped = Equal (cap_t, no_cap_t)
    ratio = Div (scaled, cap_t)
    squashed = Tanh (ratio)
    capped = Mul (squashed, cap_t)
    softcapped = Where (uncapped, scaled, capped)
    scores = Add (softcapped, attention_bias)
""")
SOFTCAP_OPS = ("AttentionBHSD",)

_DEFINITIONS = {"Attention": _ATTENTION, "AttentionBHSD": _ATTENTION_BHSD, "RMSNormalization": _RMS_NORMALIZATION}


_GUARD = """    nan = IsNaN (raw_probs)
    zero = Constant <value_float: float = 0.0> ()
    zero_t = CastLike (zero, raw_probs)
    probs = Where (nan, zero_t, raw_probs)
"""
GUARD_MIN_OPSET = 15  # CastLike


@functools.cache
def _function_proto(name: str, guard: bool, softcap: bool = False) -> onnx.FunctionProto:
    text = _DEFINITIONS[name]
    if softcap:
        for old, new in (_SOFTCAP_ATTRIBUTES, _SOFTCAP_SCORES):
            text = text.replace(old, new)
    if not guard:
        text = text.replace(_GUARD, "    probs = Identity (raw_probs)\n")
    return onnx.parser.parse_function(text)


def function(name: str, *, opset: int = 18, softcap: bool = False) -> ir.Function:
    """A fresh onnx_ir function for the neutral operator ``name``, importing ai.onnx ``opset``
    (``softcap``: the body that honours the ``softcap`` attribute; needs opset 15).

    Below opset 15 (no CastLike) the body has no NaN guard: a query row whose keys are
    all ``-inf`` then gives NaN, as an unguarded exporter graph does."""
    if softcap and (name not in SOFTCAP_OPS or opset < GUARD_MIN_OPSET):
        raise ValueError(f"no soft-capping body for tfgraph.{name} at opset {opset}")
    fn = ir.serde.deserialize_function(_function_proto(name, opset >= GUARD_MIN_OPSET, softcap))
    fn.opset_imports[""] = opset
    return fn


def has_softcap_body(model: ir.Model, name: str) -> bool:
    fn = model.functions.get((DOMAIN, name, ""))
    return fn is not None and "softcap" in fn.attributes


def ensure_defined(model: ir.Model, name: str, *, softcap: bool = False) -> bool:
    """Add the function for ``tfgraph.<name>`` and the ``tfgraph`` opset import if missing
    (``softcap``: the soft-capping body, replacing a plain one)."""
    changed = False
    if (DOMAIN, name, "") not in model.functions or (softcap and not has_softcap_body(model, name)):
        # The body uses ops unchanged since opset 13 (15 with the guard); it imports the
        # model's own version (required to match).
        fn = function(name, opset=model.opset_imports.get("", 18), softcap=softcap)
        model.functions[fn.identifier()] = fn
        changed = True
    if DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = OPSET_VERSION
        changed = True
    if model.ir_version < 8:
        model.ir_version = 8  # model-local functions need IR version 8
        changed = True
    return changed


# --- other domains' operators ----------------------------------------------------------------------
@functools.cache
def _contrib_schemas() -> dict[tuple[str, str], list]:
    """(domain, op) -> onnxruntime's schemas of it (every version), for domains ONNX does not know."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = C.get_all_operator_schema()
    except Exception as e:  # noqa: BLE001 - a build without schemas: nothing to read
        logging.getLogger(__name__).info("onnxruntime operator schemas unavailable (%s)", e)
        return {}
    table: dict[tuple[str, str], list] = {}
    for schema in schemas:
        if schema.domain not in ("", "ai.onnx"):
            table.setdefault((schema.domain, schema.name), []).append(schema)
    return table


def contrib_schema(domain: str, op_type: str, version: int):
    """onnxruntime's schema of ``domain.op_type`` (``com.microsoft`` and other non-ONNX domains) at opset
    ``version``, or None where onnxruntime defines none."""
    candidates = [s for s in _contrib_schemas().get((domain, op_type), []) if s.since_version <= version]
    return max(candidates, key=lambda s: s.since_version) if candidates else None
