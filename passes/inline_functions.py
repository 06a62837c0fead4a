"""inline-neutral-ops: replace tfgraph's neutral operators by their standard-ONNX bodies.

Targets whose execution provider must not receive onnxruntime's contrib operators
(TensorRT, OpenVINO, QNN) and that have no better lowering for a neutral op take its
reference decomposition: the model-local function that defines it (tfgraph/ops.py), inlined
into the graph so the EP's own parser sees plain MatMul/Softmax/ReduceMean chains (its pattern
fusions start from those) and the artifact carries no tfgraph-domain functions. Other local
functions (the exporter's) are left as they are.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from tfgraph.analysis import STANDARD_ATTENTION_MARK
from tfgraph.ops import STANDARD_FORM, mark_attention_form
from tfgraph.ops import DOMAIN
from tfgraph.passes.registry import register_pass


@register_pass("inline-neutral-ops")
class InlineNeutralOps(ir.passes.InPlacePass):
    """Inline every call of a ``tfgraph``-domain function into standard ONNX ops."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        neutral = [key for key, f in model.functions.items() if f.domain == DOMAIN]
        if not neutral:
            return ir.passes.PassResult(model, False)
        for key in neutral:
            # The inlined Softmax keeps a mark in its name: the attention report still counts the
            # block as recognized and lowered (to standard ops), not as left unfused.
            if "Attention" in key[1]:
                for node in model.functions[key]:
                    if node.op_type == "Softmax" and node.domain == "":
                        node.name = f"{STANDARD_ATTENTION_MARK}/{node.name or 'softmax'}"
                        mark_attention_form(node, STANDARD_FORM)
        result = InlinePass(criteria=lambda f: f.domain == DOMAIN)(model)
        for key in neutral:
            model.functions.pop(key, None)
        if DOMAIN in model.opset_imports and not any(
            n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)
        ):
            del model.opset_imports[DOMAIN]
        return ir.passes.PassResult(model, result.modified or bool(neutral))
