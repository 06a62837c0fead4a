"""Simplification of Reshape chains that only move axes or do nothing."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass


def _known(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) or (d.value is not None) for d in shape)


def _dims(shape: ir.Shape) -> list:
    return [d if isinstance(d, int) else d.value for d in shape]


class NoopReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x) -> y`` where ``y`` provably has ``x``'s shape → ``x``."""

    def __init__(self):
        super().__init__(name="noop-reshape")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = pattern.MatchResult()
        if not (_known(x.shape) and _known(y.shape)):
            return result.fail("shapes not fully known", x)
        if _dims(x.shape) != _dims(y.shape):
            return result.fail(f"shape changes {_dims(x.shape)} -> {_dims(y.shape)}", y)
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class SwapLastTwoVia3D(pattern.RewriteRuleClassBase):
    """``Reshape(Transpose(Reshape(x, [-1, c, d]), [0, 2, 1]), [a, b, d, c])`` → ``Transpose(x, [0, 1, 3, 2])``.

    How the dynamo exporter writes ``k.transpose(-2, -1)`` inside transformers' SDPA.
    """

    def __init__(self):
        super().__init__(name="swap-last-two-via-3d")

    def pattern(self, op, x, s3, s4):
        flat = op.Reshape(x, s3, _outputs=["flat"])
        return op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), s4, _outputs=["y"])

    def check(self, context, x, flat, y, **_):
        result = pattern.MatchResult()
        if not (_known(x.shape) and _known(flat.shape) and _known(y.shape)):
            return result.fail("shapes not fully known", x)
        a, b, c, d = _dims(x.shape) if len(x.shape) == 4 else (None,) * 4
        if len(x.shape) != 4 or _dims(flat.shape)[1:] != [c, d] or _dims(y.shape) != [a, b, d, c]:
            return result.fail(f"not a swap of the last two axes: {_dims(x.shape)} -> {_dims(y.shape)}", y)
        return result

    def rewrite(self, op, x, **_):
        return op.Transpose(x, perm=[0, 1, 3, 2])


@register_pass("simplify-reshapes")
class SimplifyReshapesPass(RuleSetPass):
    """Remove Reshapes that keep the shape and turn 3-D axis swaps back into one Transpose.

    Needs shapes: run ``infer-shapes`` first. Together with CSE and folding this brings
    TorchScript- and dynamo-style attention to one normal form.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule]]:
        return [("noop-reshape", NoopReshape.rule()), ("swap-last-two-via-3d", SwapLastTwoVia3D.rule())]
