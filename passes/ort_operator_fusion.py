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

from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass


@register_pass("fuse-ort-operators")
class FuseOrtOperatorsPass(RuleSetPass):
    """Gelu (erf form) → Gelu, Gelu (tanh form) → FastGelu, Add+Gelu → BiasGelu,
    Add(+bias)+LayerNormalization → SkipLayerNormalization.

    (onnxscript's RMSNorm rules emit ``SimplifiedLayerNormalization`` in the ai.onnx
    domain, which the ONNX checker rejects; RMSNorm fusion is left out until it targets
    opset-23 ``RMSNormalization`` or a tfgraph neutral op.)"""

    commute = False  # onnxscript's rule sets list their operand orders themselves

    def named_rules(self) -> Sequence[tuple[str, Sequence[pattern.RewriteRule]]]:
        return [
            ("gelu-erf", [gelu._erf_rule, *erfgelu.rules.rules]),
            ("gelu-tanh", [gelu._tanh_rule]),
            ("bias-gelu", list(bias_gelu.bias_gelu_rules.rules)),
            ("skip-layer-norm", list(skip_normalization.skip_layer_normalization_ruleset.rules)),
        ]
