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
  operand may be the scores: both choices give the same sum. A ``Mul``/``Div`` by a tensor
  of shape (…, 1) (Swin-v2's per-head logit scale) is constant along the key axis and moves
  onto Q. ``Max(scores, c)`` with a scalar ``c <= -1e30`` (XGLM's clamp to ``finfo.min``) is
  walked over as a no-op: it only turns ``-inf`` into the most negative float, and a row's
  softmax is unchanged by that unless every score of the row is ``-inf`` (a row the op gives
  0 and the clamped graph a uniform row: no real key attends there either way).
* ``c·tanh(s·scores/c)`` before any bias (Gemma-2's soft-capping: ``Div``/``Mul`` by a
  scalar, ``Tanh``, ``Mul`` by ``c > 0``) sets the op's ``softcap`` attribute to ``c``.
* Q, K, V of rank 4 (batch, heads, sequence, size) or 3 (batch·heads, sequence, size;
  unsqueezed to rank 4 around the fused op); a scalar constant on Q or Kᵀ is folded into
  the scale; Kᵀ is un-transposed (a Transpose of a Transpose cancels in simplification).

Every term of ``f`` that is not the plain scale is carried in the bias, mapped back to the
products' layout when the walk went through a Reshape. Other non-affine transforms are
refused with a reason, as is anything else: the reason for every attention Softmax left
unfused is reported (:func:`fuse_all`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common is used below; importing onnx_ir alone does not load it

from tfgraph import ops
from tfgraph.passes import attention_einsum

MASK_FILL_LIMIT = -1e4
CLAMP_FLOOR_LIMIT = -1e30  # Max(scores, c) with c at most this is a clamp of -inf, a no-op for the softmax
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
    softcap: float = 0.0  # c of c·tanh(scores/c) before the bias (0: none)


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


def _lowest(value: ir.Value) -> float | None:
    """The most negative finite value of ``value``'s float type (fp16's -65504 is a clamp of -inf too)."""
    if value.dtype is None or not value.dtype.is_floating_point():
        return None
    try:
        import ml_dtypes  # finfo of bfloat16 and the float8 types

        return float(ml_dtypes.finfo(value.dtype.numpy()).min)
    except (ImportError, ValueError, TypeError):
        return None


def _softcap(path: list, scale: float) -> tuple[float, float]:
    """(scale, softcap) of a path holding ``c·tanh(s·scores/c)``: scale ``s`` before the Tanh (``scale``
    holds it), only scalar factors after it up to the first bias, their product ``c > 0``."""
    tanh = [position for position, (node, _) in enumerate(path) if node.op_type == "Tanh"]
    if not tanh:
        return scale, 0.0
    if len(tanh) > 1:
        raise Refused("more than one Tanh between MatMul(Q, Kᵀ) and the Softmax")
    before, after = path[:tanh[0]], path[tanh[0] + 1:]
    if any(n.op_type not in ("Mul", "Div", "Cast", "Identity") for n, _ in before):
        raise Refused("a bias, mask or reshape before the tanh soft-capping (the op caps the scaled scores only)")
    cap, capping = 1.0, True
    for node, i in after:
        if node.op_type not in ("Mul", "Div"):
            capping = capping and node.op_type in ("Cast", "Identity")
            continue
        factor = _scalar(node.inputs[1 - i])
        if factor is None or not capping:
            raise Refused("a factor after the tanh soft-capping that is not its cap")
        cap *= factor if node.op_type == "Mul" else 1.0 / factor
    if not cap > 0.0:
        raise Refused("tanh soft-capping with a cap that is not positive")
    return scale * cap, cap


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
    if op == "Max" and len(node.inputs) == 2:
        for i in (0, 1):
            floor = _scalar(node.inputs[1 - i])
            if floor is not None and (floor <= CLAMP_FLOOR_LIMIT or floor == _lowest(node.inputs[i])):
                core, path = _walk_up(node.inputs[i], depth + 1)
                return core, path + [(node, i)]
        raise Refused(f"Max before the Softmax with a floor above {CLAMP_FLOOR_LIMIT:g} (not a clamp of -inf)")
    if op == "Einsum":
        raise Refused("the scores come from an Einsum that is not a batched matrix product", node)
    if op == "Tanh":
        core, path = _walk_up(node.inputs[0], depth + 1)
        return core, path + [(node, 0)]
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
    tanh = next((position for position, (n, _) in enumerate(path) if n.op_type == "Tanh"), len(path))
    for position, (node, i) in enumerate(path[:tanh]):
        if node.op_type in ("Mul", "Div"):
            factor = _scalar(node.inputs[1 - i])
            if factor is None:  # a (…, 1) tensor: onto Q, in the layout of Q·Kᵀ
                if any(n.op_type in _RESHAPES for n, _ in path[:position]):
                    raise Refused("a per-row factor of the scores after a Reshape")
                q_factors.append((node.op_type, node.inputs[1 - i]))
                continue
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
    scale, softcap = _softcap(path, scale)
    for node, i in path:
        if node.op_type == "Where" and zero_fill is not None and (node.inputs[0] is not zero_fill or i != 2):
            raise Refused("the Where after the Softmax zeroes other positions than the mask before it")
    if zero_fill is not None and not any(n.op_type == "Where" for n, _ in path):
        raise Refused("a Where after the Softmax zeroes positions no mask before it hides")
    return Block(softmax, core, pv, q, kt, path, scale, zero_fill, regroup, q_factors, softcap)


def _attention_softmaxes(graph) -> list[ir.Node]:
    from tfgraph.analysis import _reaches_matmul_downstream, _reaches_matmul_upstream

    return [n for n in graph if n.op_type == "Softmax" and n.domain == "" and ops.attention_form(n) is None
            and _reaches_matmul_upstream(n.inputs[0]) and _reaches_matmul_downstream(n.outputs[0])]


def fuse_all(model: ir.Model) -> tuple[int, list[dict]]:
    """Fuse every attention Softmax of the model (subgraphs included) the walker can take.

    Returns (blocks fused, [{"softmax": name, "reason": why} for each attention Softmax left])."""
    from tfgraph.passes import attention_softmax_rewrite  # it imports Block from here
    count, left, softcap = 0, [], False
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
            if block.softcap and model.opset_imports.get("", 18) < ops.GUARD_MIN_OPSET:
                left.append({"softmax": softmax.name or "", "reason": "tanh soft-capping below opset "
                             f"{ops.GUARD_MIN_OPSET} (the op's soft-capping body needs CastLike)"})
                continue
            attention_softmax_rewrite.rewrite(graph, block)
            count += 1
            softcap = softcap or bool(block.softcap)
    if count:
        ops.ensure_defined(model, "AttentionBHSD", softcap=softcap)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count, left
