"""Lowering ``tfgraph.Attention`` to the operator a target runs best."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tfgraph import ops
from tfgraph.errors import BadInputError
from tfgraph.passes.registry import register_pass

LOWERINGS = ("com.microsoft.MultiHeadAttention", "function")


def _same_dim(a, b) -> bool:
    return a is not None and b is not None and (a == b) and (isinstance(a, int) or str(a) != "")


def _const(graph_nodes: list, array: np.ndarray) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
    graph_nodes.append(node)
    return node.outputs[0]


def _lower_to_mha(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    q, k, v, bias = node.inputs
    heads = node.attributes.get_int("num_heads")
    scale = node.attributes.get_float("scale")
    kind = node.attributes.get_string("mask_kind", "bias")
    new: list[ir.Node] = []
    attention_bias = None
    if kind != "none":
        attention_bias = bias
        full = (
            bias.shape is not None
            and len(bias.shape) == 4
            and q.shape is not None
            and k.shape is not None
            and _same_dim(bias.shape[2], q.shape[1])
            and _same_dim(bias.shape[3], k.shape[1])
        )
        if not full:
            # MultiHeadAttention wants (B|1, N|1, S, T): broadcast query/key lengths in explicitly.
            sq = ir.node("Shape", [q], attributes={"start": 1, "end": 2})
            sk = ir.node("Shape", [k], attributes={"start": 1, "end": 2})
            ones = _const(new, np.array([1, 1], dtype=np.int64))
            shape = ir.node("Concat", [ones, sq.outputs[0], sk.outputs[0]], attributes={"axis": 0})
            expand = ir.node("Expand", [bias, shape.outputs[0]])
            new += [sq, sk, shape, expand]
            attention_bias = expand.outputs[0]
    inputs = [q, k, v, None, None, attention_bias] if attention_bias is not None else [q, k, v]
    mha = ir.node(
        "MultiHeadAttention",
        inputs,
        attributes={"num_heads": heads, "scale": scale},
        domain="com.microsoft",
        name=node.name,
    )
    new.append(mha)
    return new, mha.outputs[0]


@register_pass("lower-attention")
class LowerAttentionPass(ir.passes.InPlacePass):
    """Replace ``tfgraph.Attention`` with the target's operator.

    ``to="com.microsoft.MultiHeadAttention"``: onnxruntime's fused kernel (CPU and
    CUDA), the exporter's additive mask passed as ``attention_bias``.
    ``to="function"``: keep the neutral op; it runs as its standard-ONNX function body.
    """

    def __init__(self, *, to: str = "com.microsoft.MultiHeadAttention"):
        super().__init__()
        if to not in LOWERINGS:
            raise BadInputError(f"unknown attention lowering '{to}'; choose one of {', '.join(LOWERINGS)}")
        self.to = to
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        if self.to != "function":
            for graph in model.graphs():
                for node in list(graph):
                    if node.domain != ops.DOMAIN or node.op_type != "Attention":
                        continue
                    new_nodes, output = _lower_to_mha(node)
                    output.name, output.shape, output.type = node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
                    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [output])
                    count += 1
            if count:
                model.opset_imports.setdefault("com.microsoft", 1)
        self.report = {self.to: {"matches": count}}
        return ir.passes.PassResult(model, count > 0)
