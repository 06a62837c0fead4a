"""The rewrite half of :mod:`tfgraph.passes.attention_softmax`: a found :class:`Block` becomes one
``tfgraph.AttentionBHSD`` (the score function's terms as its additive bias, (…, 1) factors on Q,
the operands brought to (batch, heads, sequence, size))."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph import ops
from tfgraph.passes.attention_softmax import _RESHAPES, Block, _rank, _same_dim


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
    attributes = {"scale": float(block.scale), "mask_kind": kind}
    if block.softcap:
        attributes["softcap"] = float(block.softcap)
    fused = ir.node("AttentionBHSD", [q, k, v, bias], attributes=attributes, domain=ops.DOMAIN)
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
