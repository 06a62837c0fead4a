"""Lowering the neutral attention operators to the operator a target runs best."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph.builder import Builder
from tfgraph.ops import MaskKind
from tfgraph import ops
from tfgraph.errors import BadInputError
from tfgraph.passes import blocked_attention as blocked
from tfgraph.passes.attention_lowering_windows import (  # noqa: F401 - part of this module's API
    GQA_HEAD_SIZE_MULTIPLE,
    WINDOW_LOWERINGS,
    _heads_and_size,
    _lower_block_sparse,
    _lower_window,
    _prompt_lengths,
    _same_dim,
    _window_applies,
    default_block,
    is_self_attention,
)
from tfgraph.passes.registry import register_pass

LOWERINGS = ("com.microsoft.Attention", "com.microsoft.MultiHeadAttention", "function")


def _builder(node: ir.Node, new: list[ir.Node]) -> Builder:
    return Builder(f"{node.name or node.outputs[0].name}/lower", new)


def _may_be_minus_inf(value: ir.Value, limit: int = 256) -> bool:
    """Whether a constant holding -inf feeds ``value`` (TorchScript's SDPA mask, ``Where(mask, 0, -inf)``)."""
    seen: set[int] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        tensors = [v.const_value] if v.const_value is not None else []
        node = v.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensors.append(node.attributes["value"].value)
        for t in tensors:
            array = t.numpy()
            if np.issubdtype(array.dtype, np.floating) and np.isneginf(array).any():
                return True
        if node is not None:
            stack.extend(i for i in node.inputs if i is not None)
    return False


def _finite(b: Builder, bias: ir.Value) -> ir.Value:
    """``Max(bias, float32.min)``: a query row whose keys are all masked (a left-padded position) gets
    finite garbage instead of NaN from the fused kernels, which have no NaN guard; a NaN there would
    reach the next layer's keys and values and poison every row (the exporter's graph guards it)."""
    if not _may_be_minus_inf(bias):
        return bias
    floor = b("Max", bias, b.const(np.array(np.finfo(np.float32).min, np.float32)))
    floor.shape, floor.type = bias.shape, bias.type
    return floor


def _mha_bias(b: Builder, node: ir.Node, q: ir.Value, q_axis: int, k: ir.Value, k_axis: int) -> ir.Value | None:
    """The additive mask as MultiHeadAttention's ``attention_bias``: (B|1, N|1, S, T), broadcast explicitly when needed."""
    if MaskKind.of(node) is MaskKind.NONE or len(node.inputs) < 4 or node.inputs[3] is None:
        return None
    bias = _finite(b, node.inputs[3])
    if (
        bias.shape is not None
        and len(bias.shape) == 4
        and q.shape is not None
        and k.shape is not None
        and _same_dim(bias.shape[2], q.shape[q_axis])
        and _same_dim(bias.shape[3], k.shape[k_axis])
    ):
        return bias
    lengths = b("Concat", b.i64(1, 1), b("Shape", q, start=q_axis, end=q_axis + 1),
                b("Shape", k, start=k_axis, end=k_axis + 1), axis=0)
    return b("Expand", bias, lengths)


def _mha(b: Builder, node: ir.Node, q: ir.Value, k: ir.Value, v: ir.Value, heads: int, bias: ir.Value | None) -> ir.Value:
    inputs = [q, k, v, None, None, bias] if bias is not None else [q, k, v]
    return b("MultiHeadAttention", *inputs, domain="com.microsoft", num_heads=heads,
             scale=node.attributes.get_float("scale"))


def _lower_bsd(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    q, k, v = node.inputs[:3]
    b = _builder(node, [])
    out = _mha(b, node, q, k, v, node.attributes.get_int("num_heads"), _mha_bias(b, node, q, 1, k, 1))
    return b.nodes, out


def _lower_bhsd(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """Query to (B, S, N·H); key/value stay (B, N, L, H), which MultiHeadAttention reads as is."""
    q, k, v = node.inputs[:3]
    heads = q.shape[1]
    b = _builder(node, [])
    bias = _mha_bias(b, node, q, 2, k, 2)
    q_bsd = b("Reshape", b("Transpose", q, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))
    out = _mha(b, node, q_bsd, k, v, heads, bias)
    return b.nodes, b("Transpose", b("Reshape", out, b.i64(0, 0, heads, -1)), perm=[0, 2, 1, 3])


_TO_MHA = {"Attention": _lower_bsd, "AttentionBHSD": _lower_bhsd}


def _kernel_fits(node: ir.Node) -> bool:
    """Whether a fused kernel can take the block: head-split blocks need one static head count on
    Q, K and V (a (batch·heads, S, H) block unsqueezed by attention-softmax has a dynamic one).
    Others keep the neutral op, whose body computes exactly what the exporter's graph did."""
    if node.op_type != "AttentionBHSD":
        return True
    shapes = [v.shape for v in node.inputs[:3]]
    if any(s is None or len(s) != 4 for s in shapes):
        return False
    heads = {s[1] for s in shapes}
    return len(heads) == 1 and isinstance(shapes[0][1], int) and isinstance(shapes[0][3], int)


def _projection(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """``x·W + b`` (or ``x·W``) with constant 2-D ``W``: returns (x, W, b), b None when absent."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add" and node.domain == "":
        for i in (0, 1):
            other = node.inputs[1 - i]
            if other is not None and other.const_value is not None and len(other.const_value.shape) == 1:
                bias, node = other.const_value.numpy(), node.inputs[i].producer()
                break
        else:
            return None
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return node.inputs[0], weight.const_value.numpy(), bias


def _packed_projection(q: ir.Value, k: ir.Value, v: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """Q, K, V as the three outputs of ``Split(x·W + b)`` (see pack-projections), or three projections of one x."""
    split = q.producer()
    if (
        split is not None
        and split.op_type == "Split"
        and len(split.outputs) == 3
        and list(split.outputs) == [q, k, v]
    ):
        packed = _projection(split.inputs[0])
        if packed is not None and packed[1].shape[1] == sum(
            int(o.shape[-1]) for o in split.outputs if o.shape is not None and isinstance(o.shape[-1], int)
        ):
            return packed
    parts = [_projection(t) for t in (q, k, v)]
    if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
        return None
    weight = np.concatenate([p[1] for p in parts], axis=1)
    if all(p[2] is None for p in parts):
        return parts[0][0], weight, None
    biases = [p[2] if p[2] is not None else np.zeros(p[1].shape[1], dtype=p[1].dtype) for p in parts]
    return parts[0][0], weight, np.concatenate(biases)


def _lower_packed(graph: ir.Graph, node: ir.Node, scale_in_weights: bool = False) -> tuple[list[ir.Node], ir.Value] | None:
    """com.microsoft.Attention: the Q/K/V projections inside the op (one GEMM on packed weights).
    ``scale_in_weights``: a scale other than 1/sqrt(head size) is folded into the Q columns of the packed
    weight and bias, and the op keeps its default scale (for runtimes that ignore the attribute)."""
    q, k, v = node.inputs[:3]
    packed = _packed_projection(q, k, v)
    if packed is None:
        return None
    x, weight, bias = packed
    scale = node.attributes.get_float("scale")
    width = int(q.shape[-1])
    default = (width // node.attributes.get_int("num_heads")) ** -0.5
    if scale_in_weights and abs(scale - default) > 1e-7 * default:
        factor = np.float32(scale / default)
        weight = weight.copy()
        weight[:, :width] *= factor
        if bias is not None:
            bias = bias.copy()
            bias[:width] *= factor
        scale = default
    b = _builder(node, [])
    stem = node.outputs[0].name
    w_value = ir.Value(name=f"{stem}.qkv_weight", const_value=ir.tensor(weight))
    graph.register_initializer(w_value)
    b_value = None
    if bias is not None:
        b_value = ir.Value(name=f"{stem}.qkv_bias", const_value=ir.tensor(bias))
        graph.register_initializer(b_value)
    # Lengths read off x (self-attention: queries and keys both come from it), so nothing
    # keeps the old projections alive and their weights are dropped with them.
    attention_bias = _mha_bias(b, node, x, 1, x, 1)
    inputs = [x, w_value, b_value] + ([None, None, attention_bias] if attention_bias is not None else [])
    widths = [int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])]
    attributes = {"num_heads": node.attributes.get_int("num_heads"), "scale": scale}
    if len(set(widths)) != 1:
        attributes["qkv_hidden_sizes"] = widths
    return b.nodes, b("Attention", *inputs, domain="com.microsoft", **attributes)


CAUSAL_KINDS = (MaskKind.CAUSAL, MaskKind.CAUSAL_BIAS, MaskKind.WINDOW, MaskKind.WINDOW_BIAS)
CAUSAL_LOWERINGS = ("com.microsoft.GroupQueryAttention",)


def _gqa_applies(node: ir.Node) -> bool:
    """A causal (or left-windowed) block without cached keys: queries and keys have the same length."""
    kind = node.attributes.get_string("mask_kind", "bias")
    causal_blocks = kind == "block_sparse" and node.attributes.get_int("block_causal", 0) == 1  # as causal_bias
    if (kind not in CAUSAL_KINDS and not causal_blocks) or node.attributes.get_int("window_right", 0) != 0:
        return False
    dims = _heads_and_size(node)
    # The kernel needs head sizes that are multiples of 8.
    return is_self_attention(node) and dims is not None and dims[1] % GQA_HEAD_SIZE_MULTIPLE == 0


def _lower_gqa(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """com.microsoft.GroupQueryAttention as a prompt without past: ``seqlens_k = S - 1`` per batch row,
    ``total_sequence_length = S``; the kernel applies the causal mask (and the window,
    ``local_window_size = left + 1``: it counts the current key), the exporter's mask rides
    along as ``attention_bias`` unless it is exactly the causal/window structure."""
    q, k, v = node.inputs[:3]
    b = _builder(node, [])
    bhsd = node.op_type == "AttentionBHSD"
    if bhsd:
        heads, head_size = q.shape[1], q.shape[3]
        q_in, k_in, v_in = (b("Reshape", b("Transpose", x, perm=[0, 2, 1, 3]), b.i64(0, 0, -1)) for x in (q, k, v))
        kv_heads = k.shape[1]
    else:
        heads = node.attributes.get_int("num_heads")
        q_in, k_in, v_in = q, k, v
        kv_heads = heads
    seqlens, total = _prompt_lengths(b, q_in)
    kind = node.attributes.get_string("mask_kind")
    padded = kind.endswith("_bias") or kind == "block_sparse" or node.attributes.get_string("key_padding") is not None
    bias = _mha_bias(b, node, q_in, 1, k_in, 1) if padded else None
    attributes = {
        "num_heads": heads,
        "kv_num_heads": kv_heads,
        "scale": node.attributes.get_float("scale"),
    }
    if kind.startswith("window"):
        attributes["local_window_size"] = node.attributes.get_int("window_left") + 1
    if _softcap(node):
        attributes["softcap"] = _softcap(node)  # the kernel caps the scaled scores before the mask
    inputs = [q_in, k_in, v_in, None, None, seqlens, total]
    if bias is not None:
        inputs += [None, None, None, bias]
    out = b("GroupQueryAttention", *inputs, domain="com.microsoft", num_outputs=3, **attributes)[0]
    if not bhsd:
        return b.nodes, out
    return b.nodes, b("Transpose", b("Reshape", out, b.i64(0, 0, heads, head_size)), perm=[0, 2, 1, 3])


def _gqa_reason(node: ir.Node) -> str | None:
    """Why GroupQueryAttention cannot take the block (None: it can)."""
    if _gqa_applies(node):
        return None
    kind = node.attributes.get_string("mask_kind", "bias")
    if node.attributes.get_int("window_right", 0) != 0:
        return "the window reaches right of the query (GroupQueryAttention is causal)"
    if kind not in {k.value for k in CAUSAL_KINDS} and kind != "block_sparse":
        return f"mask kind '{kind}' is not causal"
    if not is_self_attention(node):
        return "queries and keys differ in length (cross-attention or cached keys)"
    return f"head size not static or not a multiple of {GQA_HEAD_SIZE_MULTIPLE}"


def _softcap(node: ir.Node) -> float:
    """The block's tanh soft-capping (``softcap`` attribute; 0: none)."""
    return node.attributes.get_float("softcap", 0.0)


SOFTCAP_REFUSED = "tanh soft-capping (softcap={:g}): the kernel has no softcap"


def _value_size_reason(node: ir.Node) -> str | None:
    """Why a kernel that reads K and V as one (B, N, L, H) shape cannot take a head-split block whose
    value heads are wider or narrower than its key heads (LeViT: key_dim 16, values 2× that)."""
    if node.op_type != "AttentionBHSD":
        return None
    k, v = node.inputs[1].shape, node.inputs[2].shape
    if k is None or v is None or len(k) != 4 or len(v) != 4:
        return None
    if isinstance(k[3], int) and isinstance(v[3], int) and k[3] != v[3]:
        return f"value head size {v[3]} differs from the key's {k[3]} (the kernel takes one K/V head shape)"
    return None


class LoweringRule:
    """One way to lower a neutral attention node: ``check`` returns why it does not apply (None:
    it does), ``rewrite`` returns the new nodes, their output and the report key. A target composes
    rules in order (``lower-attention``'s ``rules``); the first that applies lowers the block, and a
    block no rule takes keeps the neutral op (its standard-ONNX body)."""

    name = ""

    def check(self, node: ir.Node) -> str | None:
        raise NotImplementedError

    def rewrite(self, graph: ir.Graph, node: ir.Node) -> tuple[list[ir.Node], ir.Value, str]:
        raise NotImplementedError


class WindowRule(LoweringRule):
    """Banded, block-diagonal and block-sparse blocks: the blocked form (``mode="blocked"``), or
    ``"auto"``: blocked from ``min_sequence`` tokens and a fused kernel below (an ``If`` when the
    length is dynamic), or ``"fused"``: causal windows always to GroupQueryAttention's
    ``local_window_size``. ``kernel``: how the tiles run; ``block``: the query block."""

    name = "window"

    def __init__(self, *, mode: str = "auto", min_sequence: int = 1024, block: int | None = None,
                 kernel: str = "standard"):
        if mode not in WINDOW_LOWERINGS:
            raise BadInputError(f"unknown window lowering '{mode}'; choose one of {', '.join(WINDOW_LOWERINGS)}")
        if kernel not in blocked.KERNELS:
            raise BadInputError(f"unknown window kernel '{kernel}'; choose one of {', '.join(blocked.KERNELS)}")
        if block is not None and (not isinstance(block, int) or block < 1):
            raise BadInputError(f"block must be a positive integer, got {block!r}")
        self.mode, self.min_sequence, self.block, self.kernel = mode, min_sequence, block, kernel

    def check(self, node):
        if _softcap(node):
            return SOFTCAP_REFUSED.format(_softcap(node))
        if _window_applies(node):
            return None
        kind = node.attributes.get_string("mask_kind", "bias")
        return (f"mask kind '{kind}' is not banded" if kind not in ("window", "blocks", "block_sparse")
                else "heads, head size or length not static, or not self-attention")

    def rewrite(self, graph, node):
        nodes, output, form = _lower_window(graph, node, self.mode, self.min_sequence, self.block, self.kernel)
        return nodes, output, f"window:{form}"


class GroupQueryRule(LoweringRule):
    """Causal and left-windowed self-attention to com.microsoft.GroupQueryAttention (its kernel skips
    the masked triangle; grouped KV heads kept)."""

    name = "com.microsoft.GroupQueryAttention"

    def check(self, node):
        if _value_size_reason(node):
            return _value_size_reason(node)
        return _gqa_reason(node)

    def rewrite(self, graph, node):
        return (*_lower_gqa(node), self.name)


class PackedRule(LoweringRule):
    """com.microsoft.Attention with the Q/K/V projections inside (one GEMM on packed weights)."""

    name = "com.microsoft.Attention"

    def __init__(self, *, scale_in_weights: bool = False):
        self.scale_in_weights = scale_in_weights  # plain OpenVINO's frontend ignores Attention's scale

    def check(self, node):
        if _softcap(node):
            return SOFTCAP_REFUSED.format(_softcap(node))
        if node.op_type != "Attention":
            return "head-split block (Attention takes (batch, sequence, hidden) inputs)"
        if _packed_projection(*node.inputs[:3]) is None:
            return "Q, K and V are not projections of one tensor with constant weights"
        return None

    def rewrite(self, graph, node):
        return (*_lower_packed(graph, node, self.scale_in_weights), self.name)


class MultiHeadRule(LoweringRule):
    """com.microsoft.MultiHeadAttention, the mask as its ``attention_bias``: takes any block but a
    soft-capped one (the kernel has no softcap; the neutral op's body then computes it exactly)."""

    name = "com.microsoft.MultiHeadAttention"

    def check(self, node):
        if _softcap(node):
            return SOFTCAP_REFUSED.format(_softcap(node))
        return _value_size_reason(node)

    def rewrite(self, graph, node):
        return (*_TO_MHA[node.op_type](node), self.name)


RULES: dict[str, type[LoweringRule]] = {"window": WindowRule, "group-query": GroupQueryRule, "packed": PackedRule,
                                        "multi-head": MultiHeadRule}


def make_rules(specs) -> list[LoweringRule]:
    """Rules from their specs: a name (``"packed"``) or ``{"rule": name, **options}``."""
    rules = []
    for spec in specs:
        name, options = (spec, {}) if isinstance(spec, str) else (spec.get("rule"), {k: v for k, v in spec.items() if k != "rule"})
        if name not in RULES:
            raise BadInputError(f"unknown attention lowering rule {name!r}; choose from {', '.join(RULES)}")
        try:
            rules.append(RULES[name](**options))
        except TypeError as e:
            raise BadInputError(f"attention lowering rule '{name}': {e}") from None
    return rules


def shorthand_rules(to: str = "com.microsoft.MultiHeadAttention", causal_to: str | None = None,
                    window_to: str | None = None, blocked_min_sequence: int = 1024, block: int | None = None,
                    window_kernel: str = "standard") -> list:
    """The rule list the ``to``/``causal_to``/``window_to`` shorthand stands for, in that order: the
    window rule, GroupQueryAttention, then the ``to`` operator (packed Attention falling back to
    MultiHeadAttention; ``"function"``: none, the neutral op stays)."""
    if to not in LOWERINGS:
        raise BadInputError(f"unknown attention lowering '{to}'; choose one of {', '.join(LOWERINGS)}")
    if causal_to is not None and causal_to not in CAUSAL_LOWERINGS:
        raise BadInputError(f"unknown causal attention lowering '{causal_to}'; choose one of {', '.join(CAUSAL_LOWERINGS)}")
    rules: list = []
    if window_to is not None:
        rules.append({"rule": "window", "mode": window_to, "min_sequence": blocked_min_sequence, "block": block,
                      "kernel": window_kernel})
    if causal_to is not None:
        rules.append("group-query")
    rules += {"com.microsoft.Attention": ["packed", "multi-head"], "com.microsoft.MultiHeadAttention": ["multi-head"],
              "function": []}[to]
    return rules


@register_pass("lower-attention")
class LowerAttentionPass(ir.passes.InPlacePass):
    """Replace the neutral ``tfgraph.Attention`` / ``tfgraph.AttentionBHSD`` with the target's operators,
    by ordered rules (``rules``; see :data:`RULES`): the first rule whose check passes lowers the
    block; the others' reasons are reported as near misses; a block no rule takes keeps the neutral
    op (it runs as its standard-ONNX body, e.g. for ``inline-neutral-ops``). A block whose
    head-split shapes no fused kernel takes (dynamic head count) is always kept.

    Rules: ``"window"`` (options ``mode`` blocked|auto|fused, ``min_sequence``, ``block``,
    ``kernel`` standard|com.microsoft.MultiHeadAttention), ``"group-query"``, ``"packed"``,
    ``"multi-head"``. Shorthand instead of ``rules`` (:func:`shorthand_rules`): ``to``
    (com.microsoft.Attention | com.microsoft.MultiHeadAttention | function), ``causal_to``
    (com.microsoft.GroupQueryAttention), ``window_to`` with ``blocked_min_sequence``, ``block``,
    ``window_kernel``.
    """

    def __init__(
        self,
        *,
        rules: list | None = None,
        to: str = "com.microsoft.MultiHeadAttention",
        causal_to: str | None = None,
        window_to: str | None = None,
        blocked_min_sequence: int = 1024,
        block: int | None = None,
        window_kernel: str = "standard",
    ):
        super().__init__()
        shorthand = shorthand_rules(to, causal_to, window_to, blocked_min_sequence, block, window_kernel)
        if rules is not None and (to, causal_to, window_to) != ("com.microsoft.MultiHeadAttention", None, None):
            raise BadInputError("lower-attention takes either rules or the to/causal_to/window_to shorthand, not both")
        self.rules = make_rules(shorthand if rules is None else rules)
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts: dict[str, int] = {}
        misses: dict[str, str] = {}
        for graph in model.graphs():
            for node in list(graph):
                if node.domain != ops.DOMAIN or node.op_type not in _TO_MHA:
                    continue
                if not _kernel_fits(node):
                    counts["function"] = counts.get("function", 0) + 1  # the neutral op's exact body
                    continue
                for rule in self.rules:
                    reason = rule.check(node)
                    if reason is None:
                        break
                    misses.setdefault(rule.name, f"{node.name or node.outputs[0].name}: {reason}")
                else:
                    continue  # no rule takes it: the neutral op stays
                new_nodes, output, key = rule.rewrite(graph, node)
                old = node.outputs[0]
                output.name, output.shape, output.type = old.name, old.shape, old.type
                ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old], [output])
                counts[key] = counts.get(key, 0) + 1
        if any(n.domain == "com.microsoft" for n in ir.traversal.RecursiveGraphIterator(model.graph)):
            model.opset_imports.setdefault("com.microsoft", 1)
        self.report = {key: {"matches": n} for key, n in counts.items()}
        for name, reason in misses.items():  # why a rule took no block at all (as the fusion rules report)
            if name not in counts and not any(key.startswith(name + ":") for key in counts):
                self.report[name] = {"matches": 0, "near_miss": reason}
        lowered = sum(n for key, n in counts.items() if key != "function")
        return ir.passes.PassResult(model, lowered > 0)
