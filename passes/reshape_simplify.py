"""Simplification of Reshape chains that only move axes or do nothing, and of shape vectors read back
element by element."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def _length(piece: ir.Value | None) -> int | None:
    """The static length of a 1-D shape piece: its inferred shape, a constant's size, or ``Shape(start, end)``
    of a value of known rank (what shape-from-inputs writes, before shapes are inferred again)."""
    if piece is None:
        return None
    if piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
        return piece.shape[0]
    const = ir.convenience.get_const_tensor(piece)
    if const is not None:
        return int(const.numpy().size) if const.numpy().ndim == 1 else None
    node = piece.producer()
    if node is not None and node.op_type == "Shape" and node.domain == "" and node.inputs[0].shape is not None:
        rank = len(node.inputs[0].shape)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
        return max(end - start, 0)
    return None


def _concat_element(x: ir.Value, index: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | str:
    """For ``Gather(x, index, axis=0)`` with ``x = Concat(pieces, axis=0)`` of 1-D pieces of static lengths
    and a constant ``index``: the one piece every index falls in, the indices within it, and the selected
    values when that piece is a constant; else why not."""
    concat = x.producer()
    if concat is None or concat.op_type != "Concat" or concat.domain != "":
        return "not a Concat"
    if concat.attributes.get_int("axis", 0) not in (0, -1):
        return "not a Concat on axis 0"
    wanted = ir.convenience.get_const_tensor(index)
    if wanted is None or wanted.numpy().ndim > 1:
        return "index not a constant scalar or vector"
    starts, total = [], 0
    for piece in concat.inputs:
        length = _length(piece)
        if length is None:
            return "a piece of unknown length"
        starts.append(total)
        total += length
    flat = wanted.numpy().astype(np.int64)
    flat = np.where(flat < 0, flat + total, flat)
    if flat.size == 0 or flat.min() < 0 or flat.max() >= total:
        return "index out of range"
    pieces = {int(np.searchsorted(starts, i, side="right") - 1) for i in flat.reshape(-1)}
    if len(pieces) != 1:
        return "indices in several pieces"
    (which,) = pieces
    local = flat - starts[which]
    source = ir.convenience.get_const_tensor(concat.inputs[which])
    return concat.inputs[which], local, (source.numpy()[local] if source is not None else None)


class GatherOfConcat(pattern.RewriteRuleClassBase):
    """``Gather(Concat(a, b, c), i)`` → the element(s) of the one piece ``i`` falls in: a constant when that
    piece is one, else ``Gather(piece, i - offset)``.

    How TorchScript writes a dimension it just assembled (``Gather(Concat(Shape(x)[0:1], [4], Shape(x)[1:2],
    [16]), 3)`` for a head size): read back, it folds to 16, and what depends on it (rotate_half's split point)
    becomes a constant the attention and rotary matchers can read."""

    def __init__(self):
        super().__init__(name="gather-of-concat")

    def pattern(self, op, x, index):
        return op.Gather(x, index, _outputs=["y"])

    def check(self, context, x, index, y, **_):
        result = pattern.MatchResult()
        if y.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("Gather not on axis 0", y)
        found = _concat_element(x, index)
        return result.fail(found, x) if isinstance(found, str) else result

    def rewrite(self, op, x, index, **_):
        piece, local, values = _concat_element(x, index)
        if values is not None:
            return op.Constant(value=ir.tensor(np.asarray(values)))
        return op.Gather(piece, op.Constant(value=ir.tensor(np.asarray(local, np.int64))), axis=0)


@register_pass("simplify-reshapes")
class SimplifyReshapesPass(RuleSetPass):
    """Remove Reshapes that keep the shape, turn 3-D axis swaps back into one Transpose, and read
    elements of an assembled shape vector from the piece they came from (``GatherOfConcat``).

    Needs shapes: run ``infer-shapes`` first. Together with CSE and folding this brings
    TorchScript- and dynamo-style attention to one normal form.
    """

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule]]:
        return [("noop-reshape", NoopReshape.rule()), ("swap-last-two-via-3d", SwapLastTwoVia3D.rule()),
                ("gather-of-concat", GatherOfConcat.rule())]
