"""fuse-quantized-gather: an int8 embedding lookup as onnxruntime's one GatherBlockQuantized node.

``quantize`` stores an embedding table int8 with one scale per row and looks rows up in standard ONNX:
``Mul(Cast(Gather(table, ids)), Gather(scales, ids))``, four kernels per lookup. onnxruntime's contrib
``GatherBlockQuantized`` (CPU: uint8 data, 8 bits, float scales per block along the row) gathers and
dequantizes in one. The table is stored offset by 128 (its implied zero point, so no zero points are
stored) and each row's scale repeated over the row's blocks: a block is the largest power of two
dividing the row (512 for hidden 512, 64 for 576), so a row holds one to a few copies of its scale. Exact:
the same products of the same values. Decode of the small int4 Llama (benchmarks/bench_decoder.py's
checkpoint): 0.991x → 0.966x the builder's ms/token, four process sets of 20 interleaved rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass
from tfgraph.passes.quantize import drop_unused_initializers

MIN_BLOCK = 16  # GatherBlockQuantized's smallest block


def row_block(width: int) -> int:
    """The largest power of two dividing ``width`` (GatherBlockQuantized's block along a row)."""
    return width & -width


def _converted(op, source: ir.Value, name: str, make) -> ir.Value:
    """The initializer ``name`` derived from the initializer ``source``: the graph's own when an earlier
    rewrite made it, else ``make()``'s array added as a new one."""
    graph = source.graph
    existing = graph.initializers.get(name) if graph is not None else None
    return existing if existing is not None else op.initializer(ir.tensor(make()), name=name)


class QuantizedGather(pattern.RewriteRuleClassBase):
    """``Cast(Gather(int8 table, ids)) * Gather(row scales, ids)`` → GatherBlockQuantized."""

    def __init__(self):
        super().__init__(name="quantized-gather")

    def pattern(self, op, table, ids, scales):
        rows = op.Cast(op.Gather(table, ids, axis=0), to=ir.DataType.FLOAT)
        return op.Mul(rows, op.Gather(scales, ids, axis=0))

    def check(self, context, table, ids, scales, **_):
        result = pattern.MatchResult()
        q, s = table.const_value, scales.const_value
        if q is None or q.dtype != ir.DataType.INT8 or len(q.shape) != 2:
            return result.fail("the table is not a constant 2-D int8 tensor", table)
        if s is None or s.dtype != ir.DataType.FLOAT or list(s.shape) != [q.shape[0], 1]:
            return result.fail("the scales are not one float per row", scales)
        if ids.dtype not in (ir.DataType.INT32, ir.DataType.INT64):
            return result.fail("the ids are not int32/int64", ids)
        if row_block(q.shape[1]) < MIN_BLOCK:
            return result.fail(f"rows of {q.shape[1]}: no power-of-two block of at least {MIN_BLOCK} divides them",
                               table)
        return result

    def rewrite(self, op, table, ids, scales, **_):
        q = table.const_value.numpy()
        width = q.shape[1]
        block = row_block(width)
        # a table (and its scales) looked up more than once is converted once: the second lookup finds it
        data_value = _converted(op, table, f"{table.name}_uint8", lambda: (q.astype(np.int16) + 128).astype(np.uint8))
        scales_value = _converted(op, scales, f"{scales.name}_per_block", lambda: np.repeat(
            scales.const_value.numpy().reshape(-1, 1), width // block, axis=1).astype(np.float32))
        return op.GatherBlockQuantized(data_value, ids, scales_value, gather_axis=0, quantize_axis=1, block_size=block,
                                       bits=8, _domain="com.microsoft")


@register_pass("fuse-quantized-gather")
class FuseQuantizedGatherPass(RuleSetPass):
    """int8 embedding lookups (``quantize``'s per-row form) → com.microsoft.GatherBlockQuantized; for targets
    whose execution provider has its CPU kernel (uint8 data, float scales)."""

    commute = True  # the Mul's operands in either order

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule]]:
        return [("quantized-gather", QuantizedGather.rule())]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            model.opset_imports.setdefault("com.microsoft", 1)
            drop_unused_initializers(model.graph)  # the int8 table and its scales, now unread
        return result
