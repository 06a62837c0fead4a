"""Model analysis behind ``tfgraph inspect``: ops, parameters, FLOPs, attention blocks, duplicate weights."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any

import onnx_ir as ir

from tfgraph.ir import iter_tensors, model_bytes, parameter_count
from tfgraph.ops import BLOCKED_FORM, STANDARD_FORM, attention_form

# Ops that pass a tensor through without changing which positions it mixes: walked over when
# looking for the MatMuls on either side of a Softmax.
_PASS_THROUGH = frozenset(
    {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Dropout", "Identity", "Reshape", "Transpose", "Clip", "Max", "Min",
     "IsNaN", "Not", "Equal", "Expand", "Squeeze", "Unsqueeze", "Tanh", "CastLike"}
)
FUSED_ATTENTION_OPS = frozenset(
    {
        ("", "Attention"),
        ("com.microsoft", "Attention"),
        ("com.microsoft", "MultiHeadAttention"),
        ("com.microsoft", "GroupQueryAttention"),
        ("com.microsoft", "QAttention"),
        ("com.microsoft", "SparseAttention"),
        ("com.microsoft", "PackedAttention"),
        ("com.microsoft", "PackedMultiHeadAttention"),
        ("com.microsoft", "LongformerAttention"),
        ("tfgraph", "Attention"),
        ("tfgraph", "AttentionBHSD"),
    }
)
_MAX_WALK = 12


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for graph in model.graphs():
        for node in graph:
            counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(counts.most_common())


_LAYOUT = frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Expand"})


def _constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant (an initializer or Constant, possibly moved by layout ops): a weight."""
    for _ in range(8):
        if value is None:
            return False
        if value.const_value is not None:
            return True
        node = value.producer()
        if node is None or node.op_type not in _LAYOUT | {"Constant"}:
            return False
        if node.op_type == "Constant":
            return True
        value = node.inputs[0]
    return False


def _reaches_matmul_upstream(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether ``value`` is computed from a product with non-constant keys (``Q·Kᵀ``): a product with a
    constant right operand is a projection ``x·W`` (a router's gate, ConvBERT's span-based dynamic
    convolution kernel), not attention scores."""
    if value is None or depth > _MAX_WALK:
        return False
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "MatMul" and node.domain == "":
        return not _constant(node.inputs[1])
    if node.op_type == "Einsum" and node.domain == "":
        return not any(_constant(v) for v in node.inputs)
    if node.op_type in _PASS_THROUGH:
        # Follow the data input (first); for Where, the two branches.
        candidates = node.inputs[1:] if node.op_type == "Where" else node.inputs[:1]
        if node.op_type in ("Add", "Mul", "Div", "Sub"):
            candidates = node.inputs
        return any(_reaches_matmul_upstream(v, depth + 1) for v in candidates)
    return False


def _reaches_matmul_downstream(value: ir.Value, depth: int = 0) -> bool:
    if depth > _MAX_WALK:
        return False
    for node, _ in value.uses():
        if node.op_type in ("MatMul", "Einsum") and node.domain == "":
            return True
        if node.op_type in _PASS_THROUGH and any(_reaches_matmul_downstream(o, depth + 1) for o in node.outputs):
            return True
    return False


# Readable prefixes of the node names of those forms (for people reading the graph; not how they are counted).
BLOCKED_ATTENTION_MARK = "tfgraph.blocked_attention"
# In the Softmax names of a neutral attention op inlined into standard ops on purpose (inline-neutral-ops).
STANDARD_ATTENTION_MARK = "tfgraph.standard_attention"


def _scan_attention(graph: ir.Graph) -> tuple[collections.Counter, list[str]]:
    fused: collections.Counter = collections.Counter()
    softmax_blocks: list[str] = []
    for node in graph:
        if (node.domain, node.op_type) in FUSED_ATTENTION_OPS:
            fused[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
        elif node.op_type == "Softmax" and node.domain == "" and attention_form(node) == BLOCKED_FORM:
            fused["tfgraph::BlockedAttention"] += 1
        elif node.op_type == "Softmax" and node.domain == "" and attention_form(node) == STANDARD_FORM:
            fused["tfgraph::StandardAttention"] += 1
        elif node.op_type == "Softmax" and node.domain == "":
            if _reaches_matmul_upstream(node.inputs[0]) and _reaches_matmul_downstream(node.outputs[0]):
                softmax_blocks.append(node.name or "")
        elif node.op_type == "If" and node.domain == "":
            # One attention block that picks its form at run time: counted once, as "If[then|else]".
            branches = [_scan_attention(attr.value) for attr in node.attributes.values() if attr.type == ir.AttributeType.GRAPH]
            if any(f for f, _ in branches):
                forms = "|".join("+".join(sorted(f)) or "-" for f, _ in branches)
                fused[f"If[{forms}]"] += max(sum(f.values()) for f, _ in branches)
            for _, unfused in branches[:1]:
                softmax_blocks.extend(unfused)
    return fused, softmax_blocks


def attention_blocks(model: ir.Model) -> dict[str, Any]:
    """Softmax-based attention subgraphs (a MatMul before the Softmax, one after) and fused attention ops.

    The blocked windowed form counts as fused (``tfgraph::BlockedAttention``), as does a neutral
    attention op inlined into standard ops for a target (``tfgraph::StandardAttention``); an ``If``
    that picks between two forms of one block at run time counts once."""
    fused, softmax_blocks = _scan_attention(model.graph)
    return {"unfused": len(softmax_blocks), "fused": sum(fused.values()), "fused_ops": dict(fused), "softmax_nodes": softmax_blocks}


@dataclasses.dataclass
class DuplicateGroup:
    names: list[str]
    shape: list[int]
    dtype: str
    nbytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def duplicate_groups(graph: ir.Graph) -> list[list[ir.Value]]:
    """Initializers of ``graph`` with identical dtype, shape and bytes (content hash, then byte compare).

    Each group lists the values in graph order; groups with one member are left out.
    """
    # Only the hashes are kept (holding every tensor's bytes at once doubled the model in memory);
    # the bytes are read again for the rare hash collisions.
    buckets: dict[tuple, list[ir.Value]] = collections.defaultdict(list)
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        key = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).hexdigest())
        buckets[key].append(value)
    groups = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        pairs = [(v, v.const_value.tobytes()) for v in members]
        while len(pairs) >= 2:
            first = pairs[0][1]
            same = [v for v, data in pairs if data == first]
            if len(same) >= 2:
                groups.append(same)
            pairs = [(v, data) for v, data in pairs if data != first]
    return groups


def duplicate_initializers(model: ir.Model) -> list[DuplicateGroup]:
    """Every group of byte-identical initializers, largest waste first."""
    groups = []
    for graph in model.graphs():
        for values in duplicate_groups(graph):
            tensor = values[0].const_value
            groups.append(DuplicateGroup([v.name for v in values], list(tensor.shape), str(tensor.dtype), tensor.nbytes))
    return sorted(groups, key=lambda g: -g.nbytes * (len(g.names) - 1))


def _dims(value: ir.Value) -> list[str]:
    return [] if value.shape is None else [str(d) for d in value.shape]


def summarize(model: ir.Model) -> dict[str, Any]:
    dups = duplicate_initializers(model)
    return {
        "graph": model.graph.name,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _dims(v)} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _dims(v)} for v in model.graph.outputs],
        "nodes": sum(1 for g in model.graphs() for _ in g),
        "ops": op_histogram(model),
        "parameters": parameter_count(model),
        "bytes": model_bytes(model),
        "tensors": sum(1 for _ in iter_tensors(model)),
        "attention": attention_blocks(model),
        "duplicate_initializers": [g.to_json() for g in dups],
        "duplicate_bytes": sum(g.nbytes * (len(g.names) - 1) for g in dups),
    }


def stored_duplicates(model: ir.Model) -> list[DuplicateGroup]:
    """Byte-identical initializer groups that could be stored once (graph inputs and outputs, which a
    user may override or read, excluded): what a finished compile must not contain."""
    groups = []
    for graph in model.graphs():
        for values in duplicate_groups(graph):
            values = [v for v in values if not v.is_graph_input() and not v.is_graph_output()]
            if len(values) >= 2:
                tensor = values[0].const_value
                groups.append(DuplicateGroup([v.name for v in values], list(tensor.shape), str(tensor.dtype), tensor.nbytes))
    return groups


def weights_report(model: ir.Model, bytes_before: int) -> dict[str, int]:
    """Initializer bytes before/after compiling, and how many of them are unique (stored once)."""
    after = model_bytes(model)
    duplicate = sum(g.nbytes * (len(g.names) - 1) for g in duplicate_initializers(model))
    return {"bytes_before": bytes_before, "bytes_after": after, "unique_bytes": after - duplicate, "duplicate_bytes": duplicate}
