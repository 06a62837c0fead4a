"""Removal of dead nodes, unused functions and unused opset imports."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from tfgraph.ops import contrib_schema
from tfgraph.passes.registry import register_pass


@register_pass("remove-dead")
class RemoveDeadCodePass(ir.passes.InPlacePass):
    """Remove nodes and initializers that do not contribute to a graph output, then
    the local functions and opset imports nothing uses any more; optional outputs nothing
    reads are left unnamed (ONNX's "not requested"), for contrib ops too."""

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnx-ir's node removal also trims unused optional outputs, trailing empty inputs and a default
        # training_mode=0 attribute (BatchNormalization) without counting them as a change: compared here.
        arity = {id(n): _arity(n) for g in model.graphs() for n in g}
        modified = False
        for step in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            modified |= step(model).modified
        modified |= drop_unread_contrib_outputs(model) > 0
        modified = modified or any(arity.get(id(n)) != _arity(n) for g in model.graphs() for n in g)
        return ir.passes.PassResult(model, modified)


def drop_unread_contrib_outputs(model: ir.Model) -> int:
    """Unname the optional outputs that nothing reads of ops outside ONNX's domains (onnx-ir does it
    for ONNX's own ops): onnxruntime computes and allocates every named output, e.g. the mean and
    inverse deviation of each SkipSimplifiedLayerNormalization, two tensors per norm per token in a
    decoder. Trailing unnamed outputs are dropped. Returns how many outputs were unnamed."""
    dropped = 0
    for graph in model.graphs():
        kept = frozenset(graph.outputs)
        for node in graph:
            if node.domain in ("", "ai.onnx") or not any(o.name and not o.uses() for o in node.outputs):
                continue
            schema = contrib_schema(node.domain, node.op_type, model.opset_imports.get(node.domain, 1))
            formals = list(schema.outputs) if schema is not None else []
            if not formals or any("Variadic" in str(f.option) for f in formals):
                continue
            for formal, value in zip(formals, node.outputs):
                if "Optional" in str(formal.option) and value.name and not value.uses() and value not in kept:
                    value.name = ""
                    dropped += 1
            count = len(node.outputs)
            while count > 1 and not node.outputs[count - 1].name:
                count -= 1
            if count < len(node.outputs):
                node.resize_outputs(count)
    return dropped


def _arity(node: ir.Node) -> tuple[int, int, int]:
    return len(node.inputs), len(node.outputs), len(node.attributes)
