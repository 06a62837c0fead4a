"""Packing sibling projections (Q/K/V) into one MatMul followed by a Split."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass


def _const_2d(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    return tensor if len(tensor.shape) == 2 else None


def _bias_of(matmul: ir.Node, width: int) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add(matmul, bias)`` right after ``matmul`` with a constant 1-D bias of ``width``, if any."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1 or matmul.outputs[0].is_graph_output():
        return None
    add, _ = uses[0]
    if add.op_type != "Add" or add.domain != "" or add.outputs[0].is_graph_output():
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    # A bias may be shared (exporters' zero biases are deduplicated into one): packing copies
    # only its 1-D values; the original stays for its other users.
    if other is None or other.const_value is None or other.is_graph_input():
        return None
    if list(other.const_value.shape) != [width]:
        return None
    return add, other


@register_pass("pack-projections")
class PackProjectionsPass(ir.passes.InPlacePass):
    """Merge MatMuls that read the same activation with their own constant 2-D weights
    (the Q, K and V projections of an attention block) into one MatMul on the
    concatenated weights, followed by a Split; their bias Adds are packed the same way
    when every member has one. One larger GEMM runs closer to the machine's GEMM rate
    than three small ones.

    Weights used anywhere else are left alone (packing must not duplicate them); the
    originals are removed, so the model does not grow. At most ``max_group`` siblings
    are packed together.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def __init__(self, *, min_group: int = 2, max_group: int = 8):
        super().__init__()
        self.min_group = min_group
        self.max_group = max_group

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            groups: dict[int, list[ir.Node]] = collections.defaultdict(list)
            for node in graph:
                if node.op_type != "MatMul" or node.domain != "" or node.inputs[0] is None:
                    continue
                weight = _const_2d(node.inputs[1])
                if weight is None or len(node.inputs[1].uses()) != 1 or node.outputs[0].is_graph_output():
                    continue
                groups[id(node.inputs[0])].append(node)
            for members in groups.values():
                members = members[: self.max_group]
                if len(members) < self.min_group:
                    continue
                weights = [m.inputs[1].const_value for m in members]
                if len({(w.dtype, w.shape[0]) for w in weights}) != 1:
                    continue
                modified |= self._pack(graph, members, weights)
        return ir.passes.PassResult(model, modified)

    def _pack(self, graph: ir.Graph, members: list[ir.Node], weights: list) -> bool:
        widths = [int(w.shape[1]) for w in weights]
        biases = [_bias_of(m, w) for m, w in zip(members, widths)]
        with_bias = all(b is not None for b in biases)
        x = members[0].inputs[0]
        stem = members[0].outputs[0].name  # value names are unique in a graph
        packed_w = ir.Value(
            name=f"{stem}.packed_weight",
            const_value=ir.tensor(np.concatenate([w.numpy() for w in weights], axis=1)),
        )
        graph.register_initializer(packed_w)
        # Insert after the last member, so every input of the packed nodes is already defined.
        anchor = max(members, key=lambda m: list(graph).index(m))
        new_nodes = [ir.node("MatMul", [x, packed_w])]
        out = new_nodes[-1].outputs[0]
        if with_bias:
            packed_b = ir.Value(
                name=f"{stem}.packed_bias",
                const_value=ir.tensor(np.concatenate([b[1].const_value.numpy() for b in biases])),
            )
            graph.register_initializer(packed_b)
            new_nodes.append(ir.node("Add", [out, packed_b]))
            out = new_nodes[-1].outputs[0]
        sizes = ir.Value(name=f"{stem}.split_sizes", const_value=ir.tensor(np.array(widths, dtype=np.int64)))
        graph.register_initializer(sizes)
        split = ir.node("Split", [out, sizes], attributes={"axis": -1}, num_outputs=len(members))
        new_nodes.append(split)
        graph.insert_after(anchor, new_nodes)
        for i, member in enumerate(members):
            old = biases[i][0].outputs[0] if with_bias else member.outputs[0]
            new = split.outputs[i]
            new.shape, new.type = old.shape, old.type
            ir.convenience.replace_all_uses_with(old, new)
        removed = [b[0] for b in biases] if with_bias else []
        for node in removed + members:
            old_inputs = [v for v in node.inputs if v is not None and v.is_initializer()]
            graph.remove(node, safe=True)
            for value in old_inputs:
                if not value.uses() and value.name in graph.initializers:
                    graph.initializers.pop(value.name)
        # Consumers of the first members may precede the packed MatMul: restore topological order.
        graph.sort()
        return True
