"""Bounded-size constant folding (onnxscript's folder, with shape propagation)."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from tfgraph.passes.registry import register_pass


@register_pass("fold-constants")
class FoldConstantsPass(ir.passes.InPlacePass):
    """Evaluate nodes whose inputs are all constant and replace them with their value.

    Folding is bounded: a node is evaluated only when its constant inputs hold at most
    ``input_size_limit`` elements, and results over ``output_size_limit`` are discarded.
    The one exception is a ``Transpose`` that is the only consumer of its large input:
    the folded weight replaces the original, so nothing is duplicated (a tied weight
    used elsewhere keeps its ``Transpose`` node).

    Folding never copies a shared weight: a node with a constant input of more than
    ``shared_input_limit`` elements that other nodes also use is left alone, since the
    folded result would be stored beside the original (exporters emit
    ``Identity(weight)`` per layer for shared layers, which would otherwise become
    one copy per layer). Shape computations (``Shape``/``Gather``/``Concat`` on
    known dimensions) fold as well, which simplifies exporter-built shape chains.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def __init__(
        self,
        *,
        input_size_limit: int = 8192,
        output_size_limit: int = 262_144,
        shared_input_limit: int = 1024,
        shape_inference: bool = False,
    ):
        super().__init__()
        self.input_size_limit = input_size_limit
        self.shared_input_limit = shared_input_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=self.shape_inference,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=self._should_fold,
        )
        result = folder(model)
        return ir.passes.PassResult(model, result.modified)

    def _should_fold(self, node: ir.Node) -> bool | None:
        for value in node.inputs:
            tensor = value.const_value if value is not None else None
            if tensor is not None and tensor.size > self.shared_input_limit and len(value.uses()) > 1:
                return False
        return None  # onnxscript's default size rules decide
