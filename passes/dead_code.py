"""Removal of dead nodes, unused functions and unused opset imports."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from tfgraph.passes.registry import register_pass


@register_pass("remove-dead")
class RemoveDeadCodePass(ir.passes.InPlacePass):
    """Remove nodes and initializers that do not contribute to a graph output, then
    the local functions and opset imports nothing uses any more."""

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnx-ir's node removal also trims unused optional outputs, trailing empty inputs and a default
        # training_mode=0 attribute (BatchNormalization) without counting them as a change: compared here.
        arity = {id(n): _arity(n) for g in model.graphs() for n in g}
        modified = False
        for step in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            modified |= step(model).modified
        modified = modified or any(arity.get(id(n)) != _arity(n) for g in model.graphs() for n in g)
        return ir.passes.PassResult(model, modified)


def _arity(node: ir.Node) -> tuple[int, int, int]:
    return len(node.inputs), len(node.outputs), len(node.attributes)
