"""compact-padding: a decoder's padded tokens moved behind its real ones, so GroupQueryAttention rotates and
masks by its own lengths (issue 18).

``lower-cached-attention`` keeps transformers' semantics for any ``attention_mask``: positions from the
mask's running count (left padding and holes alike), com.microsoft.RotaryEmbedding on Q and K at those
positions (a Split of the packed projection, two kernels per layer), and a (batch, 1, S, T) padding bias
added to every head's scores. GroupQueryAttention can do all of that itself, the way onnxruntime-genai's
builder uses it: ``do_rotary`` on the packed projection, per-row lengths ``seqlens_k`` instead of a bias.
But the kernel numbers a row's tokens by their slots, real tokens first (right padding): on a
left-padded row it would rotate and mask by the wrong positions (the builder's graphs are off by the
logits' own scale there; ``benchmarks/bench_decoder.py`` measures it).

This pass makes the slots right: every token-wise op commutes with a permutation of a row's tokens,
attention does not. So the step's ``input_ids`` are permuted per row, real tokens first in their order,
padding after (a stable sort on the step's mask columns: TopK of ``mask·2S − s``); the layers run on that
order; the last hidden state is permuted back before the LM head. A real token's slot is then its
count of real tokens before it — transformers' position — and the cache holds real tokens first
(``seqlens_k`` = the mask's sum − 1, nothing padded ever read). Each GroupQueryAttention takes the packed
projection (or Q, K, V) with ``do_rotary`` and the same cos/sin tables; the RotaryEmbeddings, the padding
bias and the position arithmetic fall dead. The permutation and its inverse sit in two Ifs on "the step has
several tokens": a decode step (one real token, nothing to permute) runs two Ifs taking their Identity
branches in place of ~20 ops for positions and bias, and no Split/RotaryEmbedding×2 per layer.

What changes: the cache layout (real tokens first in a row instead of at their mask columns) and the
values computed at padded positions (never read: the mask keeps them out) — the compiler verifies such a
pass on its own cache over the decode steps (``changes_cache_layout``). Contract kept from the mask: a
decode step's new tokens are real (mask 1), as every generation loop appends them.

Applies when every GroupQueryAttention is ``lower-cached-attention``'s rotary form with a key-padding
bias from a 2-D graph input, heads of a multiple of 16 rotated whole (the kernel's limits), the rotary
tables constant over positions (the model's context known),
no sliding window (a window counts slots, padding included), the ids are read only by Gathers and Shapes,
and the one non-cache output comes from a MatMul whose input is (batch, sequence, hidden); the report
gives the first reason otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph.builder import Builder, take_over
from tfgraph.passes.registry import register_pass

MS = "com.microsoft"
_INTEGER = (ir.DataType.INT32, ir.DataType.INT64, ir.DataType.BOOL)
_HEADS = ("MatMul", "MatMulNBits", "Gemm", "FusedMatMul")
_BIAS_CHAIN = {"Expand": 0, "Unsqueeze": 0, "Where": 0, "Cast": 0, "Not": 0}
#: onnxruntime's GroupQueryAttention rotates (``do_rotary``) heads of a multiple of 16 only ("head_size shall
#: be a multiple of 16"); without rotation it takes multiples of 8.
ROTARY_HEAD_SIZE_MULTIPLE = 16


def _graph_input_behind(value: ir.Value, graph: ir.Graph) -> ir.Value | None:
    """The graph input a padding bias is built from: followed through Expand/Unsqueeze/Where (its
    condition)/Cast/Not, as ``lower-cached-attention`` builds it; None for anything else."""
    for _ in range(8):
        if value in graph.inputs:
            return value
        node = value.producer()
        if node is None or node.domain != "" or node.op_type not in _BIAS_CHAIN:
            return None
        value = node.inputs[_BIAS_CHAIN[node.op_type]]
    return None


def _ancestor_inputs(value: ir.Value, graph: ir.Graph, limit: int = 64) -> set[ir.Value] | None:
    """The graph inputs ``value`` is computed from (None past ``limit`` nodes: not a small index computation)."""
    found, seen, stack = set(), set(), [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v in graph.inputs:
            found.add(v)
            continue
        node = v.producer()
        if node is None:
            continue  # initializer or constant
        if len(seen) > limit:
            return None
        stack.extend(node.inputs)
    return found


def _rotary(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    if node is None or node.domain != MS or node.op_type != "RotaryEmbedding":
        return None
    return node


def _table_width(value: ir.Value | None) -> int | None:
    """The width (rotary_dim / 2) of a constant (positions, rotary_dim / 2) table; None for anything else."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return int(tensor.shape[1]) if tensor is not None and len(tensor.shape) == 2 else None


class CompactPaddingRule:
    """Finds the mask, the ids, the head and the GroupQueryAttention nodes (``check``), and rewrites them."""

    name = "compact-padding"

    def check(self, graph: ir.Graph) -> str | None:
        """None when the graph takes the rewrite (``self`` then holds what ``rewrite`` needs), else why not."""
        self.attention = [n for n in graph if n.domain == MS and n.op_type == "GroupQueryAttention"]
        if not self.attention:
            return "no GroupQueryAttention (lower-cached-attention did not lower this decoder)"
        mask = None
        positions: set[ir.Value] = set()
        for node in self.attention:
            why = self._check_attention(node)
            if why:
                return f"{node.name}: {why}"
            found = _graph_input_behind(node.inputs[10], graph)
            if found is None or found.shape is None or len(found.shape) != 2 or found.dtype not in _INTEGER:
                return f"{node.name}: the padding bias is not built from a 2-D integer graph input"
            if mask is not None and found is not mask:
                return "the layers read different masks"
            mask = found
            positions.add(_rotary(node.inputs[0]).inputs[1])
        self.mask = mask
        ids = [v for v in graph.inputs if v is not mask and v.shape is not None and len(v.shape) == 2
               and v.dtype in (ir.DataType.INT64, ir.DataType.INT32)
               and any(user.op_type == "Gather" and index == 1 for user, index in v.uses())]
        if len(ids) != 1:
            return f"expected one 2-D integer input read by Gather (the token ids), found {len(ids)}"
        self.ids = ids[0]
        for user, index in self.ids.uses():
            if not (user.domain == "" and (user.op_type == "Shape" or (user.op_type == "Gather" and index == 1))):
                return f"the token ids are read by {user.op_type} (only Gather lookups and Shape are token-wise)"
        for value in positions:  # the rotary positions: arithmetic on the mask (and the ids' shape) only
            found = _ancestor_inputs(value, graph)
            if found is None or not found <= {mask, self.ids}:
                return "the rotary positions are not computed from the attention mask alone"
        presents = {o for n in self.attention for o in n.outputs[1:]}
        others = [o for o in graph.outputs if o not in presents]
        if len(others) != 1:
            return f"expected one output besides the cache (the logits), found {len(others)}"
        head = others[0].producer()
        while head is not None and head.domain == "" and head.op_type in ("Cast", "Identity"):
            head = head.inputs[0].producer()
        if head is None or head.op_type not in _HEADS or head.inputs[0].shape is None or len(head.inputs[0].shape) != 3:
            return "the logits do not come from a MatMul on (batch, sequence, hidden)"
        self.head = head
        return None

    @staticmethod
    def _check_attention(node: ir.Node) -> str | None:
        if node.attributes.get_int("do_rotary", 0):
            return "already rotates"
        if node.attributes.get_int("local_window_size", -1) not in (-1, 0):
            return "a sliding window counts slots, padding included"
        if len(node.inputs) < 11 or node.inputs[10] is None or any(
                node.inputs[i] is not None for i in (7, 8, 9) if i < len(node.inputs)):
            return "not the rotary form with a key-padding bias"
        q, k = _rotary(node.inputs[0]), _rotary(node.inputs[1])
        if q is None or k is None:
            return "Q and K are not rotated by RotaryEmbedding"
        width_q, heads = q.inputs[0].shape[-1] if q.inputs[0].shape else None, node.attributes.get_int("num_heads", 0)
        if not isinstance(width_q, int) or not heads or (width_q // heads) % ROTARY_HEAD_SIZE_MULTIPLE:
            return (f"head size {width_q // heads if isinstance(width_q, int) and heads else '?'}: the kernel rotates "
                    f"heads of a multiple of {ROTARY_HEAD_SIZE_MULTIPLE} only")
        if q.inputs[1:] != k.inputs[1:]:
            return "Q and K rotate by different positions or tables"
        width = _table_width(q.inputs[2])
        if width is None or _table_width(q.inputs[3]) != width:
            return "the rotary tables are per token, not per position (the model's context is not known)"
        if 2 * width != width_q // heads:
            return f"partial rotary ({2 * width} of {width_q // heads} head dimensions)"
        for rot in (q, k):
            if (rot.attributes.get_float("scale", 1.0) != 1.0 or rot.attributes.get_int("is_packed_batching", 0)
                    or rot.attributes.get_int("rotary_embedding_dim", 0) not in (0, 2 * width)):
                return "RotaryEmbedding attributes GroupQueryAttention has no equivalent for"
        if k.attributes.get_int("interleaved", 0) != q.attributes.get_int("interleaved", 0):
            return "Q and K rotate differently"
        return None

    def rewrite(self, graph: ir.Graph) -> int:
        """Permute the ids, rotate and mask inside each GroupQueryAttention, permute back before the head."""
        b = Builder("compact_padding", [])
        ids, mask = self.ids, self.mask
        if mask.dtype != ir.DataType.INT64:
            mask = b("Cast", mask, to=ir.DataType.INT64)
        length = b("Shape", ids, start=1, end=2)  # [S]
        # A decode step's one new token is real (the contract): nothing to permute. The permutation runs in
        # an If taken only for steps of several tokens (the prompt): a decode step pays two Ifs with an
        # Identity each instead of the ~13 small ops below (small int4 Llama, 4-bit head: 0.55 ms steps
        # 1-5% faster in two interleaved runs; the ops removed outright would save 3-7%).
        several = b("Greater", length, b.i64(1))  # [S > 1]: If takes a one-element condition

        def permute(nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
            p = Builder("compact_padding/permute", nodes)
            count = p("Squeeze", length, p.i64(0))
            step_mask = p("Slice", mask, p("Neg", length), p.i64(np.iinfo(np.int64).max), p.i64(1))  # the step's columns
            # real tokens first, each group in its order: TopK of mask·2S − s (distinct keys: a stable sort)
            key = p("Sub", p("Mul", step_mask, p("Mul", count, p.const(np.array(2, np.int64)))),
                    p("Range", p.const(np.array(0, np.int64)), count, p.const(np.array(1, np.int64))))
            _, order = p("TopK", key, length, num_outputs=2, axis=-1, largest=1, sorted=1)
            return p("GatherElements", ids, order, axis=1), order

        def keep(nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
            k = Builder("compact_padding/keep", nodes)
            return k("Identity", ids), k("Identity", ids)  # the order output is not read on this branch

        compact_ids, order = b("If", several, num_outputs=2, then_branch=_branch("compact_padding/then", permute, ids),
                               else_branch=_branch("compact_padding/else", keep, ids))
        compact_ids.type, compact_ids.shape = ids.type, ids.shape
        order.type = ids.type
        seqlens = b("Cast", b("Sub", b("ReduceSum", mask, b.i64(1), keepdims=0), b.const(np.array(1, np.int64))),
                    to=ir.DataType.INT32)
        first = next(iter(graph))
        graph.insert_before(first, b.nodes)
        for user, index in list(ids.uses()):
            if user.op_type == "Gather" and user.domain == "":
                user.replace_input_with(index, compact_ids)
        for node in self.attention:
            q, k = _rotary(node.inputs[0]), _rotary(node.inputs[1])
            query, key_in, value = q.inputs[0], k.inputs[0], node.inputs[2]
            split = query.producer()
            if (split is not None and split.op_type == "Split" and split.domain == "" and len(split.outputs) == 3
                    and list(split.outputs) == [query, key_in, value]
                    and split.attributes.get_int("axis", 0) in (-1, 2)):
                query, key_in, value = split.inputs[0], None, None  # the packed projection
            attributes = {name: attr.value for name, attr in node.attributes.items()}
            attributes.update(do_rotary=1, rotary_interleaved=q.attributes.get_int("interleaved", 0))
            g = Builder(f"{node.name or node.outputs[0].name}/compact", [])
            outs = g("GroupQueryAttention", query, key_in, value, node.inputs[3], node.inputs[4], seqlens,
                     node.inputs[6], q.inputs[2], q.inputs[3], domain=MS, num_outputs=3, **attributes)
            graph.insert_before(node, g.nodes)
            take_over(node.outputs, outs)
            graph.remove(node, safe=True)
        hidden = self.head.inputs[0]

        def restore(nodes: list[ir.Node]) -> tuple[ir.Value]:
            r = Builder("compact_padding/restore", nodes)
            _, back = r("TopK", r("Neg", order), length, num_outputs=2, axis=-1, largest=1, sorted=1)
            return (r("GatherND", hidden, r("Unsqueeze", back, r.i64(-1)), batch_dims=1),)

        def unchanged(nodes: list[ir.Node]) -> tuple[ir.Value]:
            return (Builder("compact_padding/unchanged", nodes)("Identity", hidden),)

        h = Builder("compact_padding/head", [])
        restored = h("If", several, then_branch=_branch("compact_padding/restore_then", restore, hidden),
                     else_branch=_branch("compact_padding/restore_else", unchanged, hidden))
        restored.shape, restored.type = hidden.shape, hidden.type
        graph.insert_before(self.head, h.nodes)
        self.head.replace_input_with(0, restored)
        return len(self.attention)


def _branch(name: str, build, like: ir.Value) -> ir.Graph:
    """An If branch: the nodes ``build`` records, its outputs typed (element type and rank) as ``like``."""
    nodes: list[ir.Node] = []
    outputs = build(nodes)
    for value in outputs:
        value.type = like.type
        value.shape = ir.Shape([None] * len(like.shape)) if like.shape is not None else None
    return ir.Graph([], list(outputs), nodes=nodes, name=name)


@register_pass("compact-padding")
class CompactPaddingPass(ir.passes.InPlacePass):
    """A KV-cached decoder's padded tokens behind its real ones; GroupQueryAttention rotates (``do_rotary``)
    and masks (``seqlens_k``) by itself (see the module). The report: layers rewritten, or why none."""

    changes_cache_layout = True  # verified on its own cache over the generation steps

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule = CompactPaddingRule()
        why = rule.check(model.graph)
        if why is not None:
            self.report = {"layers": 0, "skipped": why}
            return ir.passes.PassResult(model, False)
        self.report = {"layers": rule.rewrite(model.graph)}
        return ir.passes.PassResult(model, True)
