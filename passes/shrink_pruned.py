"""Pruning-aware constant folding: physically remove attention heads and FFN neurons that are zero."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph import prune
from tfgraph.passes.dedup_initializers import DedupInitializersPass
from tfgraph.passes.registry import register_pass


def _set_last_dim(value: ir.Value, size: int) -> None:
    if value.shape is not None and len(value.shape) >= 1:
        dims = list(value.shape)
        dims[-1] = size
        value.shape = ir.Shape(dims)


class _Editor:
    """Collects index removals per (consumer node, input index) and applies each once, as a new initializer."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.removals: dict[tuple[int, int], tuple[ir.Node, int, int, set[int]]] = {}
        self.replaced: list[ir.Value] = []

    def remove(self, node: ir.Node, index: int, axis: int, positions) -> None:
        key = (id(node), index)
        entry = self.removals.setdefault(key, (node, index, axis, set()))
        assert entry[2] == axis
        entry[3].update(int(p) for p in positions)

    def new_width(self, node: ir.Node, index: int, axis: int) -> int:
        size = node.inputs[index].const_value.shape[axis]
        entry = self.removals.get((id(node), index))
        return int(size) - (len(entry[3]) if entry else 0)

    def _unique(self, stem: str) -> str:
        name, k = f"{stem}.shrunk", 1
        while name in self.graph.initializers:
            k += 1
            name = f"{stem}.shrunk{k}"
        return name

    def replace(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        value = ir.Value(name=self._unique(old.name), const_value=ir.tensor(np.ascontiguousarray(array)))
        self.graph.register_initializer(value)
        node.replace_input_with(index, value)
        self.replaced.append(old)

    def apply(self) -> None:
        for node, index, axis, positions in self.removals.values():
            if positions:
                array = node.inputs[index].const_value.numpy()
                self.replace(node, index, np.delete(array, sorted(positions), axis=axis))
        for old in self.replaced:
            if not old.uses() and old.name in self.graph.initializers and not old.is_graph_output():
                self.graph.initializers.pop(old.name)


def _dead_heads(unit: prune.AttentionUnit) -> list[int]:
    """Heads whose contribution to the output is exactly zero: their output-projection rows are zero, or
    their V columns and V bias are (then their context is zero whatever the attention weights)."""
    w_out = unit.out.inputs[1].const_value.numpy()
    v_w = unit.v.weight_array()
    v_b = unit.v.bias_array()
    d = unit.v_dim
    dead = []
    for h in range(unit.num_heads):
        rows = slice(h * d, (h + 1) * d)
        if not np.any(w_out[rows]) or (not np.any(v_w[:, rows]) and (v_b is None or not np.any(v_b[rows]))):
            dead.append(h)
    if len(dead) == unit.num_heads:
        dead = dead[1:]  # keep one head: an attention op needs one (it contributes zero)
    return dead


def _shrink_attention(graph: ir.Graph, editor: _Editor, unit: prune.AttentionUnit, dead: list[int], splits: dict) -> None:
    blocks = ((unit.q, unit.qk_dim), (unit.k, unit.qk_dim), (unit.v, unit.v_dim))
    removed_per_block = []
    for block, d in blocks:
        cols = [block.offset + h * d + i for h in dead for i in range(d)]
        node, i = block.weight
        editor.remove(node, i, 1, cols)
        if block.bias is not None:
            node, i = block.bias
            editor.remove(node, i, 0, cols)
        removed_per_block.append(len(cols))
    rows = [h * unit.v_dim + i for h in dead for i in range(unit.v_dim)]
    editor.remove(unit.out, 1, 0, rows)
    heads = unit.num_heads - len(dead)
    node = unit.node
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
    widths = [b.width - r for (b, _), r in zip(blocks, removed_per_block)]
    if node.domain == "com.microsoft" and node.op_type == "Attention" and "qkv_hidden_sizes" in node.attributes:
        node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", widths)
    for (block, _), width in zip(blocks, widths):
        for value in block.values:
            _set_last_dim(value, width)
        if block.split is not None:
            split, index = block.split
            splits.setdefault(id(split), (split, {}))[1][index] = width
    _set_last_dim(node.outputs[0], widths[2])


def _fix_packed(editor: _Editor, units: list[prune.AttentionUnit], splits: dict) -> None:
    """Split sizes and packed-value shapes once every unit's removals are known."""
    for unit in units:
        for block in (unit.q, unit.k, unit.v):
            if block.packed_values:
                node, i = block.weight
                width = editor.new_width(node, i, 1)
                for value in block.packed_values:
                    _set_last_dim(value, width)
    for node, widths in splits.values():
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = node.inputs[1].const_value.numpy().copy()
        else:
            sizes = np.array([v.shape[-1] for v in node.outputs], dtype=np.int64)
        for index, width in widths.items():
            sizes[index] = width
        sizes = sizes.astype(np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            editor.replace(node, 1, sizes)
            continue
        # Equal split by attribute: sizes become an input (opset >= 13), the attributes go.
        node.attributes.pop("num_outputs", None)
        node.attributes.pop("split", None)
        value = ir.Value(name=editor._unique(f"{node.outputs[0].name}.split_sizes"), const_value=ir.tensor(sizes))
        editor.graph.register_initializer(value)
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, value)


def _dead_neurons(unit: prune.FFNUnit) -> list[int]:
    """Neurons whose down-projection row is zero: they add exactly zero to the output."""
    dead = np.flatnonzero(~np.any(unit.down.inputs[1].const_value.numpy(), axis=1)).tolist()
    if len(dead) == unit.width:
        dead = dead[1:]
    return dead


def _shrink_ffn(editor: _Editor, unit: prune.FFNUnit, dead: list[int]) -> None:
    for up in unit.ups:
        editor.remove(up, 1, 1, dead)
    for node, i in unit.vectors:
        editor.remove(node, i, node.inputs[i].const_value.numpy().ndim - 1, dead)
    editor.remove(unit.down, 1, 0, dead)
    for value in unit.values:
        _set_last_dim(value, unit.width - len(dead))


@register_pass("shrink-pruned")
class ShrinkPrunedPass(ir.passes.InPlacePass):
    """Remove zeroed attention heads and FFN neurons: slice Q/K/V columns, biases and output-projection rows,
    update ``num_heads`` (and ``qkv_hidden_sizes``, packed Split sizes); slice FFN up columns, biases and
    down rows. Exact: a removed head or neuron contributed zero.

    Works on fused attention (``tfgraph.Attention``, ``com.microsoft.Attention`` /
    ``MultiHeadAttention``), with or without packed projections; FFN blocks in any graph.
    Heads of unfused attention are left alone (run it after ``fuse-attention``).
    """

    def __init__(self, *, heads: bool = True, neurons: bool = True):
        super().__init__()
        self.heads = heads
        self.neurons = neurons
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed_heads = removed_neurons = blocks = 0
        for graph in model.graphs():
            if self.heads:
                editor = _Editor(graph)
                units = [u for u in prune.attention_units(model) if u.node.graph is graph]
                plan = [(u, _dead_heads(u)) for u in units]
                plan = [(u, dead) for u, dead in plan if dead]
                splits: dict = {}
                for unit, dead in plan:
                    _shrink_attention(graph, editor, unit, dead, splits)
                    removed_heads += len(dead)
                    blocks += 1
                _fix_packed(editor, [u for u, _ in plan], splits)
                editor.apply()
            if self.neurons:
                editor = _Editor(graph)
                for unit in prune.ffn_units(model):
                    if unit.down.graph is not graph:
                        continue
                    dead = _dead_neurons(unit)
                    if dead:
                        _shrink_ffn(editor, unit, dead)
                        removed_neurons += len(dead)
                        blocks += 1
                editor.apply()
        modified = blocks > 0
        if modified:
            DedupInitializersPass()(model)  # shared layers shrink to identical copies: store them once
        self.report = {"shrink": {"matches": blocks, "heads_removed": removed_heads, "neurons_removed": removed_neurons}}
        return ir.passes.PassResult(model, modified)
