"""Shape computations read from graph inputs instead of intermediate tensors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass


def _input_dims(graph: ir.Graph) -> dict[str, tuple[ir.Value, int]]:
    sources: dict[str, tuple[ir.Value, int]] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if not isinstance(dim, int) and dim.value and dim.value not in sources:
                sources[dim.value] = (value, axis)
    return sources


@register_pass("shape-from-inputs")
class ShapeFromInputsPass(ir.passes.InPlacePass):
    """Rewrite ``Shape(x)[start:end]`` of an intermediate ``x`` into constants and ``Shape`` slices of
    graph inputs, wherever inferred dims prove them equal (run ``infer-shapes`` first).

    Exporters read sizes off whatever tensor is at hand (``Shape`` of a projected key, of
    the attention context, of a split output); those reads tie shape arithmetic to the
    middle of blocks that fusions replace. Rerouted to the inputs, equal computations
    merge under CSE, static ones fold, and the blocks become self-contained.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sources = _input_dims(graph)
        modified = False
        for node in list(graph):
            if node.op_type != "Shape" or node.domain != "" or node.inputs[0] is None:
                continue
            x = node.inputs[0]
            if x.is_graph_input() or x.shape is None:
                continue
            rank = len(x.shape)
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", rank)
            start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
            start, end = max(0, min(start, rank)), max(0, min(end, rank))
            dims = list(x.shape)[start:end]
            if not all(isinstance(d, int) or (d.value in sources) for d in dims):
                continue
            new_nodes: list[ir.Node] = []
            pieces: list[ir.Value] = []
            run: list[int] = []

            def flush() -> None:
                if run:
                    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(run, dtype=np.int64))})
                    new_nodes.append(const)
                    pieces.append(const.outputs[0])
                    run.clear()

            for dim in dims:
                if isinstance(dim, int):
                    run.append(dim)
                    continue
                flush()
                source, axis = sources[dim.value]
                shape = ir.node("Shape", [source], attributes={"start": axis, "end": axis + 1})
                new_nodes.append(shape)
                pieces.append(shape.outputs[0])
            flush()
            if not pieces:
                continue
            if len(pieces) > 1:
                concat = ir.node("Concat", pieces, attributes={"axis": 0})
                new_nodes.append(concat)
                result = concat.outputs[0]
            else:
                result = pieces[0]
            result.shape, result.dtype = ir.Shape([len(dims)]), ir.DataType.INT64
            graph.insert_before(node, new_nodes)
            ir.convenience.replace_all_uses_with(node.outputs[0], result)
            if node.outputs[0].is_graph_output():
                continue  # leave the node; the output keeps its name
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
