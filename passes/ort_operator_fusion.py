"""Operator fusions into onnxruntime's contrib ops (Gelu, FastGelu, BiasGelu, SkipLayerNormalization).

The rules are onnxscript's (``onnxscript.rewriter.ort_fusions``), run one family at a
time so the manifest shows what each matched and, where nothing did, the nearest miss.
Only targets whose execution provider has these kernels (onnxruntime CPU and CUDA)
list this pass; others keep the standard-ONNX forms.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu, skip_normalization

from tfgraph import ops
from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass


class SkipRMSNormalization(pattern.RewriteRuleClassBase):
    """``tfgraph.RMSNormalization(a + b)`` → SkipSimplifiedLayerNormalization(a, b), whose
    fourth output is the sum (the residual stream that later layers add to)."""

    def __init__(self):
        super().__init__(name="skip-rms-norm")

    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b)
        return op.RMSNormalization(total, gamma, _domain=ops.DOMAIN, _outputs=["normed"]), total

    def check(self, context, a, b, gamma, normed, **_):
        result = pattern.MatchResult()
        if a.shape is None or b.shape is None or list(a.shape) != list(b.shape) or len(a.shape) != 3:
            return result.fail("the residual Add's operands are not both (batch, sequence, hidden)", a)
        return result

    def rewrite(self, op, a, b, gamma, normed, **_):
        epsilon = normed.producer().attributes.get_float("epsilon")
        y, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, epsilon=epsilon, _domain="com.microsoft", _outputs=4
        )
        return y, total


@register_pass("fuse-ort-operators")
class FuseOrtOperatorsPass(RuleSetPass):
    """Gelu (erf form) → Gelu, Gelu (tanh form) → FastGelu, Add+Gelu → BiasGelu,
    Add(+bias)+LayerNormalization → SkipLayerNormalization, Add+``tfgraph.RMSNormalization``
    (from ``fuse-normalization``) → SkipSimplifiedLayerNormalization.

    (onnxscript's own RMSNorm rules emit ``SimplifiedLayerNormalization`` in the ai.onnx
    domain, which the ONNX checker rejects; tfgraph fuses RMSNorm to its neutral op
    instead, and plain RMSNorm stays that op's body, which onnxruntime fuses at load.)"""

    commute = False  # onnxscript's rule sets list their operand orders themselves

    def named_rules(self) -> Sequence[tuple[str, Sequence[pattern.RewriteRule]]]:
        return [
            ("gelu-erf", [gelu._erf_rule, *erfgelu.rules.rules]),
            ("gelu-tanh", [gelu._tanh_rule]),
            ("bias-gelu", list(bias_gelu.bias_gelu_rules.rules)),
            ("skip-layer-norm", list(skip_normalization.skip_layer_normalization_ruleset.rules)),
            ("skip-rms-norm", [SkipRMSNormalization.rule()]),
        ]
