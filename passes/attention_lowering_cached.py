"""Lowering a decoder's cached self-attention to com.microsoft.GroupQueryAttention (issue 18).

A KV-cached decoder exported from transformers attends, per layer, with

    present_k = Concat(past_k, k_new, axis=-2)            # (B, N_kv, P + S, H), a graph output
    k = Reshape(Expand(Unsqueeze(present_k, 2), ...))     # repeat_kv: (B, N, P + S, H)
    AttentionBHSD(q, k, v, bias)                          # causal, bias = causal + key padding

(and the same for V). Lowered to MultiHeadAttention, every step then copies the whole cache twice
more (the head repeat) and runs ~25 small nodes around the kernel. GroupQueryAttention takes the
new keys/values and the past cache itself, writes ``present`` and reads the grouped heads in place.

Lengths: ``seqlens_k = T - 1`` for every row and ``total_sequence_length = T``, T the physical
length past + new (left padding lives in the cache like a token), so the kernel's own
(right-padding) lengths cover the whole cache and the kernel's causal mask is exact. Padding:
when ``classify-attention-masks`` found the mask to be causal plus the zeros of a (batch, keys)
graph input (``key_padding``), T is that input's length and the ``attention_bias`` is built from
it in O(T) (0 where visible, float32's minimum where padded: a fully masked query row gets finite
garbage, not NaN); any other causal mask goes in as the exporter's own tensor and T comes from the
past cache's length.

Rotary embeddings (transformers' ``x·cos + rotate_half(x)·sin``) become com.microsoft.RotaryEmbedding
at the graph's own positions, so left-padded rows keep transformers' positions exactly: when the
angles are ``positions ⊗ inv_freq`` with a constant ``inv_freq`` and the model's context is known
(``CONTEXT_KEY`` metadata), the tables are initializers over the context (no per-step set-up);
otherwise each token's row is computed from the graph's angles. (The kernel's own ``do_rotary`` on the
packed projection rotates by slot positions, right for a row only when its padding comes after its
tokens: ``compact-padding``, run after this pass, arranges that and moves the rotation and the masking
into the kernel.)

With the lengths and the padding read from the mask, nothing but the kernels may read the past
inputs: the cache can then be one buffer per layer, bound as both past and present
(onnxruntime-genai's ``past_present_share_buffer``; see ``tfgraph.compiler.decoder``).

:class:`CachedGroupQueryRule` is the rule (``check`` returns why a block does not match); the
``lower-cached-attention`` pass applies it to every neutral attention node before
``lower-attention`` lowers the rest.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph import ops
from tfgraph.builder import Builder, take_over
from tfgraph.ops import MaskKind
from tfgraph.passes.attention_lowering import LoweringRule, _finite
from tfgraph.passes.attention_lowering_windows import GQA_HEAD_SIZE_MULTIPLE, _key_padding, _same_dim
from tfgraph.ir import CONTEXT_KEY, GENERATION_TASK, TASK_KEY
from tfgraph.passes.registry import register_pass



def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None  # initializer or Constant
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _unrepeat(k: ir.Value, heads: int) -> tuple[ir.Value, str | None]:
    """The (B, N_kv, T, H) tensor behind transformers' ``repeat_kv`` (Unsqueeze at 2, Expand,
    Reshape), or ``k`` itself when it already has the query's heads; the reason when neither."""
    node = k.producer()
    if node is not None and node.op_type == "Reshape":
        expand = node.inputs[0].producer()
        unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze":
            axes = _const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
            source = unsqueeze.inputs[0]
            if axes not in ([2], [-3]) or source.shape is None or len(source.shape) != 4:
                return k, "the key/value head repeat is not an Unsqueeze at axis 2 of a 4-D tensor"
            kv_heads = source.shape[1]
            if not isinstance(kv_heads, int) or heads % kv_heads:
                return k, f"the repeated key/value heads ({kv_heads}) do not divide the query's {heads}"
            return source, None
    if k.shape is not None and len(k.shape) == 4 and k.shape[1] == heads:
        return k, None
    return k, "keys are neither the query's heads nor a transformers repeat_kv of fewer heads"


def _cache_concat(present: ir.Value, graph: ir.Graph) -> tuple[ir.Node | None, str | None]:
    """The ``Concat(past, new, axis=-2)`` writing a graph output from a graph input, or why not."""
    node = present.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None, "the keys/values are not a Concat of a past cache and the new ones"
    axis = node.attributes.get_int("axis")
    if axis not in (2, -2):
        return None, f"the cache Concat is on axis {axis}, not the sequence axis"
    past = node.inputs[0]
    if past not in graph.inputs:
        return None, "the cache Concat's first input is not a graph input (the past cache)"
    if present not in graph.outputs:
        return None, "the cache Concat's output is not a graph output (the present cache)"
    return node, None


def _to_bsd(b: Builder, x: ir.Value) -> ir.Value:
    """(B, N, S, H) -> (B, S, N·H): the (B, S, N·H) tensor it was split from when it is
    ``Transpose(Reshape(y, (B, S, N, H)), [0, 2, 1, 3])``, else a Transpose and Reshape."""
    node = x.producer()
    if node is not None and node.op_type == "Transpose" and list(node.attributes.get_ints("perm") or []) == [0, 2, 1, 3]:
        reshape = node.inputs[0].producer()
        if reshape is not None and reshape.op_type == "Reshape":
            y = reshape.inputs[0]
            if (y.shape is not None and x.shape is not None and len(y.shape) == 3 and isinstance(y.shape[2], int)
                    and isinstance(x.shape[1], int) and isinstance(x.shape[3], int)
                    and y.shape[2] == x.shape[1] * x.shape[3]):
                return y
    return b("Reshape", b("Transpose", x, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _scalar(value: ir.Value) -> float | None:
    tensor = ir.convenience.get_const_tensor(value)
    array = None if tensor is None else np.asarray(tensor.numpy())
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _rotate_half(r: ir.Value, size: int) -> ir.Value | None:
    """``x`` when ``r = Concat(-x[..., h:], x[..., :h])`` (transformers' rotate_half, h = size / 2)."""
    concat = _producer(r, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis") not in (-1, 3):
        return None
    neg = _producer(concat.inputs[0], "Neg")
    upper, lower = (_producer(neg.inputs[0], "Slice") if neg else None), _producer(concat.inputs[1], "Slice")
    if upper is None or lower is None or upper.inputs[0] is not lower.inputs[0]:
        return None
    half = size // 2
    for node, (start, end) in ((upper, (half, size)), (lower, (0, half))):
        args = [_const_ints(v) for v in list(node.inputs[1:]) + [None] * (5 - len(node.inputs))]
        starts, ends, axes, steps = args[0], args[1], args[2], args[3]
        if starts != [start] or ends is None or len(ends) != 1 or not (ends[0] >= end if end == size else ends[0] == end):
            return None
        if axes not in (None, [-1], [3]) or steps not in (None, [1]):
            return None
    return lower.inputs[0]


def _cos_sin(c: ir.Value, s: ir.Value) -> tuple[ir.Value, float] | None:
    """``(F, k)`` when ``c = Unsqueeze(Cos(Concat(F, F)) · k, 1)`` and ``s`` the same with Sin."""
    found = []
    for value, op in ((c, "Cos"), (s, "Sin")):
        unsqueeze = _producer(value, "Unsqueeze")
        if unsqueeze is None or _const_ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) != [1]:
            return None
        inner, scale = unsqueeze.inputs[0], 1.0
        mul = _producer(inner, "Mul")
        if mul is not None:
            for a, b in (mul.inputs, mul.inputs[::-1]):
                if _producer(a, op) is not None and _scalar(b) is not None:
                    inner, scale = a, _scalar(b)
                    break
            else:
                return None
        trig = _producer(inner, op)
        concat = _producer(trig.inputs[0], "Concat") if trig is not None else None
        if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
            return None
        found.append((concat.inputs[0], scale))
    return found[0] if found[0] == found[1] else None


def _rotary(r: ir.Value, size: int) -> tuple[ir.Value, ir.Value, float] | None:
    """``(x, F, k)`` when ``r = x·cos + rotate_half(x)·sin`` with ``cos = Cos(Concat(F, F))·k`` (and
    ``sin`` alike) broadcast over the heads: transformers' RoPE, ``F`` the (B, S, H/2) angles."""
    add = _producer(r, "Add")
    if add is None:
        return None
    for first, second in (add.inputs, add.inputs[::-1]):
        direct, rotated = _producer(first, "Mul"), _producer(second, "Mul")
        if direct is None or rotated is None:
            continue
        for x, c in (direct.inputs, direct.inputs[::-1]):
            for half, s in (rotated.inputs, rotated.inputs[::-1]):
                if _rotate_half(half, size) is x:
                    angles = _cos_sin(c, s)
                    if angles is not None:
                        return x, *angles
    return None


def _positions_and_inv_freq(angles: ir.Value, half: int) -> tuple[ir.Value, np.ndarray] | None:
    """``(positions, inv_freq)`` when ``angles = Cast(Unsqueeze(positions, 2)) · inv_freq`` (transformers'
    RoPE as the dynamo exporter writes it) with integer (B, S) ``positions`` and a constant ``inv_freq`` of
    ``half`` values; else None."""
    node = _producer(angles, "Mul")
    if node is None:
        return None
    for x, c in (node.inputs, node.inputs[::-1]):
        tensor = ir.convenience.get_const_tensor(c)
        cast = _producer(x, "Cast")
        unsqueeze = _producer(cast.inputs[0], "Unsqueeze") if cast is not None else None
        if tensor is None or unsqueeze is None or len(unsqueeze.inputs) < 2:
            continue
        array = np.asarray(tensor.numpy())
        positions = unsqueeze.inputs[0]
        if (array.size != half or array.shape[-1] != half or _const_ints(unsqueeze.inputs[1]) != [2]
                or positions.dtype not in (ir.DataType.INT64, ir.DataType.INT32)
                or positions.shape is None or len(positions.shape) != 2):
            continue
        return positions, array.reshape(-1).astype(np.float32)
    return None


class CachedGroupQueryRule(LoweringRule):
    """Causal self-attention over a KV cache (past graph input, present graph output, transformers'
    ``repeat_kv`` of grouped heads) to com.microsoft.GroupQueryAttention, which keeps the grouped
    heads, appends to the cache itself and reads the exporter's mask as its ``attention_bias``."""

    name = "com.microsoft.GroupQueryAttention (cached)"

    def __init__(self, context: int | None = None):
        self.context = context  # positions the model can see: rows of constant rotary tables (None: unknown)
        self._tables: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        self._lengths: dict[tuple[int, str], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self._biases: dict[int, ir.Value] = {}
        self.replaced: list[ir.Value] = []
        self._rotary_inputs: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.rotary = 0  # blocks whose RoPE became com.microsoft.RotaryEmbedding
        self.tables = 0  # ... reading constant tables at the graph's positions

    def _match(self, graph: ir.Graph, node: ir.Node):
        if node.domain != ops.DOMAIN or node.op_type != "AttentionBHSD":
            return "not a head-split attention block"
        if node.attributes.get_float("softcap", 0.0):
            return "tanh soft-capping (the kernel's softcap is applied differently)"
        if not MaskKind.of(node).causal:
            return f"mask kind '{MaskKind.of(node).value}' is not causal"
        q, k, v = node.inputs[:3]
        if q.shape is None or len(q.shape) != 4 or not isinstance(q.shape[1], int) or not isinstance(q.shape[3], int):
            return "query heads or head size not static"
        heads, size = q.shape[1], q.shape[3]
        if size % GQA_HEAD_SIZE_MULTIPLE:
            return f"head size {size} is not a multiple of {GQA_HEAD_SIZE_MULTIPLE}"
        found = []
        for x in (k, v):
            present, why = _unrepeat(x, heads)
            if why:
                return why
            concat, why = _cache_concat(present, graph)
            if why:
                return why
            if present.shape is None or present.shape[-1] != size:
                return "key/value head size differs from the query's"
            found.append((x, present, concat))
        if found[0][1].shape[1] != found[1][1].shape[1]:
            return "keys and values have different head counts"
        return found

    def check(self, node: ir.Node, graph: ir.Graph | None = None) -> str | None:
        graph = graph if graph is not None else node.graph
        result = self._match(graph, node)
        return result if isinstance(result, str) else None

    def _total(self, b: Builder, graph: ir.Graph, past: ir.Value, q_bsd: ir.Value, padding: ir.Value | None):
        """``seqlens_k`` (B,), ``total_sequence_length`` (scalar), both int32, and T (int64, (1,)), made once
        per graph: T is the padding input's length, else the past cache's plus the new tokens' (every
        layer's cache has the same length)."""
        key = (id(graph), "mask" if padding is not None else "past")
        if key not in self._lengths:
            if padding is not None:
                total = b("Shape", padding, start=1, end=2)
            else:
                total = b("Add", b("Shape", past, start=2, end=3), b("Shape", q_bsd, start=1, end=2))
            total32 = b("Cast", total, to=ir.DataType.INT32)
            scalar = b("Squeeze", total32, b.i64(0))
            seqlens = b("Expand", b("Sub", total32, b.const(np.array([1], np.int32))), b("Shape", q_bsd, start=0, end=1))
            self._lengths[key] = (seqlens, scalar, total)
        return self._lengths[key]

    def _padding_bias(self, b: Builder, graph: ir.Graph, padding: ir.Value, q_bsd: ir.Value) -> ir.Value:
        """(B, 1, S, T): 0 where ``padding`` (B, T) is nonzero, float32's minimum where it is 0 (the
        kernel's causal mask does the rest); made once per graph."""
        if id(graph) not in self._biases:
            visible = b("Cast", padding, to=ir.DataType.BOOL)
            bias = b("Where", visible, b.const(np.array(0.0, np.float32)),
                     b.const(np.array(np.finfo(np.float32).min, np.float32)))
            rows = b("Concat", b.i64(1, 1), b("Shape", q_bsd, start=1, end=2), b.i64(1), axis=0)
            self._biases[id(graph)] = b("Expand", b("Unsqueeze", bias, b.i64(1, 2)), rows)
        return self._biases[id(graph)]

    def _rotary_tables(self, graph: ir.Graph, inv_freq: np.ndarray, scale: float) -> tuple[ir.Value, ir.Value]:
        """(context, H/2) cos/sin tables over every position, as initializers, made once per (inv_freq, scale)."""
        key = (inv_freq.tobytes(), scale)
        if key not in self._tables:
            angles = np.arange(self.context, dtype=np.float32)[:, None] * inv_freq[None, :]
            made = []
            for name, fn in (("cos", np.cos), ("sin", np.sin)):
                value = ir.Value(name=f"rotary_{name}_table_{len(self._tables)}",
                                 const_value=ir.tensor((fn(angles) * np.float32(scale)).astype(np.float32)))
                graph.register_initializer(value)
                made.append(value)
            self._tables[key] = (made[0], made[1])
        return self._tables[key]

    def _caches(self, b: Builder, angles: ir.Value, scale: float, x: ir.Value, size: int):
        """com.microsoft.RotaryEmbedding's inputs for the graph's own angles ``F`` (B, S, H/2): one cache
        row per token (``cos(F)·k``, ``sin(F)·k`` flattened) and position ids 0 … B·S-1, so each token
        reads the angles the exporter's graph computed for it, left padding included; made once per ``F``."""
        if id(angles) not in self._rotary_inputs:
            rows = b("Concat", b("Shape", x, start=0, end=2), b.i64(size // 2), axis=0)
            flat = b("Reshape", b("Expand", angles, rows), b.i64(-1, size // 2))
            cos, sin = b("Cos", flat), b("Sin", flat)
            if scale != 1.0:
                factor = b.const(np.array(scale, np.float32))
                cos, sin = b("Mul", cos, factor), b("Mul", sin, factor)
            count = b("Shape", flat, start=0, end=1)
            positions = b("Reshape", b("Range", b.const(np.array(0, np.int64)), b("Squeeze", count, b.i64(0)),
                                       b.const(np.array(1, np.int64))), b("Shape", x, start=0, end=2))
            self._rotary_inputs[id(angles)] = (positions, cos, sin)
        return self._rotary_inputs[id(angles)]

    def rewrite(self, graph: ir.Graph, node: ir.Node) -> tuple[list[ir.Node], ir.Value, str]:
        (k, present_k, concat_k), (v, present_v, concat_v) = self._match(graph, node)
        q = node.inputs[0]
        heads, size = q.shape[1], q.shape[3]
        kv_heads = present_k.shape[1]
        b = Builder(f"{node.name or node.outputs[0].name}/gqa", [])
        kind = MaskKind.of(node)
        padding = _key_padding(graph, node) if kind is MaskKind.CAUSAL else None
        if padding is not None and (padding.shape is None or len(padding.shape) != 2):
            padding = None
        q_rot, k_rot = _rotary(q, size), _rotary(concat_k.inputs[1], size)
        if q_rot is not None and k_rot is not None and q_rot[1:] == k_rot[1:]:
            q_bsd, k_bsd = _to_bsd(b, q_rot[0]), _to_bsd(b, k_rot[0])
            found = _positions_and_inv_freq(q_rot[1], size // 2) if self.context else None
            if found is not None:  # the graph's positions index tables over the whole context
                positions = found[0]
                if positions.dtype != ir.DataType.INT64:
                    positions = b("Cast", positions, to=ir.DataType.INT64)
                cos, sin = self._rotary_tables(graph, found[1], q_rot[2])
                self.tables += 1
            else:  # one row per token, of the graph's own angles
                positions, cos, sin = self._caches(b, q_rot[1], q_rot[2], q_bsd, size)
            q_bsd = b("RotaryEmbedding", q_bsd, positions, cos, sin, domain="com.microsoft", num_heads=heads)
            k_bsd = b("RotaryEmbedding", k_bsd, positions, cos, sin, domain="com.microsoft", num_heads=kv_heads)
            self.rotary += 1
        else:
            q_bsd, k_bsd = _to_bsd(b, q), _to_bsd(b, concat_k.inputs[1])
        v_bsd = _to_bsd(b, concat_v.inputs[1])
        seqlens, total, total64 = self._total(b, graph, concat_k.inputs[0], q_bsd, padding)
        bias = None
        if padding is not None:
            bias = self._padding_bias(b, graph, padding, q_bsd)
        elif kind is not MaskKind.CAUSAL or node.attributes.get_string("key_padding") is not None:
            bias = _finite(b, node.inputs[3])
            shape = bias.shape
            if not (shape is not None and len(shape) == 4 and _same_dim(shape[2], q.shape[2])
                    and _same_dim(shape[3], k.shape[2])):  # (B|1, N|1, S, T) spelled out for the kernel
                lengths = b("Concat", b.i64(1, 1), b("Shape", q_bsd, start=1, end=2), total64, axis=0)
                bias = b("Expand", bias, lengths)
        inputs = [q_bsd, k_bsd, v_bsd, concat_k.inputs[0], concat_v.inputs[0], seqlens, total]
        if bias is not None:
            inputs += [None, None, None, bias]
        out, new_k, new_v = b("GroupQueryAttention", *inputs, domain="com.microsoft", num_outputs=3, num_heads=heads,
                              kv_num_heads=kv_heads, scale=node.attributes.get_float("scale"))
        output = b("Transpose", b("Reshape", out, b.i64(0, 0, heads, size)), perm=[0, 2, 1, 3])
        self.replaced = [present_k, present_v]  # the Concats' outputs, now unused
        for old, new in ((present_k, new_k), (present_v, new_v)):
            name = old.name
            old.name = f"{name}/replaced"
            new.name, new.shape, new.type = name, old.shape, old.type
            # Only the graph output moves: other readers (the head repeat, Shape nodes) keep the Concat,
            # which dead-code removal drops once the repeat is gone and nothing else reads it.
            graph.outputs[graph.outputs.index(old)] = new
        return b.nodes, output, self.name


def _remove_dead_chain(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the producers of ``values`` (and, recursively, of their inputs) that nothing uses any more."""
    stack = list(values)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or node.graph is not graph or value in graph.outputs:
            continue
        if any(o.uses() or o in graph.outputs for o in node.outputs):
            continue
        inputs = [i for i in node.inputs if i is not None]
        graph.remove(node, safe=True)
        stack.extend(inputs)


def _skip_round_trip(output: ir.Value, width: int) -> None:
    """Readers that transpose the lowered block's (B, N, S, H) output back and merge its heads (the
    exporter's ``transpose(1, 2).reshape(B, S, N·H)``) read the kernel's (B, S, N·H) output instead."""
    transpose = output.producer()
    flat = transpose.inputs[0].producer().inputs[0]  # Transpose(Reshape(kernel output, (0, 0, N, H)))
    for user, _ in list(output.uses()):
        if user.op_type != "Transpose" or list(user.attributes.get_ints("perm") or []) != [0, 2, 1, 3]:
            continue
        for reader, _ in list(user.outputs[0].uses()):
            merged = reader.outputs[0]
            shape = merged.shape
            if (reader.op_type != "Reshape" or shape is None or len(shape) != 3 or shape[2] != width
                    or merged in reader.graph.outputs):
                continue
            if flat.shape is None:
                flat.shape = shape
            if flat.type is None:
                flat.type = merged.type
            ir.convenience.replace_all_uses_with(merged, flat)


@register_pass("lower-cached-attention")
class LowerCachedAttentionPass(ir.passes.InPlacePass):
    """KV-cached causal self-attention of a decoder to com.microsoft.GroupQueryAttention
    (:class:`CachedGroupQueryRule`); other blocks are left to ``lower-attention``. The report counts
    the blocks lowered and gives the first reason a block was not."""

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.metadata_props.get(TASK_KEY) != GENERATION_TASK:
            self.report = {"lowered": 0, "skipped": "not compiled for generation (--task text-generation): "
                           "GroupQueryAttention refuses a multi-token chunk after a filled cache at batch > 1"}
            return ir.passes.PassResult(model, False)
        context = model.metadata_props.get(CONTEXT_KEY, "")
        rule = CachedGroupQueryRule(int(context) if context.isdigit() and int(context) > 0 else None)
        lowered, misses = 0, {}
        graph = model.graph
        for node in list(graph):
            if node.domain != ops.DOMAIN or node.op_type not in ("Attention", "AttentionBHSD"):
                continue
            reason = rule.check(node, graph)
            if reason is not None:
                misses.setdefault(rule.name, f"{node.name or node.outputs[0].name}: {reason}")
                continue
            inputs = [i for i in node.inputs if i is not None]
            width = node.inputs[0].shape[1] * node.inputs[0].shape[3]  # N·H (static: checked)
            new_nodes, output, _ = rule.rewrite(graph, node)
            graph.insert_before(node, new_nodes)
            take_over([node.outputs[0]], [output])
            graph.remove(node, safe=True)
            _skip_round_trip(output, width)
            _remove_dead_chain(graph, inputs + rule.replaced)
            lowered += 1
        if lowered:
            model.opset_imports.setdefault("com.microsoft", 1)
        self.report = {"lowered": lowered, "rotary_fused": rule.rotary, "rotary_tables": rule.tables, **({"near_misses": misses} if misses else {})}
        return ir.passes.PassResult(model, lowered > 0)
