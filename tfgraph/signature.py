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
