"""Exact deduplication of initializers."""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.analysis import duplicate_groups
from tfgraph.passes.registry import register_pass


@register_pass("dedup-initializers")
class DedupInitializersPass(ir.passes.InPlacePass):
    """Store byte-identical initializers once (same dtype and shape; content hash, then byte compare).

    Shared layers often come out of exporters as one copy per use (ALBERT's shared
    layer after the dynamo exporter folds its transposes, tied embeddings in
    TorchScript exports); every user is rewired to the first copy. Initializers that
    are also graph inputs (overridable at run time) or graph outputs are kept.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            for values in duplicate_groups(graph):
                keep = [v for v in values if not v.is_graph_input() and not v.is_graph_output()]
                if len(keep) < 2:
                    continue
                canonical, *duplicates = keep
                for value in duplicates:
                    value.replace_all_uses_with(canonical)
                    graph.initializers.pop(value.name)
                    modified = True
        return ir.passes.PassResult(model, modified)
