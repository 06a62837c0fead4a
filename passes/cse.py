"""Common-subexpression elimination."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from tfgraph.passes.registry import register_pass


@register_pass("cse")
class CSEPass(ir.passes.InPlacePass):
    """Merge nodes that compute the same op on the same inputs with the same attributes.

    Exporters repeat shape computations and mask construction in every layer; merging
    them gives later rules one node to match. Constant tensors up to ``size_limit``
    elements are compared by value.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def __init__(self, *, size_limit: int = 10):
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = CommonSubexpressionEliminationPass(size_limit=self.size_limit)(model)
        return ir.passes.PassResult(model, result.modified)
