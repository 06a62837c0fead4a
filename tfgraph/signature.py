"""A graph's input signature and value descriptions: what verification generates inputs for and what
serving and Triton export check requests against. Bottom layer (no compile- or run-time imports)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError


def _gather_index_bound(value: ir.Value) -> int | None:
    """When ``value`` indexes a constant table (Gather), the table's size along the gathered axis."""
    bound = None
    for node, index in value.uses():
        if node.op_type == "Gather" and node.domain == "" and index == 1:
            data = node.inputs[0]
            if data is not None and data.const_value is not None:
                axis = node.attributes.get_int("axis", 0)
                size = data.const_value.shape[axis]
                if isinstance(size, int):
                    bound = size if bound is None else min(bound, size)
        elif node.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity") and index == 0:
            for out in node.outputs:
                inner = _gather_index_bound(out)
                if inner is not None:
                    bound = inner if bound is None else min(bound, inner)
    return bound


@dataclasses.dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_signature(model: ir.Model) -> list[InputInfo]:
    infos = []
    for value in model.graph.inputs:
        if value.dtype is None or value.shape is None:
            raise BadInputError(f"graph input '{value.name}' has no type or shape; cannot generate inputs for it")
        dims = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        infos.append(InputInfo(value.name, value.dtype.numpy(), dims))
    return infos


def _dtype_name(v: ir.Value, arr: np.ndarray | None) -> str:
    if v.dtype is not None:
        return v.dtype.name.lower()
    return str(arr.dtype) if arr is not None else "unknown"


def _describe(v: ir.Value, a: np.ndarray | None) -> dict:
    if v.shape is not None:
        dims = [d if isinstance(d, int) else (d.value or None) for d in v.shape]
    elif a is not None:
        dims = [None] * a.ndim
    else:
        dims = None
    return {"name": v.name, "dtype": _dtype_name(v, a), "shape": dims}


# Ops positions pass through on their way from a Range (or a position buffer) to the table's Gather.
_POSITION_PASS_THROUGH = frozenset({"Unsqueeze", "Squeeze", "Cast", "Expand", "Reshape", "Identity", "Add", "Flatten"})


def position_limit(model: ir.Model) -> int | None:
    """How many positions the model's position table holds (the longest sequence it can run), when it
    has one: the rows of a constant 2-D table gathered by positions the graph computes itself — a
    Range, or a slice of a constant 0, 1, 2, … buffer — or of a table named like a position table.
    Indices straight from a graph input (token ids, explicit ``position_ids``) do not bound the length.
    None when the graph shows no such table."""
    limits = []
    for node in model.graph.all_nodes():
        if node.op_type != "Gather" or node.domain != "" or len(node.inputs) < 2:
            continue
        table, index = node.inputs[0], node.inputs[1]
        if table is None or table.const_value is None or index is None or index.producer() is None:
            continue
        shape = table.const_value.shape
        if len(shape) != 2 or node.attributes.get_int("axis", 0) != 0 or not isinstance(shape[0], int):
            continue
        if _computed_positions(index) or "position" in (table.name or "").lower():
            limits.append(shape[0])
    return min(limits) if limits else None


def _computed_positions(value: ir.Value | None, depth: int = 0) -> bool:
    node = value.producer() if value is not None else None
    if node is None or depth > 8:
        return False
    if node.op_type == "Range":
        return True
    if node.op_type == "Slice" and node.inputs and node.inputs[0] is not None and node.inputs[0].const_value is not None:
        data = node.inputs[0].const_value.numpy()  # a buffer of positions, not e.g. a token-type buffer of zeros
        flat = data.reshape(-1) if data.ndim <= 1 else data.reshape(-1, data.shape[-1])[0]
        return data.size > 2 and np.issubdtype(data.dtype, np.integer) and np.array_equal(flat, np.arange(flat.size))
    if node.op_type in _POSITION_PASS_THROUGH:
        return any(_computed_positions(i, depth + 1) for i in node.inputs if i is not None and i.const_value is None)
    return False
