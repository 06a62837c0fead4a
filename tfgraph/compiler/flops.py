"""Matrix-product FLOPs of a model at concrete input shapes (``tfgraph inspect``, benchmarks' GEMM
fractions). Compile-time: it runs the model once through the verifier's unoptimized session."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.analysis import FUSED_ATTENTION_OPS
from tfgraph.compiler.verify import run
from tfgraph.ir import exposed_outputs

_MATMUL_LIKE = frozenset({("", "MatMul"), ("", "Gemm"), ("", "MatMulInteger"), ("com.microsoft", "FusedMatMul"),
                          ("com.microsoft", "MatMulIntegerToFloat"), ("com.microsoft", "DynamicQuantizeMatMul"),
                          ("com.microsoft", "MatMulNBits"), ("com.microsoft", "QGemm")})


def estimate_flops(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """FLOPs of the matrix products at the shapes of ``feeds``, fused ones included.

    Shapes are taken from one onnxruntime run with the operands of every product exposed as
    extra outputs, so dynamic reshapes are resolved exactly. Counts 2·M·N·K per product
    (MatMul, Gemm and their integer, 4-bit and fused forms) and, for fused attention ops,
    2·B·S·T·(Dqk + Dv) for the two attention products (plus the packed QKV projection of
    com.microsoft.Attention / QAttention); element-wise work is not counted.
    """
    targets = []
    added = []
    existing = {v.name for v in model.graph.outputs}
    for node in model.graph:
        key = (node.domain, node.op_type)
        if key not in _MATMUL_LIKE and key not in FUSED_ATTENTION_OPS and key != ("com.microsoft", "QAttention"):
            continue
        for v in (*node.inputs[:3], *node.outputs[:2]):
            if v is not None and v.name not in existing and v.const_value is None and not v.is_graph_input():
                added.append(v)
                existing.add(v.name)
        targets.append(node)
    with exposed_outputs(model, added):  # the operands as extra outputs of one run
        outputs = run(model, feeds)

    def shape_of(v: ir.Value | None) -> tuple[int, ...] | None:
        if v is None:
            return None
        if v.const_value is not None:
            return tuple(v.const_value.shape)
        if v.is_graph_input():
            return tuple(feeds[v.name].shape)
        return tuple(outputs[v.name].shape) if v.name in outputs else None

    total = 0
    by_op: collections.Counter[str] = collections.Counter()
    for node in targets:
        flops = _node_flops(node, shape_of)
        total += flops
        by_op[node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}"] += flops
    return {"total": total, "by_op": dict(by_op), "shapes": {k: list(v.shape) for k, v in feeds.items()}}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _node_flops(node: ir.Node, shape_of) -> int:
    out = shape_of(node.outputs[0])
    a = shape_of(node.inputs[0])
    if out is None or a is None:
        return 0
    key = (node.domain, node.op_type)
    if key == ("com.microsoft", "MatMulNBits"):
        return 2 * _prod(a[:-1]) * node.attributes.get_int("K", a[-1]) * node.attributes.get_int("N", 0)
    if key in _MATMUL_LIKE:
        trans_a = node.op_type in ("Gemm", "QGemm") and node.attributes.get_int("transA", 0)
        k = a[0] if trans_a else a[-1]
        return 2 * _prod(out) * int(k)
    # Attention: the query's sequence S, the keys' length T, B·S·(Dqk + Dv) from the query and output.
    if node.op_type in ("Attention", "QAttention") and node.domain == "com.microsoft":
        weights = shape_of(node.inputs[1])
        projection = 2 * _prod(a) * int(weights[-1]) if weights else 0
        return projection + 4 * _prod(out) * int(a[1] if len(a) == 3 else a[-2])
    if node.op_type == "GroupQueryAttention":
        present = shape_of(node.outputs[1]) if len(node.outputs) > 1 else None
        kv_len = present[2] if present else a[1]
        return 4 * _prod(out) * int(kv_len)
    key_shape = shape_of(node.inputs[1]) if len(node.inputs) > 1 else None
    if key_shape is None:
        return 4 * _prod(out) * int(a[-2] if len(a) == 4 else a[1])
    # Keys as (B, N, T, H), or (B, T, D) / packed (B, T, N, 2, H): T is axis 2 for rank 4, else axis 1.
    kv_len = key_shape[2] if len(key_shape) == 4 else key_shape[1]
    return 4 * _prod(out) * int(kv_len)
