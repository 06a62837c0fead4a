"""Pruning-aware constant folding: physically remove attention heads and FFN neurons that are zero."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph.passes import pruning_units as prune
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


# --- heads of unfused attention ---------------------------------------------------------------


def _maybe_pruned(graph: ir.Graph) -> bool:
    """Cheap pre-check: some constant 2-D MatMul weight has an all-zero column or row."""
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "":
            data = prune._const(node.inputs[1])
            if data is not None and data.ndim == 2 and (
                not np.all(np.any(data, axis=0)) or not np.all(np.any(data, axis=1))
            ):
                return True
    return False


def _shape_entries(value: ir.Value, shapes: dict | None = None) -> list[tuple[int | None, tuple[int, int] | None]] | None:
    """Entries of a Reshape target: (constant or None when computed, (Concat input index, position) or None)."""
    data = prune._const(value)
    if data is not None:
        return [(int(e), None) for e in data.reshape(-1)]
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain != "":
        return None
    entries: list = []
    for i, inp in enumerate(node.inputs):
        part = prune._const(inp)
        if part is not None:
            entries += [(int(e), (i, j)) for j, e in enumerate(part.reshape(-1))]
        else:
            shape = inp.shape if inp is not None and inp.shape is not None else (shapes or {}).get(getattr(inp, "name", None))
            if shape is None and inp is not None and _unsqueezed_scalar(inp):
                shape = [1]
            if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                return None
            entries += [(None, ("dynamic", i))] * shape[0]
    return entries


def _unsqueezed_scalar(value: ir.Value) -> bool:
    """``Unsqueeze(Gather(shape, scalar index), [0])``: the exporters' way of writing one shape entry."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or len(node.inputs) < 2:
        return False
    axes = prune._const(node.inputs[1])
    gather = node.inputs[0].producer() if node.inputs[0] is not None else None
    if axes is None or axes.size != 1 or gather is None or gather.op_type != "Gather":
        return False
    index = prune._const(gather.inputs[1])
    return index is not None and index.ndim == 0


def _read_from(value: ir.Value, inside: set[int], depth: int = 0) -> bool:
    """``value`` is computed from the shape of a tensor inside the block only (Shape → Gather/Slice/…)."""
    node = value.producer() if value is not None else None
    if node is None or depth > 8:
        return False
    if node.op_type == "Shape":
        return id(node.inputs[0]) in inside
    if node.op_type in ("Unsqueeze", "Squeeze", "Gather", "Slice", "Cast", "Identity", "Concat"):
        dynamic = [v for v in node.inputs if v is not None and prune._const(v) is None]
        return bool(dynamic) and all(_read_from(v, inside, depth + 1) for v in dynamic)
    return False


def _reshape_edits(reshape: ir.Node, heads: int, head_dim: int, width: int, shapes: dict, inside: set[int]) -> dict[int, str] | None:
    """Which entries of this head split/merge Reshape encode the head count ('heads') or the width
    ('width'); None when the shape cannot be read safely."""
    entries = _shape_entries(reshape.inputs[1], shapes)
    if entries is None:
        return None
    edits: dict[int, str] = {}
    rank = len(entries)
    for pos, (const, where) in enumerate(entries):
        from_end = rank - pos
        if const is None and ((rank == 4 and from_end == 2) or (rank == 3 and from_end == 1)):
            # A computed head count / width must be read off a tensor of the block (it then follows the shrink).
            source = reshape.inputs[1].producer().inputs[where[1]] if where is not None else reshape.inputs[1]
            if not _read_from(source, inside):
                return None
        if const is None or const in (-1, 0):
            continue
        if rank == 4 and from_end == 2 and const == heads:
            edits[pos] = "heads"
        elif rank == 4 and from_end == 1 and const == head_dim:
            continue
        elif rank == 4 and from_end > 2:
            continue  # batch / sequence written as constants
        elif rank == 3 and from_end == 1 and const == width:
            edits[pos] = "width"
        elif rank == 3 and from_end == 1 and const == head_dim:
            continue
        else:
            return None
    return edits


def _unfused_units(model: ir.Model, graph: ir.Graph) -> list[tuple[prune.AttentionUnit, list[tuple[ir.Node, dict]]]]:
    """Attention blocks of the unfused ``graph``, located by fusing a copy and mapping its
    projections back by value name; with the Reshapes whose shapes carry the head count."""
    if graph is not model.graph or not any(n.op_type == "Softmax" for n in graph) or not _maybe_pruned(graph):
        return []
    copy = model.clone()  # weights shared: the fusion passes below build new values, they do not write tensors
    from tfgraph.passes.context import current

    for spec in current().need("attention_fusion", "shrink-pruned"):
        if spec.name != "shrink-pruned":
            spec.create()(copy)
    producers = {o.name: n for n in graph for o in n.outputs if o is not None}
    # Lengths of shape pieces, from the copy (shape inference ran there).
    shapes = {o.name: o.shape for n in copy.graph for o in n.outputs if o is not None and o.shape is not None}
    found = []
    for unit in prune.attention_units(copy):
        if (unit.node.domain, unit.node.op_type) != ("tfgraph", "Attention"):
            continue
        blocks = []
        for b in (unit.q, unit.k, unit.v):
            if b.split is not None or b.offset != 0:
                break
            mm = producers.get(b.weight[0].outputs[0].name)
            if mm is None or mm.op_type != "MatMul" or prune._const(mm.inputs[1]) is None:
                break
            if mm.inputs[1].const_value.shape != b.weight[0].inputs[1].const_value.shape:
                break
            values = [mm.outputs[0]]
            bias = None
            if b.bias is not None:
                add = producers.get(b.bias[0].outputs[0].name)
                if add is None or add.op_type != "Add" or mm.outputs[0] not in add.inputs:
                    break
                index = 1 if add.inputs[0] is mm.outputs[0] else 0
                if prune._const(add.inputs[index]) is None or len(mm.outputs[0].uses()) != 1:
                    break
                bias = (add, index)
                values.insert(0, add.outputs[0])
            blocks.append(prune.Block((mm, 1), bias, 0, b.width, values))
        else:
            out = producers.get(unit.out.outputs[0].name)
            if out is None or out.op_type != "MatMul" or prune._const(out.inputs[1]) is None:
                continue
            region = _region([b.values[0] for b in blocks], out)
            if region is None:
                continue
            reshapes = []
            width = blocks[2].width
            inside = {id(o) for n in region for o in n.outputs} | {id(b.values[0]) for b in blocks}
            for node in region:
                if node.op_type == "Reshape":
                    edits = _reshape_edits(node, unit.num_heads, unit.qk_dim, width, shapes, inside)
                    if edits is None:
                        break
                    if edits:
                        reshapes.append((node, edits, _shape_entries(node.inputs[1], shapes)))
            else:
                original = prune.AttentionUnit(None, unit.num_heads, *blocks, out, unit.name)  # type: ignore[arg-type]
                original.region = region  # type: ignore[attr-defined]
                found.append((original, reshapes))
    return found


def _region(starts: list[ir.Value], out: ir.Node, limit: int = 96) -> list[ir.Node] | None:
    """Nodes between the Q/K/V projections and the output projection (exclusive); None if it leaks."""
    seen: dict[int, ir.Node] = {}
    stack = list(starts)
    while stack:
        value = stack.pop()
        if value.is_graph_output():
            return None
        for node, _ in value.uses():
            if node is out or id(node) in seen:
                continue
            seen[id(node)] = node
            if len(seen) > limit:
                return None
            stack.extend(o for o in node.outputs if o is not None)
    if out.inputs[0] is None or out.inputs[0].producer() is None or id(out.inputs[0].producer()) not in seen:
        return None
    return list(seen.values())


def _fix_reshapes(graph: ir.Graph, editor: _Editor, reshapes, heads: int, width: int) -> None:
    for reshape, edits, entries in reshapes:
        shape = reshape.inputs[1]
        if prune._const(shape) is not None:
            data = shape.const_value.numpy().copy()
            for pos, kind in edits.items():
                data[pos] = heads if kind == "heads" else width
            editor.replace(reshape, 1, data)
            continue
        concat = shape.producer()
        inputs = list(concat.inputs)
        for pos, kind in edits.items():
            index, j = entries[pos][1]
            data = inputs[index].const_value.numpy().copy()
            data.reshape(-1)[j] = heads if kind == "heads" else width
            value = ir.Value(name=editor._unique(inputs[index].name), const_value=ir.tensor(data))
            graph.register_initializer(value)
            inputs[index] = value
        new = ir.node("Concat", inputs, attributes={"axis": 0})
        new.outputs[0].shape, new.outputs[0].type = shape.shape, shape.type
        graph.insert_before(reshape, new)
        reshape.replace_input_with(1, new.outputs[0])


def _shrink_unfused(graph: ir.Graph, editor: _Editor, unit: prune.AttentionUnit, reshapes, dead: list[int]) -> None:
    blocks = ((unit.q, unit.qk_dim), (unit.k, unit.qk_dim), (unit.v, unit.v_dim))
    for block, d in blocks:
        cols = [h * d + i for h in dead for i in range(d)]
        node, i = block.weight
        editor.remove(node, i, 1, cols)
        if block.bias is not None:
            node, i = block.bias
            editor.remove(node, i, 0, cols)
        for value in block.values:
            _set_last_dim(value, block.width - len(cols))
    editor.remove(unit.out, 1, 0, [h * unit.v_dim + i for h in dead for i in range(unit.v_dim)])
    heads = unit.num_heads - len(dead)
    _fix_reshapes(graph, editor, reshapes, heads, heads * unit.v_dim)
    # Shapes inside the block change (head axis, widths): let shape inference recompute them.
    for node in unit.region:  # type: ignore[attr-defined]
        for value in node.outputs:
            if value is not None and not value.is_graph_output():
                value.shape = None


@register_pass("shrink-pruned")
class ShrinkPrunedPass(ir.passes.InPlacePass):
    """Remove zeroed attention heads and FFN neurons: slice Q/K/V columns, biases and output-projection rows,
    update ``num_heads`` (and ``qkv_hidden_sizes``, packed Split sizes); slice FFN up columns, biases and
    down rows. Exact: a removed head or neuron contributed zero.

    Works on fused attention (``tfgraph.Attention``, ``com.microsoft.Attention`` /
    ``MultiHeadAttention``), with or without packed projections; FFN blocks in any graph.
    Heads of unfused attention are left alone (run it after ``fuse-attention``).
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

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
                for unit, reshapes in _unfused_units(model, graph):
                    dead = _dead_heads(unit)
                    if dead:
                        _shrink_unfused(graph, editor, unit, reshapes, dead)
                        removed_heads += len(dead)
                        blocks += 1
                editor.apply()
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
