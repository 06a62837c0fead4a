"""Normalizations from their decomposed forms: LayerNormalization and RMS normalization.

One rule class, two variants (``centered``):

    centered (LayerNorm):  d = x - ReduceMean(x);  y = d / Sqrt(ReduceMean(d²) + eps) · γ [+ β]
    RMS (Llama, T5):       y = x · 1/Sqrt(ReduceMean(x²) + eps) · γ

with the forms exporters write: ``Pow(·, 2)`` or ``Mul(·, ·)`` for the square, ReduceMean
with axes as an attribute (opset < 18) or an input, ``Div(·, std)``, ``Mul(·,
Reciprocal(std))`` or ``Mul(·, Div(1, std))`` for the division. The mean must run over
the last axis only, ε and the square's exponent must be constants.

LayerNorm becomes ai.onnx ``LayerNormalization`` (opset ≥ 17); RMS normalization becomes
the neutral ``tfgraph.RMSNormalization`` (ai.onnx has it only from opset 23), which a
target lowers (``fuse-ort-operators`` turns a residual Add followed by it into
onnxruntime's SkipSimplifiedLayerNormalization) or leaves as its standard-ONNX body.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from tfgraph import ops
from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(np.asarray(value.const_value.numpy()).reshape(()))


def _last_axis_only(node: ir.Node, rank: int | None) -> bool:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes_value = node.inputs[1].const_value
        axes = None if axes_value is None else [int(a) for a in axes_value.numpy().reshape(-1)]
    else:
        attr = node.attributes.get("axes")
        axes = None if attr is None else list(attr.value)
    if axes is None or len(axes) != 1 or node.attributes.get_int("keepdims", 1) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


class NormFusion(pattern.RewriteRuleClassBase):
    """Decomposed LayerNorm (``centered=True``) or RMSNorm (``centered=False``) → one op.

    The forms are parameters (one rule per combination; onnxscript's matcher does not
    backtrack through nested alternatives): ``axes`` ``"input"``/``"attribute"`` for
    ReduceMean, ``square`` ``"pow"``/``"mul"``, ``division``
    ``"div"``/``"reciprocal"``/``"one-over"``, ``with_bias`` for LayerNorm's β.
    """

    def __init__(self, centered: bool, with_bias: bool, axes: str, square: str, division: str):
        family = "layer-norm" if centered else "rms-norm"
        super().__init__(name=f"{family}[{'bias,' if with_bias else ''}{axes},{square},{division}]")
        self.centered, self.with_bias = centered, with_bias
        self.axes, self.square, self.division = axes, square, division
        self._epsilon = 0.0

    def _mean(self, op, value, axes, name: str):
        if self.axes == "input":
            return op.ReduceMean(value, axes, _allow_other_attributes=True, _outputs=[name])
        return op.ReduceMean(value, _allow_other_attributes=True, _outputs=[name])

    def pattern(self, op, x, mean_axes, var_axes, exponent, epsilon, one, gamma, beta):
        centered = op.Sub(x, self._mean(op, x, mean_axes, "mean")) if self.centered else x
        square = op.Pow(centered, exponent) if self.square == "pow" else op.Mul(centered, centered)
        std = op.Sqrt(op.Add(self._mean(op, square, var_axes, "variance"), epsilon))
        if self.division == "div":
            normed = op.Div(centered, std)
        elif self.division == "reciprocal":
            normed = op.Mul(centered, op.Reciprocal(std))
        else:
            normed = op.Mul(centered, op.Div(one, std))
        scaled = op.Mul(normed, gamma)
        return op.Add(scaled, beta) if self.with_bias else scaled

    @classmethod
    def variants(cls, centered: bool, with_bias: bool = False) -> list[pattern.RewriteRule]:
        return [
            cls.rule(centered=centered, with_bias=with_bias, axes=axes, square=square, division=division)
            for axes in ("input", "attribute")
            for square in ("pow", "mul")
            for division in ("div", "reciprocal", "one-over")
        ]

    def check(self, context, x, epsilon, gamma, variance, mean=None, exponent=None, one=None, beta=None, **_):
        result = pattern.MatchResult()
        rank = len(x.shape) if x.shape is not None else None
        for value in (variance, mean) if self.centered else (variance,):
            if not _last_axis_only(value.producer(), rank):
                return result.fail("the mean does not run over the last axis alone (with keepdims)", value)
        if self.square == "pow" and _scalar(exponent) != 2.0:
            return result.fail("the square is Pow with an exponent other than the constant 2", exponent)
        if self.division == "one-over" and _scalar(one) != 1.0:
            return result.fail("Div(c, std) with c other than the constant 1", one)
        eps = _scalar(epsilon)
        if eps is None or eps < 0:
            return result.fail("epsilon is not a non-negative constant scalar", epsilon)
        size = x.shape[-1] if x.shape is not None and len(x.shape) else None
        for name, param in (("scale", gamma), ("bias", beta)):
            if param is None:
                continue
            # A (D,) vector broadcasts over the last axis, as the fused op's scale does.
            if param.const_value is None or len(param.const_value.shape) != 1 or (
                isinstance(size, int) and param.const_value.shape[0] != size
            ):
                return result.fail(f"{name} is not a constant vector over the last axis", param)
        self._epsilon = eps
        return result

    def rewrite(self, op, x, gamma, beta=None, **_):
        if self.centered:
            inputs = [x, gamma] + ([beta] if self.with_bias else [])
            return op.LayerNormalization(*inputs, axis=-1, epsilon=self._epsilon)
        return op.RMSNormalization(x, gamma, epsilon=self._epsilon, _domain=ops.DOMAIN)


@register_pass("fuse-normalization")
class FuseNormalizationPass(RuleSetPass):
    """Decomposed LayerNorm → ``LayerNormalization`` (models at opset ≥ 17), decomposed
    RMSNorm → ``tfgraph.RMSNormalization`` (opset ≥ 18, which its body needs)."""

    _skipped: frozenset[str] = frozenset()

    def named_rules(self) -> Sequence[tuple[str, Sequence[pattern.RewriteRule]]]:
        rules = [
            # β first: otherwise the rule without it takes the Mul and leaves the Add behind.
            ("layer-norm", NormFusion.variants(centered=True, with_bias=True)),
            ("layer-norm-no-bias", NormFusion.variants(centered=True)),
            ("rms-norm", NormFusion.variants(centered=False)),
        ]
        return [(name, rule) for name, rule in rules if name not in self._skipped]

    MIN_OPSET = {"layer-norm": 17, "layer-norm-no-bias": 17, "rms-norm": 18}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        self._skipped = frozenset(name for name, need in self.MIN_OPSET.items() if opset < need)
        result = super().call(model)
        for name in self._skipped:
            self.report[name] = {"matches": 0, "skipped": f"model opset {opset} < {self.MIN_OPSET[name]}"}
        if self.report.get("rms-norm", {}).get("matches"):
            ops.ensure_defined(model, "RMSNormalization")
        return result
