"""Pruning: find attention heads and FFN neurons in a graph, score them, zero the weakest.

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
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError

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


# ---------------------------------------------------------------------------------------------
# Normalized copy, scoring, zeroing
# ---------------------------------------------------------------------------------------------


def normalized_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with the cpu-fp32 cleanup and attention fusion applied (no verification)."""
    from tfgraph.targets.cpu import CLEANUP, FUSION

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for spec in CLEANUP + FUSION:
        if spec.name != "shrink-pruned":  # zeroed weights must stay findable in the original
            spec.create()(copy)
    return copy


def _digest(array: np.ndarray) -> tuple:
    return (str(array.dtype), tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())


class _Locator:
    """Finds the original model's initializers that hold a tensor of the normalized copy (or its transpose)."""

    def __init__(self, model: ir.Model):
        self.index: dict[tuple, list[ir.Value]] = {}
        for graph in model.graphs():
            for value in graph.initializers.values():
                if value.const_value is not None and not value.is_graph_input():
                    self.index.setdefault(_digest(value.const_value.numpy()), []).append(value)
        self.cache: dict[int, list[tuple[ir.Value, bool]]] = {}

    def find(self, value: ir.Value) -> list[tuple[ir.Value, bool]]:
        if id(value) not in self.cache:
            array = value.const_value.numpy()
            found = [(v, False) for v in self.index.get(_digest(array), [])]
            if array.ndim == 2:
                found += [(v, True) for v in self.index.get(_digest(array.T), [])]
            self.cache[id(value)] = found
        return self.cache[id(value)]


def _set_tensor(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _zero(value: ir.Value, index: tuple) -> None:
    array = value.const_value.numpy().copy()
    array[index] = 0
    _set_tensor(value, array)


def _zero_ops_attention(unit: AttentionUnit, h: int) -> list[tuple[ir.Value, tuple, int]]:
    """(value, index expression, axis of a 2-D weight) triples that zero head ``h``."""
    ops = []
    for block, d in ((unit.q, unit.qk_dim), (unit.k, unit.qk_dim), (unit.v, unit.v_dim)):
        cols = slice(block.offset + h * d, block.offset + (h + 1) * d)
        node, i = block.weight
        ops.append((node.inputs[i], (slice(None), cols)))
        if block.bias is not None:
            node, i = block.bias
            ops.append((node.inputs[i], (cols,)))
    ops.append((unit.out.inputs[1], (slice(h * unit.v_dim, (h + 1) * unit.v_dim), slice(None))))
    return ops


def _zero_ops_ffn(unit: FFNUnit, j: int) -> list[tuple[ir.Value, tuple]]:
    ops = [(u.inputs[1], (slice(None), j)) for u in unit.ups]
    ops += [(node.inputs[i], (Ellipsis, j)) for node, i in unit.vectors]
    ops.append((unit.down.inputs[1], (j, slice(None))))
    return ops


def _apply(ops: list[tuple[ir.Value, tuple]], locator: _Locator | None) -> int:
    """Zero in the normalized copy and, through ``locator``, in the original; returns the originals touched."""
    touched = 0
    for value, index in ops:
        targets = locator.find(value) if locator is not None else []
        _zero(value, index)
        for original, transposed in targets:
            idx = index
            if transposed:
                idx = tuple(reversed(index)) if len(index) == 2 else index
            _zero(original, idx)
            touched += 1
    return touched


def _norm(arrays: list[np.ndarray], score: str) -> float:
    if score == "l1":
        return float(sum(np.abs(a).sum(dtype=np.float64) for a in arrays))
    return float(math.sqrt(sum(np.square(a, dtype=np.float64).sum() for a in arrays)))


def _activation_scores(copy: ir.Model, att_groups, ffn_groups, feeds) -> tuple[dict, dict]:
    from tfgraph.verify import run

    extra = []
    for units in att_groups.values():
        extra += [u.node.outputs[0] for u in units]
    for units in ffn_groups.values():
        extra += [u.down.inputs[0] for u in units]
    names = {v.name for v in copy.graph.outputs}
    added = [v for v in dict.fromkeys(extra) if v.name not in names]
    copy.graph.outputs.extend(added)
    try:
        outputs = run(copy, feeds)
    finally:
        for _ in added:
            copy.graph.outputs.pop()
    head_scores, neuron_scores = {}, {}
    for key, units in att_groups.items():
        total = np.zeros(units[0].num_heads)
        for u in units:
            ctx = np.abs(outputs[u.node.outputs[0].name].astype(np.float64))
            ctx = ctx.reshape(-1, u.num_heads, u.v_dim).mean(axis=0).sum(axis=1)
            w = u.out.inputs[1].const_value.numpy().reshape(u.num_heads, u.v_dim, -1)
            total += ctx * np.sqrt(np.square(w, dtype=np.float64).sum(axis=(1, 2)))
        head_scores[key] = total
    for key, units in ffn_groups.items():
        total = np.zeros(units[0].width)
        for u in units:
            act = np.abs(outputs[u.down.inputs[0].name].astype(np.float64)).reshape(-1, u.width).mean(axis=0)
            w = u.down.inputs[1].const_value.numpy()
            total += act * np.sqrt(np.square(w, dtype=np.float64).sum(axis=1))
        neuron_scores[key] = total
    return head_scores, neuron_scores


def _weight_scores(att_groups, ffn_groups, score: str) -> tuple[dict, dict]:
    head_scores = {
        key: np.array([sum(_norm(u.head_arrays(h), score) for u in units) for h in range(units[0].num_heads)])
        for key, units in att_groups.items()
    }
    neuron_scores = {}
    for key, units in ffn_groups.items():
        total = np.zeros(units[0].width)
        for u in units:
            parts = [np.abs(u.ups[i].inputs[1].const_value.numpy()) for i in range(len(u.ups))]
            down = np.abs(u.down.inputs[1].const_value.numpy())
            if score == "l1":
                s = sum(p.sum(axis=0, dtype=np.float64) for p in parts) + down.sum(axis=1, dtype=np.float64)
                s += sum(np.abs(node.inputs[i].const_value.numpy()).reshape(-1) for node, i in u.vectors) if u.vectors else 0
            else:
                s = sum(np.square(p, dtype=np.float64).sum(axis=0) for p in parts) + np.square(down, dtype=np.float64).sum(axis=1)
                s += sum(np.square(node.inputs[i].const_value.numpy().reshape(-1), dtype=np.float64) for node, i in u.vectors) if u.vectors else 0
                s = np.sqrt(s)
            total += s
        neuron_scores[key] = total
    return head_scores, neuron_scores


def _dead_heads(unit: AttentionUnit) -> list[bool]:
    return [all(not np.any(a) for a in unit.head_arrays(h)) for h in range(unit.num_heads)]


def _dead_neurons(unit: FFNUnit) -> np.ndarray:
    dead = ~np.any(unit.down.inputs[1].const_value.numpy(), axis=1)
    for u in unit.ups:
        dead &= ~np.any(u.inputs[1].const_value.numpy(), axis=0)
    return dead


def parse_schedule(schedule: str | float | Sequence[float] | None, target: float) -> list[float]:
    """Fractions to prune at, ending at ``target``: None → one step; a float step s → s, 2s, … target;
    a comma list → those fractions (then the target)."""
    if target <= 0:
        return [0.0]
    if schedule in (None, "", "none", "oneshot"):
        return [target]
    if isinstance(schedule, str):
        parts = [p for p in schedule.replace(";", ",").split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise BadInputError(f"bad pruning schedule {schedule!r}: a step (0.1) or fractions (0.1,0.2,0.3)") from None
        schedule = numbers[0] if len(numbers) == 1 else numbers
    if isinstance(schedule, (int, float)):
        step = float(schedule)
        if not 0 < step <= 1:
            raise BadInputError(f"schedule step must be in (0, 1], got {step}")
        steps, k = [], 1
        while k * step < target - 1e-9:
            steps.append(round(k * step, 6))
            k += 1
        return steps + [target]
    steps = sorted(float(s) for s in schedule if 0 < float(s) < target)
    return steps + [target]


def _choose(scores: dict, fraction: float, scope: str, already: dict) -> dict:
    """Indices to zero per group: the lowest-scoring ``fraction`` of all units (keeping one per group)."""
    chosen = {key: set(already.get(key, ())) for key in scores}
    if fraction <= 0:
        return chosen
    if scope == "layer":
        for key, s in scores.items():
            n = max(min(int(round(fraction * len(s))), len(s) - 1), len(chosen[key]))
            order = sorted(range(len(s)), key=lambda i: (i not in chosen[key], s[i], i))
            chosen[key] = set(order[:n])
        return chosen
    total = sum(len(s) for s in scores.values())
    n = int(round(fraction * total))
    ranked = sorted(((s[i], key, i) for key, s in scores.items() for i in range(len(s)) if i not in chosen[key]),
                    key=lambda t: (t[0], str(t[1]), t[2]))
    count = sum(len(c) for c in chosen.values())
    for _, key, i in ranked:
        if count >= n:
            break
        if len(chosen[key]) >= len(scores[key]) - 1:
            continue  # every layer keeps at least one head / neuron
        chosen[key].add(i)
        count += 1
    return chosen


def _group(units, key_fn) -> dict:
    groups: dict = {}
    for u in units:
        groups.setdefault(key_fn(u), []).append(u)
    return groups


def prune_structured(
    model: ir.Model,
    *,
    heads: float = 0.0,
    neurons: float = 0.0,
    score: str = "l2",
    schedule: str | float | Sequence[float] | None = None,
    scope: str = "global",
    calibration: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero the least important ``heads`` fraction of attention heads and ``neurons`` fraction of FFN
    neurons of ``model`` in place; returns a report.

    ``score``: ``l1``/``l2`` (norm of every weight a head/neuron owns) or ``activation``
    (mean |output| on ``calibration`` inputs — generated from the signature at ``shapes``
    when not given — times the norm of its output-projection rows). ``scope``: ``global``
    (rank across layers: per-layer counts differ) or ``layer`` (the same fraction in every
    layer). ``schedule``: prune gradually (scores recomputed after every step on the
    partially pruned model), see :func:`parse_schedule`. Every layer keeps at least one
    head and one neuron.
    """
    if score not in SCORES:
        raise BadInputError(f"unknown pruning score {score!r}; choose one of {', '.join(SCORES)}")
    if scope not in ("global", "layer"):
        raise BadInputError(f"unknown pruning scope {scope!r}; choose global or layer")
    for name, fraction in (("heads", heads), ("neurons", neurons)):
        if not 0 <= fraction < 1:
            raise BadInputError(f"{name} fraction must be in [0, 1), got {fraction}")
    copy = normalized_copy(model)
    att_units = attention_units(copy)
    ffn = ffn_units(copy)
    att_groups = _group(att_units, AttentionUnit.key)
    ffn_groups = _group(ffn, FFNUnit.key)
    locator = _Locator(model)
    feeds = None
    if score == "activation":
        from tfgraph.verify import check_feeds, generate_inputs

        feeds = check_feeds(calibration, copy) if calibration is not None else generate_inputs(copy, shapes, seed=seed)
    head_plan = parse_schedule(schedule, heads)
    neuron_plan = parse_schedule(schedule, neurons)
    steps = max(len(head_plan), len(neuron_plan))
    head_plan = head_plan + [head_plan[-1]] * (steps - len(head_plan))
    neuron_plan = neuron_plan + [neuron_plan[-1]] * (steps - len(neuron_plan))
    pruned_heads: dict = {}
    pruned_neurons: dict = {}
    step_reports = []
    for h_frac, n_frac in zip(head_plan, neuron_plan):
        if feeds is not None:
            h_scores, n_scores = _activation_scores(copy, att_groups, ffn_groups, feeds)
        else:
            h_scores, n_scores = _weight_scores(att_groups, ffn_groups, score)
        new_heads = _choose(h_scores, h_frac, scope, pruned_heads) if att_groups else {}
        new_neurons = _choose(n_scores, n_frac, scope, pruned_neurons) if ffn_groups else {}
        for key, chosen in new_heads.items():
            for h in sorted(chosen - pruned_heads.get(key, set())):
                for unit in att_groups[key]:
                    _apply(_zero_ops_attention(unit, h), locator)
        for key, chosen in new_neurons.items():
            for j in sorted(chosen - pruned_neurons.get(key, set())):
                for unit in ffn_groups[key]:
                    _apply(_zero_ops_ffn(unit, j), locator)
        pruned_heads, pruned_neurons = new_heads, new_neurons
        step_reports.append(
            {
                "heads": h_frac,
                "neurons": n_frac,
                "heads_pruned": sum(len(c) for c in pruned_heads.values()),
                "neurons_pruned": sum(len(c) for c in pruned_neurons.values()),
            }
        )
    total_heads = sum(units[0].num_heads for units in att_groups.values())
    total_neurons = sum(units[0].width for units in ffn_groups.values())
    return {
        "score": score,
        "scope": scope,
        "schedule": step_reports,
        "attention_blocks": len(att_units),
        "ffn_blocks": len(ffn),
        "heads_total": total_heads,
        "heads_pruned": sum(len(c) for c in pruned_heads.values()),
        "neurons_total": total_neurons,
        "neurons_pruned": sum(len(c) for c in pruned_neurons.values()),
        "per_layer": [
            {
                "block": units[0].name,
                "uses": len(units),
                "heads": units[0].num_heads,
                "pruned_heads": sorted(int(h) for h in pruned_heads.get(key, ())),
            }
            for key, units in att_groups.items()
        ]
        + [
            {
                "block": units[0].name,
                "uses": len(units),
                "neurons": units[0].width,
                "pruned_neurons": len(pruned_neurons.get(key, ())),
            }
            for key, units in ffn_groups.items()
        ],
    }


def zero_heads(model: ir.Model, heads: Mapping[int, Sequence[int]]) -> int:
    """Zero the given heads of the given attention blocks (index in graph order) in place; returns heads zeroed."""
    copy = normalized_copy(model)
    units = attention_units(copy)
    locator = _Locator(model)
    count = 0
    for index, hs in heads.items():
        if not 0 <= index < len(units):
            raise BadInputError(f"attention block {index} does not exist ({len(units)} found)")
        for h in hs:
            _apply(_zero_ops_attention(units[index], int(h)), locator)
            count += 1
    return count


def magnitude_prune(model: ir.Model, sparsity: float, *, min_size: int = 1024) -> dict[str, Any]:
    """Unstructured magnitude pruning in place: zero the smallest-|w| ``sparsity`` fraction of every
    constant 2-D float MatMul/Gemm weight (per tensor). Dense kernels do not get smaller or
    faster from this; the report says how sparse the weights are."""
    if not 0 <= sparsity < 1:
        raise BadInputError(f"sparsity must be in [0, 1), got {sparsity}")
    weights: dict[int, ir.Value] = {}
    for graph in model.graphs():
        for node in graph:
            if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
                for inp in node.inputs[:2]:
                    data = _const(inp)
                    if data is not None and data.ndim == 2 and data.dtype.kind == "f" and data.size >= min_size:
                        weights[id(inp)] = inp
    total = zeros_before = zeros_after = changed = 0
    for value in weights.values():
        array = value.const_value.numpy()
        total += array.size
        zeros_before += int(array.size - np.count_nonzero(array))
        k = int(math.floor(sparsity * array.size))
        if k > 0:
            threshold = np.partition(np.abs(array).reshape(-1), k - 1)[k - 1]
            mask = np.abs(array) <= threshold
            # Ties at the threshold: keep exactly k zeros (the first ones in order).
            if mask.sum() > k:
                flat = mask.reshape(-1)
                extra = np.flatnonzero(flat & (np.abs(array).reshape(-1) == threshold))
                flat[extra[: int(mask.sum() - k)]] = False
                mask = flat.reshape(array.shape)
            pruned = np.where(mask, np.zeros((), array.dtype), array)
            if not np.array_equal(pruned, array):
                _set_tensor(value, pruned)
                changed += 1
            array = pruned
        zeros_after += int(array.size - np.count_nonzero(array))
    return {
        "tensors": len(weights),
        "tensors_changed": changed,
        "parameters": total,
        "sparsity_before": zeros_before / total if total else 0.0,
        "sparsity_after": zeros_after / total if total else 0.0,
        "note": "unstructured: weights are zeroed, dense kernels keep their size and speed",
    }


class RebaselineInstrument:
    """For passes that change the outputs on purpose (``changes_outputs = True``: pruning): record how
    much they changed, then make the pruned model the reference the following passes are verified
    against. Placed before the numeric-diff instrument it rebaselines."""

    def __init__(self, numeric, feeds: Mapping[str, np.ndarray]):
        self.numeric = numeric
        self.feeds = dict(feeds)

    def before_pipeline(self, model):
        pass

    def before_pass(self, pass_, record, model):
        pass

    def after_pass(self, pass_, record, model):
        if not record.modified or not getattr(pass_, "changes_outputs", False):
            return
        from tfgraph.verify import UNOPTIMIZED, compare, run

        outputs = run(model, self.feeds, options=UNOPTIMIZED)
        diffs = compare(self.numeric.reference, outputs, atol=self.numeric.atol, rtol=self.numeric.rtol)
        record.extra["output_change"] = {d.name: d.to_json() for d in diffs}
        self.numeric.reference = outputs

    def after_pipeline(self, model):
        pass
