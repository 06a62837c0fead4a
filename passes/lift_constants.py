"""Lifting ``Constant`` nodes into initializers."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from tfgraph.passes.registry import register_pass


@register_pass("lift-constants")
class LiftConstantsPass(ir.passes.InPlacePass):
    """Turn ``Constant`` nodes holding more than ``size_limit`` elements into initializers.

    Weights then live in one place (initializers), where deduplication, external data
    and the parameter counts in the manifest see them; small constants stay nodes.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def __init__(self, *, size_limit: int = 16):
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=self.size_limit)(model)
        return ir.passes.PassResult(model, result.modified)
