"""Unstructured magnitude pruning as a pass (report only: dense kernels keep their size)."""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.passes import pruning as prune
from tfgraph.passes.registry import register_pass


@register_pass("prune-magnitude")
class PruneMagnitudePass(ir.passes.InPlacePass):
    """Zero the smallest-magnitude ``sparsity`` fraction of every constant 2-D MatMul/Gemm weight
    (tensors of at least ``min_size`` elements). Reports the sparsity reached; it does not make
    dense kernels smaller or faster. Changes the outputs on purpose (verified against the pruned
    model afterwards)."""

    changes_outputs = True

    def __init__(self, *, sparsity: float = 0.5, min_size: int = 1024):
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {sparsity}")
        if min_size < 1:
            raise ValueError(f"min_size must be at least 1, not {min_size}")
        self.sparsity = sparsity
        self.min_size = min_size
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = prune.magnitude_prune(model, self.sparsity, min_size=self.min_size)
        self.report = {"prune-magnitude": {"matches": result["tensors_changed"], **result}}
        return ir.passes.PassResult(model, result["tensors_changed"] > 0)
