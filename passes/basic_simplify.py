"""Local simplifications from onnxscript's rule library (no-op casts, transposes, reshapes…)."""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _basic_rules

from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass

_RULES = (
    ("cast-cast", _basic_rules.cast_cast_rule),
    ("no-op-cast", _basic_rules.no_op_cast_rule),
    ("no-op-expand", _basic_rules.no_op_expand_rule),
    ("no-op-transpose", _basic_rules.no_op_transpose_rule),
    ("transpose-transpose", _basic_rules.transpose_transpose_rule),
    ("reshape-reshape", _basic_rules.reshape_reshape_rule),
    ("unsqueeze-unsqueeze", _basic_rules.unsqueeze_unsqueeze_rule),
)


@register_pass("simplify-ops")
class SimplifyOpsPass(RuleSetPass):
    """Cast of a value to its own type, Cast∘Cast, Expand to its own shape, identity or
    composed Transposes, Reshape∘Reshape and Unsqueeze∘Unsqueeze: onnxscript's rules,
    which read inferred types and shapes (run ``infer-shapes`` first)."""

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule]]:
        return list(_RULES)
