"""Pruning, part 1: attention heads and FFN neurons found in a graph (what the pruning passes act on).

Structure is read off the graph, not off a config:

* an **attention unit** is a fused attention op (``tfgraph.Attention``,
  ``com.microsoft.MultiHeadAttention`` on projected Q/K/V, or packed
  ``com.microsoft.Attention``) whose Q, K and V are column blocks of constant
  projection weights (``MatMul`` with a constant 2-D weight, an optional constant bias
  ``Add``, optionally a ``Split`` of a packed projection, optionally a multiplication
  by a scalar) and whose output feeds one output projection ``MatMul``. Head ``h`` owns
  columns ``h·d … (h+1)·d`` of Q, K and V and the same rows of the output projection.
* an **FFN unit** is a ``MatMul`` with a constant 2-D weight (the down projection)
  whose input is computed, through element-wise operators only (activation, gates,
  biases, scalar constants), from one or more up-projection ``MatMul``\\ s with constant
  weights of the same width ``F``. Neuron ``j`` owns column ``j`` of every up weight
  and bias and row ``j`` of the down weight.

Raw exports are read through a normalized copy (the cpu-fp32 target's cleanup and
attention-fusion passes, run without verification); the weights found there are
located in the original model by content (a weight or its transpose), so the model
written is the input model with the pruned heads/neurons zeroed — nothing else
changes. :mod:`tfgraph.passes.shrink_pruned` later removes what is zero.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import onnx_ir as ir

SCORES = ("l1", "l2", "activation")

ATTENTION_OPS = {("tfgraph", "Attention"), ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "Attention")}

# Element-wise operators an FFN's activation/gating may be built from (inputs broadcast, no mixing of positions).
ELEMENTWISE = frozenset(
    {
        ("", op)
        for op in (
            "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Relu", "Sigmoid", "Gelu", "Pow", "Sqrt", "Neg", "Exp",
            "Abs", "Softplus", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Clip",
            "Identity", "Max", "Min",
        )
    }
    | {("com.microsoft", op) for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")}
)
_MAX_REGION = 64


# ---------------------------------------------------------------------------------------------
# Structure discovery
# ---------------------------------------------------------------------------------------------


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


@dataclasses.dataclass
class Block:
    """Columns ``offset … offset+width`` of a constant 2-D projection weight (and its 1-D bias)."""

    weight: tuple[ir.Node, int]  # (consumer, input index) of the weight
    bias: tuple[ir.Node, int] | None  # (consumer, input index) of the bias, if any
    offset: int
    width: int
    values: list[ir.Value]  # intermediate values whose last dimension is this block's width (packed: none)
    split: tuple[ir.Node, int] | None = None  # (Split node, output index) for packed projections
    packed_values: list[ir.Value] = dataclasses.field(default_factory=list)  # values as wide as the packed weight

    def weight_array(self) -> np.ndarray:
        node, i = self.weight
        return node.inputs[i].const_value.numpy()[:, self.offset : self.offset + self.width]

    def bias_array(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        node, i = self.bias
        return node.inputs[i].const_value.numpy()[self.offset : self.offset + self.width]


def _projection(value: ir.Value) -> Block | None:
    """Q/K/V as columns of a constant projection: ``[Mul scalar] ∘ [Split] ∘ [Add b] ∘ MatMul(x, W)``."""
    values = [value]
    node = value.producer()
    # A scalar scale folded onto Q or K (SDPA exports) keeps columns where they are.
    while node is not None and node.domain == "" and node.op_type in ("Mul", "Div"):
        data = _const(node.inputs[1])
        if data is None or data.size != 1 or _single_use(node.inputs[0]) is not node:
            return None
        values.append(node.inputs[0])
        node = node.inputs[0].producer()
    split = None
    if node is not None and node.domain == "" and node.op_type == "Split":
        index = list(node.outputs).index(values[-1])
        axis = node.attributes.get_int("axis", 0)
        sizes = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        packed = node.inputs[0]
        rank = len(packed.shape) if packed.shape is not None else None
        if sizes is None and (len(node.inputs) < 2 or node.inputs[1] is None):
            # Equal parts (num_outputs, or the pre-13 'split' attribute): the sizes follow from the width.
            listed = node.attributes.get_ints("split", None)
            width = packed.shape[-1] if rank else None
            if listed:
                sizes = np.array(listed, dtype=np.int64)
            elif isinstance(width, int) and width % len(node.outputs) == 0:
                sizes = np.full(len(node.outputs), width // len(node.outputs), dtype=np.int64)
        if sizes is None or rank is None or axis not in (-1, rank - 1) or _single_use(packed) is not node:
            return None
        split = (node, index)
        offset, width = int(sum(sizes[:index])), int(sizes[index])
        inner = _projection(packed)
        if inner is None:
            return None
        return Block(inner.weight, inner.bias, inner.offset + offset, width, values, split, list(inner.values))
    bias = None
    if node is not None and node.domain == "" and node.op_type == "Add":
        for i in (0, 1):
            data = _const(node.inputs[1 - i])
            if data is not None and data.ndim == 1 and node.inputs[i].producer() is not None:
                bias = (node, 1 - i)
                if _single_use(node.inputs[i]) is not node:
                    return None
                values.append(node.inputs[i])
                node = node.inputs[i].producer()
                break
        else:
            return None
    if node is None or node.domain != "" or node.op_type != "MatMul":
        return None
    weight = _const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if bias is not None and bias[0].inputs[bias[1]].const_value.shape[0] != weight.shape[1]:
        return None
    return Block((node, 1), bias, 0, int(weight.shape[1]), values)


@dataclasses.dataclass
class AttentionUnit:
    node: ir.Node
    num_heads: int
    q: Block
    k: Block
    v: Block
    out: ir.Node  # the output projection MatMul (weight at input 1, rows = heads)
    name: str = ""

    @property
    def qk_dim(self) -> int:
        return self.q.width // self.num_heads

    @property
    def v_dim(self) -> int:
        return self.v.width // self.num_heads

    def head_arrays(self, h: int) -> list[np.ndarray]:
        """Every weight/bias slice head ``h`` owns (Q, K, V columns and biases, output rows)."""
        arrays = []
        for block, d in ((self.q, self.qk_dim), (self.k, self.qk_dim), (self.v, self.v_dim)):
            arrays.append(block.weight_array()[:, h * d : (h + 1) * d])
            b = block.bias_array()
            if b is not None:
                arrays.append(b[h * d : (h + 1) * d])
        arrays.append(self.out.inputs[1].const_value.numpy()[h * self.v_dim : (h + 1) * self.v_dim])
        return arrays

    def key(self) -> tuple:
        """Units with this key share their weights (shared layers): they are pruned together."""
        return tuple((id(b.weight[0].inputs[b.weight[1]]), b.offset) for b in (self.q, self.k, self.v)) + (
            id(self.out.inputs[1]),
        )


def _ms_attention_blocks(node: ir.Node) -> tuple[Block, Block, Block] | None:
    weight = _const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    total = weight.shape[1]
    sizes = list(sizes) if sizes else [total // 3] * 3
    if sum(sizes) != total:
        return None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and _const(node.inputs[2]) is not None
    offsets = [0, sizes[0], sizes[0] + sizes[1]]
    return tuple(
        Block((node, 1), (node, 2) if has_bias else None, o, s, []) for o, s in zip(offsets, sizes)
    )  # type: ignore[return-value]


def attention_units(model: ir.Model) -> list[AttentionUnit]:
    """The attention blocks of a fused graph whose heads can be pruned and removed."""
    units = []
    for graph in model.graphs():
        for node in graph:
            if (node.domain, node.op_type) not in ATTENTION_OPS:
                continue
            heads = node.attributes.get_int("num_heads", 0)
            if heads <= 0:
                continue
            if node.op_type == "Attention" and node.domain == "com.microsoft":
                blocks = _ms_attention_blocks(node)
                if blocks is None or any(len(node.inputs) > i and node.inputs[i] is not None for i in (3, 4, 6, 7)):
                    continue  # mask_index/past/... variants are left alone
            else:
                if len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
                    continue
                if node.domain == "com.microsoft" and any(
                    len(node.inputs) > i and node.inputs[i] is not None for i in (3, 6, 7)
                ):
                    continue  # packed bias / past key/value inputs
                blocks = tuple(_projection(v) for v in node.inputs[:3])
                if any(b is None for b in blocks) or len({id(v) for v in node.inputs[:3]}) != 3:
                    continue
                if any(_single_use(b.values[0]) is not node for b in blocks):
                    continue
            q, k, v = blocks
            if q.width != k.width or q.width % heads or v.width % heads:
                continue
            out = _single_use(node.outputs[0])
            if out is None or out.op_type != "MatMul" or out.domain != "" or out.inputs[0] is not node.outputs[0]:
                continue
            w_out = _const(out.inputs[1])
            if w_out is None or w_out.ndim != 2 or w_out.shape[0] != v.width:
                continue
            units.append(AttentionUnit(node, heads, q, k, v, out, node.name or node.outputs[0].name))
    return units


@dataclasses.dataclass
class FFNUnit:
    down: ir.Node  # MatMul, weight rows = neurons
    ups: list[ir.Node]  # MatMuls, weight columns = neurons
    vectors: list[tuple[ir.Node, int]]  # per-neuron constants inside the region (biases): (consumer, input index)
    values: list[ir.Value]  # region values whose last dimension is the width
    width: int
    name: str = ""

    def neuron_arrays(self, j: int) -> list[np.ndarray]:
        arrays = [u.inputs[1].const_value.numpy()[:, j] for u in self.ups]
        for node, i in self.vectors:
            arrays.append(node.inputs[i].const_value.numpy()[..., j])
        arrays.append(self.down.inputs[1].const_value.numpy()[j])
        return arrays

    def key(self) -> tuple:
        return tuple(id(u.inputs[1]) for u in self.ups) + (id(self.down.inputs[1]),)


def _ffn_region(down: ir.Node, width: int) -> FFNUnit | None:
    start = down.inputs[0]
    region_nodes: list[ir.Node] = []
    ups: list[ir.Node] = []
    vectors: list[tuple[ir.Node, int]] = []
    values: list[ir.Value] = []
    seen: set[int] = set()
    stack = [start]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        values.append(value)
        if value.is_graph_output() or value.is_graph_input():
            return None
        node = value.producer()
        if node is None:
            return None
        if node.domain == "" and node.op_type == "MatMul":
            w = _const(node.inputs[1])
            if w is None or w.ndim != 2 or w.shape[1] != width or node.inputs[0] is None or node.inputs[0].const_value is not None:
                return None
            ups.append(node)
            continue
        if (node.domain, node.op_type) not in ELEMENTWISE or len(node.outputs) != 1:
            return None
        region_nodes.append(node)
        if len(region_nodes) > _MAX_REGION:
            return None
        dynamic = 0
        for i, inp in enumerate(node.inputs):
            if inp is None:
                continue
            data = _const(inp)
            if data is None:
                stack.append(inp)
                dynamic += 1
            elif data.size == 1:
                continue
            elif data.ndim >= 1 and data.shape[-1] == width and data.size == width:
                vectors.append((node, i))
            else:
                return None
        if dynamic == 0:
            return None
    if not ups:
        return None
    # Nothing inside the region may be read from outside it (its width is about to change).
    inside = {id(n) for n in region_nodes} | {id(down)}
    for value in values:
        if any(id(user) not in inside for user, _ in value.uses()):
            return None
    return FFNUnit(down, ups, vectors, values, width, down.name or down.outputs[0].name)


def ffn_units(model: ir.Model) -> list[FFNUnit]:
    """Down projections fed element-wise from up projections of the same width (FFN / gated FFN blocks)."""
    units = []
    attention_outputs = {id(n.outputs[0]) for g in model.graphs() for n in g if (n.domain, n.op_type) in ATTENTION_OPS}
    for graph in model.graphs():
        for node in graph:
            if node.domain != "" or node.op_type != "MatMul" or node.inputs[0] is None:
                continue
            w = _const(node.inputs[1])
            if w is None or w.ndim != 2 or id(node.inputs[0]) in attention_outputs:
                continue
            unit = _ffn_region(node, int(w.shape[0]))
            if unit is not None and unit.width > 1:
                units.append(unit)
    return units
