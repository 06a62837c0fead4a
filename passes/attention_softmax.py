"""Attention found from its math: ``Softmax(f(Q·Kᵀ)) · V`` → ``tfgraph.AttentionBHSD``.

The pattern rules of :mod:`tfgraph.passes.attention_fusion` take the forms exporters
usually produce. This walker takes what they leave, whatever the graph between the
products looks like, as long as it is exactly expressible as the neutral op:

* anchored on a ``Softmax`` over the last axis whose probabilities reach a ``MatMul(P, V)``
  (through the NaN guard, a same-type Cast, a Reshape that keeps the key axis, or a
  ``Where`` that zeroes the positions an earlier ``Where`` masked);
* walking up from the Softmax's input to the ``MatMul(Q, Kᵀ)`` through the score
  function ``f``: ``Add``/``Sub`` of any tensor (masks, T5 buckets, ALiBi, relative
  position tables, DeBERTa's disentangled terms: each becomes part of the bias, whatever
  computes it), ``Mul``/``Div`` by a constant scalar (the scale; an earlier bias is scaled
  with it), ``Where(cond, scores, fill)`` with a fill ``<= -1e4`` (a mask), same-type
  ``Cast``, and ``Reshape``/``Unsqueeze``/``Squeeze`` that keep the key axis (Swin's
  per-window mask, Bloom's (B·H, S, T) ↔ (B, H, S, T) views). At an ``Add`` either
  operand may be the scores: both choices give the same sum.
* Q, K, V of rank 4 (batch, heads, sequence, size) or 3 (batch·heads, sequence, size;
  unsqueezed to rank 4 around the fused op); a scalar constant on Q or Kᵀ is folded into
  the scale; Kᵀ is un-transposed (a Transpose of a Transpose cancels in simplification).

Every term of ``f`` that is not the plain scale is carried in the bias, mapped back to the
products' layout when the walk went through a Reshape. ``Tanh`` soft-capping and other
non-affine transforms are refused with a reason (the neutral op has no pre-softmax
function), as is anything else: :func:`diagnose` gives the reason for every attention
Softmax left unfused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common is used below; importing onnx_ir alone does not load it

from tfgraph import ops
from tfgraph.passes import attention_einsum

MASK_FILL_LIMIT = -1e4
_MAX_PATH = 24
_RESHAPES = ("Reshape", "Unsqueeze", "Squeeze")
_RANKS = (3, 4, 5, 6)  # 3: (batch·heads, S, H), unsqueezed; 5, 6: (batch, blocks…, heads, S, H), flattened


class Refused(Exception):
    """The block cannot be fused; the message says why (``einsum``: an Einsum product in the way)."""

    def __init__(self, message: str, einsum: ir.Node | None = None):
        super().__init__(message)
        self.einsum = einsum


@dataclasses.dataclass
class Block:
    softmax: ir.Node
    core: ir.Node  # MatMul(Q, Kᵀ)
    pv: ir.Node  # MatMul(P, V)
    q: ir.Value
    kt: ir.Value
    path: list  # (node, index of the scores operand), from the core MatMul to the Softmax
    scale: float
    zero_fill: ir.Value | None  # condition of a post-softmax Where that zeroes masked positions
    regroup: bool  # Reshapes regrouped the leading axes: Q and K go to the layout of the probabilities' product
    q_factors: list  # (Mul|Div, (…, 1) tensor) factors of the scores, applied to Q


def _scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    tensor = value.const_value
    node = value.producer()
    if tensor is None and node is not None and node.op_type == "Constant" and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and getattr(a, "value", None) is not None and a.value == b.value


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return (a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
            and all(_same_dim(x, y) for x, y in zip(a.shape, b.shape)))


def _keeps_last_axes(node: ir.Node) -> bool:
    """A Reshape/Unsqueeze/Squeeze that only regroups the leading (batch, head) axes: the query and
    key axes, the last two, stay as they are."""
    inp, out = node.inputs[0], node.outputs[0]
    if inp.shape is None or out.shape is None or len(inp.shape) < 2 or len(out.shape) < 2:
        return False
    return _same_dim(inp.shape[-1], out.shape[-1]) and _same_dim(inp.shape[-2], out.shape[-2])


def _softmax_axis_ok(node: ir.Node) -> bool:
    axis = node.attributes.get_int("axis", -1)
    rank = _rank(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _downstream(softmax: ir.Node) -> tuple[ir.Node, ir.Value | None, bool]:
    """The ``MatMul(P, V)`` the probabilities reach, and the condition of a post-softmax zeroing Where."""
    value = softmax.outputs[0]
    zero_fill, moved = None, False
    for _ in range(8):
        uses = list(value.uses())
        users = {id(n): n for n, _ in uses}
        if len(users) == 2:  # the NaN guard: Where(IsNaN(P), 0, P)
            nodes = list(users.values())
            isnan = next((n for n in nodes if n.op_type == "IsNaN"), None)
            where = next((n for n in nodes if n.op_type == "Where"), None)
            if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or _scalar(where.inputs[1]) != 0.0:
                raise Refused("the attention probabilities have other uses than the product with V")
            value = where.outputs[0]
            continue
        if len(uses) != 1:
            raise Refused("the attention probabilities have other uses than the product with V" if uses else
                          "the Softmax output is not used")
        node, index = uses[0]
        if node.op_type == "MatMul" and node.domain == "" and index == 0:
            return node, zero_fill, moved
        if node.op_type in ("Cast", "Identity", "Dropout") and index == 0 and (
                node.op_type != "Cast" or node.outputs[0].dtype == value.dtype):
            value = node.outputs[0]
            continue
        if node.op_type in _RESHAPES and index == 0:
            if not _keeps_last_axes(node):
                raise Refused(f"{node.op_type} after the Softmax does not keep the query and key axes")
            value, moved = node.outputs[0], True
            continue
        if node.op_type == "Where" and index == 2 and _scalar(node.inputs[1]) == 0.0 and zero_fill is None:
            zero_fill = node.inputs[0]  # masked positions set to 0 after the Softmax (DeBERTa's XSoftmax)
            value = node.outputs[0]
            continue
        if node.op_type == "Einsum" and index == 0:
            raise Refused("the probabilities go to an Einsum that is not a batched matrix product", node)
        raise Refused(f"the probabilities go to {node.op_type} (input {index}), not to a MatMul with V")
    raise Refused("no MatMul with V within 8 nodes after the Softmax")


def _row_factor(value: ir.Value | None) -> bool:
    """A factor constant along the key axis (shape (…, 1)): a per-head or per-query multiplier
    (Swin-v2's learned logit scale), which moves onto Q."""
    return value is not None and value.shape is not None and len(value.shape) >= 1 and value.shape[-1] == 1


def _walk_up(value: ir.Value, depth: int = 0) -> tuple[ir.Node, list]:
    """(core MatMul, path [(node, scores operand index)] from it to ``value``), or Refused."""
    if depth > _MAX_PATH:
        raise Refused(f"no MatMul(Q, Kᵀ) within {_MAX_PATH} nodes before the Softmax")
    node = value.producer()
    if node is None:
        raise Refused("the Softmax input is not computed from a MatMul(Q, Kᵀ)")
    op = node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}"
    if op == "MatMul":
        return node, []
    if op in ("Add", "Sub"):
        errors = []
        for i in ((0, 1) if op == "Add" else (0,)):
            try:
                core, path = _walk_up(node.inputs[i], depth + 1)
                return core, path + [(node, i)]
            except Refused as error:
                errors.append(error)
        einsum = next((e.einsum for e in errors if e.einsum is not None), None)
        raise Refused(str(errors[0]) if op == "Sub" else f"neither operand of Add leads to MatMul(Q, Kᵀ): {errors[0]}",
                      einsum)
    if op in ("Mul", "Div"):
        for i in ((0, 1) if op == "Mul" else (0,)):
            if _scalar(node.inputs[1 - i]) not in (None, 0.0) or _row_factor(node.inputs[1 - i]):
                core, path = _walk_up(node.inputs[i], depth + 1)
                return core, path + [(node, i)]
        raise Refused(f"the scores are multiplied ({op}) by a tensor that varies along the key axis")
    if op == "Where":
        for i, fill in ((1, 2), (2, 1)):
            limit = _scalar(node.inputs[fill])
            if limit is not None and limit <= MASK_FILL_LIMIT:
                core, path = _walk_up(node.inputs[i], depth + 1)
                return core, path + [(node, i)]
        raise Refused(f"Where before the Softmax without a constant fill <= {MASK_FILL_LIMIT:g}")
    if op in ("Cast", "Identity") and (op == "Identity" or node.outputs[0].dtype == node.inputs[0].dtype):
        core, path = _walk_up(node.inputs[0], depth + 1)
        return core, path + [(node, 0)]
    if op in _RESHAPES:
        if not _keeps_last_axes(node):
            raise Refused(f"{op} before the Softmax does not keep the query and key axes (or its shape is unknown)")
        core, path = _walk_up(node.inputs[0], depth + 1)
        return core, path + [(node, 0)]
    if op == "Einsum":
        raise Refused("the scores come from an Einsum that is not a batched matrix product", node)
    if op == "Tanh":
        raise Refused("tanh soft-capping of the scores: the neutral attention op has no pre-softmax function "
                      "(needs a softcap attribute in tfgraph/ops.py)")
    raise Refused(f"{op} between MatMul(Q, Kᵀ) and the Softmax is not a scale, bias or mask")


def _unscaled(value: ir.Value) -> tuple[ir.Value, float]:
    """``value`` without a constant scalar Mul/Div, and that factor."""
    node = value.producer()
    if node is not None and node.domain == "" and node.op_type in ("Mul", "Div"):
        for i in ((0, 1) if node.op_type == "Mul" else (0,)):
            factor = _scalar(node.inputs[1 - i])
            if factor not in (None, 0.0):
                return node.inputs[i], factor if node.op_type == "Mul" else 1.0 / factor
    return value, 1.0


def _constant(value: ir.Value) -> bool:
    """Whether ``value`` is a constant, possibly moved by layout ops (a weight, not a projection)."""
    for _ in range(8):
        if value.const_value is not None:
            return True
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        if node.op_type not in ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Expand"):
            return False
        value = node.inputs[0]
    return False


def _features_last(kt: ir.Value) -> bool:
    """Whether Transposes bring the last (feature) axis of their source to the last axis of ``kt``."""
    axis, node, moved = -1, kt.producer(), False
    rank = _rank(kt)
    if rank is None:
        return False
    axis = rank - 1
    while node is not None and node.op_type == "Transpose" and node.domain == "":
        perm = node.attributes.get_ints("perm", list(reversed(range(rank))))
        axis, moved = perm[axis], True
        node = node.inputs[0].producer()
    return moved and axis == rank - 1


def find(softmax: ir.Node) -> Block:
    """The attention block around ``softmax``; Refused with the reason when it is not one the op can hold."""
    if not _softmax_axis_ok(softmax):
        raise Refused("Softmax is not over the last axis")
    pv, zero_fill, moved = _downstream(softmax)
    core, path = _walk_up(softmax.inputs[0])
    q, q_factor = _unscaled(core.inputs[0])
    kt, k_factor = _unscaled(core.inputs[1])
    v = pv.inputs[1]
    if _features_last(kt):
        raise Refused("the key operand's last axis is the feature axis of the keys (Q·K, not Q·Kᵀ)")
    if _constant(kt) or _constant(v):
        raise Refused("keys or values are constants (a gate over fixed vectors, not attention)")
    ranks = {_rank(x) for x in (q, kt, core.outputs[0])}
    if len(ranks) != 1 or ranks.pop() not in _RANKS or _rank(v) != _rank(pv.inputs[0]) or _rank(v) not in _RANKS:
        raise Refused("Q, Kᵀ (and V, P) are not of one known rank from 3 to 6")
    reshaped = moved or any(n.op_type in _RESHAPES for n, _ in path)
    regroup = reshaped and not _same_shape(pv.inputs[0], core.outputs[0])
    if not reshaped and _rank(pv.inputs[0]) != _rank(q):
        raise Refused("a bias of higher rank than Q·Kᵀ broadcasts the scores to another shape")
    scale, q_factors = q_factor * k_factor, []
    for position, (node, i) in enumerate(path):
        if node.op_type in ("Mul", "Div"):
            factor = _scalar(node.inputs[1 - i])
            if factor is None:  # a (…, 1) tensor: onto Q, in the layout of Q·Kᵀ
                if any(n.op_type in _RESHAPES for n, _ in path[:position]):
                    raise Refused("a per-row factor of the scores after a Reshape")
                q_factors.append((node.op_type, node.inputs[1 - i]))
                continue
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
    for node, i in path:
        if node.op_type == "Where" and zero_fill is not None and (node.inputs[0] is not zero_fill or i != 2):
            raise Refused("the Where after the Softmax zeroes other positions than the mask before it")
    if zero_fill is not None and not any(n.op_type == "Where" for n, _ in path):
        raise Refused("a Where after the Softmax zeroes positions no mask before it hides")
    return Block(softmax, core, pv, q, kt, path, scale, zero_fill, regroup, q_factors)


# --- the rewrite ---------------------------------------------------------------------------


class _Emit:
    def __init__(self, graph, anchor: ir.Node):
        self.graph, self.anchor, self.nodes = graph, anchor, []

    def __call__(self, op: str, inputs, **attributes) -> ir.Value:
        node = ir.node(op, list(inputs), attributes=attributes)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        return self("Constant", [], value=ir.tensor(array))


def _dtype(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)


def _bias(emit: _Emit, block: Block, scores_dtype: np.dtype) -> ir.Value | None:
    """The whole of ``f`` but the scale, as an additive bias in the layout of Q·Kᵀ."""
    bias = None
    current = block.core.outputs[0]  # the scores value at this point of the path
    reshaped = False
    for node, i in block.path:
        op, other = node.op_type, (node.inputs[1 - i] if len(node.inputs) > 1 else None)
        if op == "Add":
            bias = other if bias is None else emit("Add", [bias, other])
        elif op == "Sub":
            bias = emit("Neg", [other]) if bias is None else emit("Sub", [bias, other])
        elif op in ("Mul", "Div") and bias is not None:
            bias = emit(op, [bias, other])
        elif op == "Where":
            fill_index = 3 - i
            fill = node.inputs[fill_index]
            if block.zero_fill is not None:  # zeroed after the Softmax: masked rows give 0 as the op's -inf rows do
                fill = emit.const(np.array(-np.inf, dtype=_dtype(fill)))
            base = bias if bias is not None else emit.const(np.array(0, dtype=_dtype(fill)))
            branches = [base, fill] if i == 1 else [fill, base]
            bias = emit("Where", [node.inputs[0], *branches])
        elif op in _RESHAPES and bias is not None:
            full = emit("Expand", [bias, emit("Shape", [current])])
            bias = emit(op, [full, *node.inputs[1:]], **{a.name: a for a in node.attributes.values()})
            reshaped = True
        elif op in _RESHAPES:
            reshaped = True
        current = node.outputs[0]
    if bias is not None and reshaped:  # into the layout of the product with V
        full = emit("Expand", [bias, emit("Shape", [current])])
        bias = emit("Reshape", [full, emit("Shape", [block.pv.inputs[0]])])
    return bias


def _head_sources(*values: ir.Value) -> list[ir.Value] | None:
    """For (B·H, L, size) operands each a Reshape merging the first two axes of a (B, H, L, size)
    tensor with one static H: those tensors (so a fused kernel gets its head count); else None."""
    sources = []
    for x in values:
        node = x.producer()
        if node is None or node.op_type != "Reshape" or x.shape is None or len(x.shape) != 3:
            return None
        src = node.inputs[0]
        if src.shape is None or len(src.shape) != 4 or not isinstance(src.shape[1], int):
            return None
        if not (_same_dim(src.shape[2], x.shape[1]) and _same_dim(src.shape[3], x.shape[2])):
            return None
        if isinstance(x.shape[0], int) and isinstance(src.shape[0], int) and x.shape[0] != src.shape[0] * src.shape[1]:
            return None
        sources.append(src)
    if len({s.shape[1] for s in sources}) != 1 or not _same_dim(sources[0].shape[0], sources[1].shape[0]):
        return None
    return sources


def rewrite(graph, block: Block) -> None:
    emit = _Emit(graph, block.pv)
    out = block.pv.outputs[0]
    dtype = _dtype(block.core.outputs[0])
    bias = _bias(emit, block, dtype)
    kt_node = block.kt.producer()
    rank = _rank(block.q)
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    if kt_node is not None and kt_node.op_type == "Transpose" and kt_node.domain == "":
        perm = list(kt_node.attributes.get_ints("perm", list(reversed(range(rank)))))
        composed = [perm[s] for s in swap]
        k = kt_node.inputs[0] if composed == list(range(rank)) else emit("Transpose", [kt_node.inputs[0]], perm=composed)
    else:
        k = emit("Transpose", [block.kt], perm=swap)
    q, v = block.q, block.pv.inputs[1]
    for op, factor in block.q_factors:
        scaled = emit(op, [q, factor])
        scaled.shape, scaled.type = q.shape, q.type
        q = scaled
    if k.shape is None and block.kt.shape is not None:
        k.shape = ir.Shape([block.kt.shape[s] for s in swap])
        k.type = block.kt.type
    probs = block.pv.inputs[0]
    if block.regroup:  # (B·H, S, D) products whose probabilities meet V as (B, H, S, T), or the reverse
        lead = emit("Shape", [probs], end=-2)
        regrouped = []
        for x in (q, k):
            y = emit("Reshape", [x, emit("Concat", [lead, emit("Shape", [x], start=-2)], axis=0)])
            if probs.shape is not None and x.shape is not None:
                y.shape, y.type = ir.Shape([*probs.shape[:-2], *x.shape[-2:]]), x.type
            regrouped.append(y)
        q, k = regrouped
        rank = _rank(probs)
    heads = _head_sources(q, k, v) if rank == 3 else None
    if heads is not None:  # (B·H, S, H) operands merged from (B, H, S, H) ones: the fused op takes those
        v3 = v
        q, k, v = heads
        if bias is not None:
            split = emit("Concat", [emit("Shape", [q], end=2), emit("Shape", [probs], start=-2)], axis=0)
            bias = emit("Reshape", [emit("Expand", [bias, emit("Shape", [probs])]), split])
        rank = 4
    if rank == 3:
        axis = emit.const(np.array([0], dtype=np.int64))
        lifted = []
        for x in (q, k, v):
            y = emit("Unsqueeze", [x, axis])
            y.shape, y.type = (ir.Shape([1, *x.shape]) if x.shape is not None else None), x.type
            lifted.append(y)
        q, k, v = lifted
    if rank > 4:  # leading (batch, block…) axes flattened into one
        flat = emit("Concat", [emit.const(np.array([-1], dtype=np.int64)), emit("Shape", [probs], start=-3)], axis=0)
        flattened = []
        for x in (q, k, v):
            y = emit("Reshape", [x, emit("Concat", [emit.const(np.array([-1], dtype=np.int64)),
                                                      emit("Shape", [x], start=-3)], axis=0)])
            y.shape, y.type = None, x.type
            flattened.append(y)
        q, k, v = flattened
        if bias is not None:
            bias = emit("Reshape", [emit("Expand", [bias, emit("Shape", [probs])]), flat])
    kind = "bias"
    if bias is None:
        bias, kind = emit.const(np.array(0, dtype=dtype)), "none"
    fused = ir.node("AttentionBHSD", [q, k, v, bias], attributes={"scale": float(block.scale), "mask_kind": kind},
                    domain=ops.DOMAIN)
    emit.nodes.append(fused)
    result = fused.outputs[0]
    if heads is not None:
        merged = emit("Concat", [emit("Shape", [probs], end=-1), emit("Shape", [v3], start=-1)], axis=0)
        result.type = out.type
        result = emit("Reshape", [result, merged])
    elif rank == 3:
        result.shape = ir.Shape([1, *out.shape]) if out.shape is not None else None
        result.type = out.type
        result = emit("Squeeze", [result, emit.const(np.array([0], dtype=np.int64))])
    elif rank > 4:
        result.type = out.type
        shape = emit("Concat", [emit("Shape", [probs], end=-1), emit("Shape", [block.pv.inputs[1]], start=-1)], axis=0)
        result = emit("Reshape", [result, shape])
    result.shape, result.type = out.shape, out.type
    graph.insert_before(block.pv, emit.nodes)
    ir.convenience.replace_all_uses_with(out, result)
    if out.is_graph_output():
        index = [i for i, o in enumerate(graph.outputs) if o is out]
        for i in index:
            graph.outputs[i] = result
        result.name, out.name = out.name, None


def _attention_softmaxes(graph) -> list[ir.Node]:
    from tfgraph.analysis import _reaches_matmul_downstream, _reaches_matmul_upstream

    return [n for n in graph if n.op_type == "Softmax" and n.domain == "" and ops.attention_form(n) is None
            and _reaches_matmul_upstream(n.inputs[0]) and _reaches_matmul_downstream(n.outputs[0])]


def fuse_all(model: ir.Model) -> tuple[int, list[dict]]:
    """Fuse every attention Softmax of the model (subgraphs included) the walker can take.

    Returns (blocks fused, [{"softmax": name, "reason": why} for each attention Softmax left])."""
    count, left = 0, []
    for graph in list(model.graphs()):
        for softmax in _attention_softmaxes(graph):
            block = None
            for _ in range(3):  # an Einsum product in the way is rewritten as a MatMul, then tried again
                try:
                    block = find(softmax)
                    break
                except Refused as error:
                    reason = str(error)
                    if error.einsum is None or not attention_einsum.as_matmul(graph, error.einsum):
                        break
            if block is None:
                left.append({"softmax": softmax.name or "", "reason": reason})
                continue
            rewrite(graph, block)
            count += 1
    if count:
        ops.ensure_defined(model, "AttentionBHSD")
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count, left
