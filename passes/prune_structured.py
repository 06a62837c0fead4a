"""Structured pruning as a pass: zero the least important attention heads and FFN neurons."""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.passes import pruning as prune
from tfgraph.passes.registry import register_pass


@register_pass("prune-structured")
class PruneStructuredPass(ir.passes.InPlacePass):
    """Zero a fraction of attention heads (``heads``) and FFN neurons (``neurons``) by importance score
    (``score`` = l1, l2 or activation; ``scope`` = global or layer; ``schedule`` = a step such as 0.1,
    or fractions "0.1;0.2;0.3"). Changes the outputs on purpose: ``tfgraph.compile`` verifies
    the passes after it against the pruned model. Follow it with ``shrink-pruned`` to remove
    what it zeroed."""

    changes_outputs = True

    def __init__(
        self,
        *,
        heads: float = 0.0,
        neurons: float = 0.0,
        score: str = "l2",
        scope: str = "global",
        schedule: str | float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.options = dict(heads=heads, neurons=neurons, score=score, scope=scope, schedule=schedule, seed=seed)
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = prune.prune_structured(model, **self.options)
        self.report = {"prune-structured": {"matches": result["heads_pruned"] + result["neurons_pruned"], **{
            k: result[k] for k in ("heads_total", "heads_pruned", "neurons_total", "neurons_pruned", "schedule")}}}
        return ir.passes.PassResult(model, result["heads_pruned"] + result["neurons_pruned"] > 0)
