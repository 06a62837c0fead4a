"""Removal of identity nodes."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

from tfgraph.passes.registry import register_pass


@register_pass("eliminate-identity")
class EliminateIdentityPass(ir.passes.InPlacePass):
    """Remove ``Identity`` nodes, rewiring their consumers (graph outputs keep their names)."""

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = IdentityEliminationPass()(model)
        return ir.passes.PassResult(model, result.modified)
