"""Graph helpers of pipeline partitioning: what a node reads (subgraphs included), concrete values
and costs (roofline or profiled), and value descriptions for stage boundaries."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.signature import _describe, _dtype_name  # noqa: F401 - used here and by stage boundaries

CHEAP_OPS = frozenset({
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Constant",
    "ConstantOfShape", "Range", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
    "And", "Or", "Where", "Add", "Sub", "Mul", "Div", "Max", "Min", "Reshape", "Identity", "Expand",
    "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Neg", "Abs", "Mod", "Sqrt", "Ceil", "Floor",
})
_INT_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8})
_ELEMENTWISE_FLOPS = {"LayerNormalization": 8, "SkipLayerNormalization": 9, "Softmax": 5, "Gelu": 8, "FastGelu": 8,
                      "BiasGelu": 9, "Erf": 8, "Tanh": 6, "Pow": 2, "Sqrt": 2, "Div": 1}



# ---------------------------------------------------------------------------------------------
# graph analysis


def _subgraph_uses(node: ir.Node, top_values: set) -> list[ir.Value]:
    """Values of the top graph that a node's subgraphs (If/Loop/Scan bodies) read from outer scope."""
    found = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            for inner in g:
                for v in inner.inputs:
                    if v is not None and v in top_values:
                        found.append(v)
                found += _subgraph_uses(inner, top_values)
    return found


def _uses(node: ir.Node, top_values: set) -> list[ir.Value]:
    seen, out = set(), []
    for v in [*node.inputs, *_subgraph_uses(node, top_values)]:
        if v is not None and v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _concrete_values(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every top-level value of one onnxruntime run (graph optimizations off)."""
    from tfgraph.compiler.verify import run

    from tfgraph.ir import exposed_outputs

    with exposed_outputs(model, (v for node in model.graph for v in node.outputs if v.name)):
        values = run(model, feeds)
    values.update(feeds)
    return values


def _node_flops(node: ir.Node, shape, dims_out) -> float:
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    out_n = float(np.prod(dims_out(out))) if out is not None and dims_out(out) is not None else 0.0
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "MatMulNBits"):
        a = shape(node.inputs[0])
        return 2.0 * out_n * (a[-1] if a else 1)
    if op == "Gemm":
        a = shape(node.inputs[0])
        k = a[0] if node.attributes.get_int("transA", 0) else a[-1]
        return 2.0 * out_n * k
    if op == "Attention":  # com.microsoft: fused QKV projection + attention
        x = shape(node.inputs[0])
        w = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if node.domain == "com.microsoft" and x and w and len(x) == 3:
            b, s, d = x
            return 2.0 * b * s * d * w[-1] + 4.0 * b * s * s * (w[-1] / 3)
        q = shape(node.inputs[0])
        k = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else q
        if q and k:
            skv = k[-2] if len(k) == 4 else k[1]
            return 4.0 * out_n * skv
    if op in ("MultiHeadAttention", "GroupQueryAttention", "SparseAttention"):
        k = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        skv = (k[-2] if len(k) == 4 else k[1]) if k else (shape(node.inputs[0]) or [0, 0])[1]
        return 4.0 * out_n * skv
    return out_n * _ELEMENTWISE_FLOPS.get(op, 1)


def _profile_costs(model: ir.Model, feeds: Mapping[str, np.ndarray], runs: int = 10) -> dict[str, float]:
    """Kernel time (s) per node name from an onnxruntime profile (graph optimizations off, so names match)."""
    from tfgraph.providers import Provider
    from tfgraph.deploy.runtime import CPU
    from tfgraph.deploy.runtime import session as make_session

    with tempfile.TemporaryDirectory(prefix="tfgraph-profile-") as tmp:
        options = {"graph_optimization_level": "ORT_DISABLE_ALL", "enable_profiling": True,
                   "profile_file_prefix": os.path.join(tmp, "profile")}
        session = make_session(model, [Provider(CPU)], options=options)
        for _ in range(runs + 1):
            session.run(None, dict(feeds))
        path = session.end_profiling()
        events = json.loads(pathlib.Path(path).read_text())
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] * 1e-6)
    # Drop the first (warm-up) run: take the median over the runs.
    return {name: float(np.median(ts[1:] if len(ts) > 1 else ts)) for name, ts in totals.items()}


def _value_info(v: ir.Value, a: np.ndarray | None, known: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    if (v.is_graph_input() or v.is_graph_output()) and v.name in known and known[v.name].type.HasField("tensor_type"):
        info = onnx.ValueInfoProto()
        info.CopyFrom(known[v.name])
        return info
    if v.dtype is not None:
        elem = v.dtype.value
    elif a is not None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
    else:
        raise BadInputError(f"value '{v.name}' crosses a stage boundary but has no known type")
    rank = a.ndim if a is not None else (len(v.shape) if v.shape is not None else None)
    # Rank only: dims stay dynamic so stages take any batch/sequence (micro-batches).
    return onnx.helper.make_tensor_value_info(v.name, elem, [None] * rank if rank is not None else None)


def _as_ir(model) -> ir.Model:
    from tfgraph import ir as tir

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    path = pathlib.Path(model)
    if path.is_dir():
        from tfgraph.deploy.artifact import MODEL_FILE, read_manifest

        read_manifest(path)
        path = path / MODEL_FILE
    if not path.is_file():
        raise BadInputError(f"{model}: no such model file or artifact folder")
    return tir.load(path).model
