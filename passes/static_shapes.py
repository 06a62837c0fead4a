"""Static-shape specialization: every shape computation folded to constants (NPU compilers take
static graphs only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tfgraph.errors import BadInputError
from tfgraph.passes.registry import register_pass

# Ops whose output is a shape/size read off a tensor: constant once the tensor's shape is static.
_SHAPE_READS = ("Shape", "Size")
# Ops with a shape-like input (index) that must end up constant on a static graph.
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Range": 0}


def _static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _dims(shape: ir.Shape | None) -> list:
    return [] if shape is None else [d if isinstance(d, int) else (d.value or "?") for d in shape]


def pin_input_shapes(graph: ir.Graph, shapes: Mapping[str, Any]) -> bool:
    """Fix graph input dims from ``shapes`` (``name -> tuple`` for an input, ``symbol -> int`` for a
    named dimension, as ``tfgraph.compiler.verify.parse_shapes`` gives). A whole input shape also fixes the
    named dims it binds (``input_ids=1x128`` on ``(batch, sequence)``: batch 1, sequence 128 for
    every input sharing them). True when a dim changed."""
    shapes = dict(shapes)
    for value in graph.inputs:  # symbols bound by whole shapes (explicit symbol sizes win)
        given = shapes.get(value.name)
        if isinstance(given, tuple) and value.shape is not None and len(given) == len(value.shape):
            for dim, size in zip(value.shape, given):
                if not isinstance(dim, int) and dim.value and dim.value not in shapes:
                    shapes[dim.value] = int(size)
    changed = False
    for value in graph.inputs:
        if value.shape is None:
            if isinstance(shapes.get(value.name), tuple):
                value.shape = ir.Shape(list(shapes[value.name]))
                changed = True
            continue
        given = shapes.get(value.name)
        if isinstance(given, tuple):
            if len(given) != len(value.shape):
                raise BadInputError(
                    f"--shape {value.name}={'x'.join(map(str, given))}: the input has rank {len(value.shape)} "
                    f"({_dims(value.shape)})")
            for axis, (old, new) in enumerate(zip(value.shape, given)):
                if isinstance(old, int) and old != new:
                    raise BadInputError(
                        f"--shape {value.name}={'x'.join(map(str, given))}: dimension {axis} is fixed at {old}")
            new_shape = list(given)
        else:
            new_shape = [d if isinstance(d, int) or d.value not in shapes or isinstance(shapes[d.value], tuple)
                         else int(shapes[d.value]) for d in value.shape]
        if _dims(value.shape) != new_shape:
            value.shape = ir.Shape(new_shape)
            changed = True
    return changed


def _const_node(graph: ir.Graph, before: ir.Node, array: np.ndarray, name: str) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array)}, name=name)
    out = node.outputs[0]
    out.name = name
    out.dtype = ir.DataType.from_numpy(array.dtype)
    out.shape = ir.Shape(array.shape)
    out.const_value = ir.tensor(array)
    graph.insert_before(before, node)
    return out


def _graph_key(graph: ir.Graph) -> list:
    key = []
    for node in graph:
        key.append((node.op_type, node.domain, tuple(id(v) for v in node.inputs),
                    tuple(str(a) for a in node.attributes.values())))
    return key


@register_pass("specialize-shapes")
class SpecializeShapesPass(ir.passes.InPlacePass):
    """Specialize a graph whose inputs have fully static shapes: propagate the shapes, replace
    ``Shape``/``Size`` of static tensors and every computation on them (``Gather``/``Concat``/
    arithmetic, ``ConstantOfShape``, ``Range``, ...) by constants, make every ``Reshape`` take a
    constant target shape without ``0``/``-1`` (its inferred output shape), and annotate every value,
    graph outputs included, with its static shape.

    ``shapes`` (optional; ``name=DIMS`` of inputs or ``symbol=N`` of named dims, as ``--shape``) pins
    the inputs first; ``tfgraph compile`` pins them itself for ``static_shapes`` targets. An input
    whose dims are still symbolic is a :class:`BadInputError` naming it. Only the main graph is
    specialized (not subgraphs or function bodies: inline neutral operators first). The report lists
    the shape reads and dynamic ``Reshape`` shapes left, if any (``dynamic_left``).
    """

    def __init__(self, *, shapes: Mapping[str, Any] | None = None, max_rounds: int = 8,
                 output_size_limit: int = 1 << 20):
        super().__init__()
        self.shapes = dict(shapes or {})
        self.max_rounds = max_rounds
        # Folded shape-derived tensors (a causal mask at sequence 512 is 262 144 elements).
        self.output_size_limit = output_size_limit
        self.report: dict[str, Any] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before_inputs = [v.shape for v in graph.inputs]
        modified = pin_input_shapes(graph, self.shapes) if self.shapes else False
        missing = [f"{v.name} {_dims(v.shape) if v.shape is not None else '(no shape)'}"
                   for v in graph.inputs if not _static(v.shape)]
        if missing:
            for value, shape in zip(graph.inputs, before_inputs):  # a failed pass changes nothing
                value.shape = shape
            raise BadInputError(
                "static shapes required: input(s) with unknown dimensions: " + "; ".join(missing)
                + " (pass --shape NAME=DIMS, e.g. --shape input_ids=1x128)")
        before_shapes = self._shape_key(graph)
        counts = {"shape_reads": 0, "reshape_shapes": 0, "rounds": 0}
        for _ in range(self.max_rounds):
            counts["rounds"] += 1
            key = _graph_key(graph)
            self._infer(model)
            changed = self._replace_shape_reads(graph, counts)
            changed |= self._fold(model)
            changed |= self._static_shape_inputs(graph, counts)
            changed |= self._gathernd_to_reshape(graph, counts)
            changed |= RemoveUnusedNodesPass()(model).modified
            changed = changed or _graph_key(graph) != key
            modified |= changed
            if not changed:
                break
        self._infer(model)
        modified |= self._shape_key(graph) != before_shapes
        self.report = {
            **{k: v for k, v in counts.items() if v},
            "dynamic_left": self._dynamic_left(graph),
            "unknown_shapes": sum(1 for n in graph for v in n.outputs if not _static(v.shape)),
        }
        return ir.passes.PassResult(model, modified)

    # -- shape propagation -----------------------------------------------------------------
    @staticmethod
    def _shape_key(graph: ir.Graph) -> list:
        return [(v.name, None if v.shape is None else tuple(_dims(v.shape))) for n in graph for v in n.outputs]

    def _infer(self, model: ir.Model) -> None:
        """Fresh shapes from the static inputs: the symbolic annotations of earlier inference would
        otherwise win over the concrete ones (ONNX inference merges into what is there)."""
        from tfgraph.passes.shape_inference import ShapeInferencePass, _symbolic
        from tfgraph.ir import PROTOBUF_LIMIT, model_bytes

        graph = model.graph
        old: dict[ir.Value, tuple] = {}
        for node in graph:
            for v in node.outputs:
                old[v] = (v.shape, v.dtype)
                v.shape = None
        for v in graph.outputs:
            old.setdefault(v, (v.shape, v.dtype))
            v.shape = None
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        if model_bytes(model) < PROTOBUF_LIMIT // 2:
            _symbolic(model)  # com.microsoft ops ONNX inference does not know
        # A value neither engine could shape keeps its old annotation (symbolic dims tell what is left).
        for v, (shape, dtype) in old.items():
            if v.shape is None and shape is not None:
                v.shape = shape
            if v.dtype is None and dtype is not None:
                v.dtype = dtype

    # -- rewrites --------------------------------------------------------------------------
    @staticmethod
    def _replace_shape_reads(graph: ir.Graph, counts: dict) -> bool:
        changed = False
        for node in list(graph):
            if node.op_type not in _SHAPE_READS or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
                continue
            x, out = node.inputs[0], node.outputs[0]
            if not _static(x.shape) or out.is_graph_output():
                continue
            dims = [int(d) for d in x.shape]
            if node.op_type == "Size":
                array = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
            else:
                rank = len(dims)
                start = node.attributes.get_int("start", 0)
                end = node.attributes.get_int("end", rank)
                start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
                start, end = max(0, min(start, rank)), max(0, min(end, rank))
                array = np.array(dims[start:end], dtype=np.int64)
            const = _const_node(graph, node, array, f"{out.name}_static")
            ir.convenience.replace_all_uses_with(out, const)
            graph.remove(node, safe=True)
            counts["shape_reads"] += 1
            changed = True
        return changed

    def _fold(self, model: ir.Model) -> bool:
        from onnxscript.optimizer import _constant_folding

        def should_fold(node: ir.Node) -> bool | None:
            # ConstantOfShape (kept by the folder's defaults) becomes its value: a static graph has no
            # shape-driven ops left (the output size limit still applies).
            if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
                return True
            # Never copy a shared weight (as fold-constants); shape arithmetic is small.
            for value in node.inputs:
                tensor = value.const_value if value is not None else None
                if tensor is not None and tensor.size > 1024 and len(value.uses()) > 1:
                    return False
            return None

        folder = _constant_folding.FoldConstantsPass(
            shape_inference=False, input_size_limit=8192, output_size_limit=self.output_size_limit,
            should_fold=should_fold)
        return folder(model).modified

    @staticmethod
    def _static_shape_inputs(graph: ir.Graph, counts: dict) -> bool:
        """Each ``Reshape`` whose output shape is static takes exactly that shape as a constant (no 0/-1);
        ``Expand``/``Tile``/``ConstantOfShape`` inputs are left to folding."""
        changed = False
        made: dict[tuple, ir.Value] = {}
        for node in list(graph):
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            out = node.outputs[0]
            if not _static(out.shape):
                continue
            dims = tuple(int(d) for d in out.shape)
            if 0 in dims:
                continue  # an empty tensor: 0 would mean "copy" without allowzero
            current = node.inputs[1]
            if current is not None and current.const_value is not None:
                if tuple(int(d) for d in current.const_value.numpy().reshape(-1)) == dims:
                    continue
            if dims not in made:
                made[dims] = _const_node(graph, node, np.array(dims, dtype=np.int64),
                                         f"{out.name}_shape_static")
            node.replace_input_with(1, made[dims])
            if node.attributes.get_int("allowzero", 0):
                node.attributes.pop("allowzero")  # the explicit dims hold no 0 that could mean "copy"
            counts["reshape_shapes"] += 1
            changed = True
        graph.sort()
        return changed

    @staticmethod
    def _gathernd_to_reshape(graph: ir.Graph, counts: dict) -> bool:
        """``GatherND(x, indices)`` whose constant indices (built from ``Range`` over dims that are now
        static: SDPA's mask reads ``mask[batch, key]`` this way) enumerate the leading axes of ``x`` in
        order is a ``Reshape`` of ``x`` (QNN HTP has no GatherND: measured, it falls back to CPU)."""
        changed = False
        for node in list(graph):
            if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("batch_dims", 0):
                continue
            x, indices, out = node.inputs[0], node.inputs[1], node.outputs[0]
            if indices is None or indices.const_value is None or not _static(x.shape) or not _static(out.shape):
                continue
            idx = indices.const_value.numpy().astype(np.int64)
            dims = [int(d) for d in x.shape]
            k = idx.shape[-1] if idx.ndim else 0
            if not 0 < k <= len(dims):
                continue
            lead = dims[:k]
            flat = np.ravel_multi_index(tuple(np.mod(idx.reshape(-1, k), lead).T), lead)
            if not np.array_equal(flat, np.arange(int(np.prod(lead)))):
                continue
            target = np.array([int(d) for d in out.shape], dtype=np.int64)
            if 0 in target:
                continue
            shape = _const_node(graph, node, target, f"{out.name}_shape_static")
            reshape = ir.node("Reshape", [x, shape], name=f"{node.name}_reshape")
            reshape.outputs[0].dtype, reshape.outputs[0].shape = out.dtype, out.shape
            graph.insert_before(node, reshape)
            ir.convenience.replace_all_uses_with(out, reshape.outputs[0], replace_graph_outputs=True)
            name = out.name
            graph.remove(node, safe=True)
            reshape.outputs[0].name = name
            counts["gathernd_reshaped"] = counts.get("gathernd_reshaped", 0) + 1
            changed = True
        return changed

    @staticmethod
    def _dynamic_left(graph: ir.Graph) -> list[str]:
        left = []
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in _SHAPE_READS or node.op_type == "GatherND":
                left.append(f"{node.op_type} {node.name}")
            index = _SHAPE_INPUTS.get(node.op_type)
            if index is not None and index < len(node.inputs) and node.inputs[index] is not None:
                value = node.inputs[index]
                if value.const_value is None:
                    left.append(f"{node.op_type} {node.name} (input {index} not constant)")
                elif node.op_type == "Reshape" and np.any(value.const_value.numpy() <= 0):
                    left.append(f"Reshape {node.name} (shape {value.const_value.numpy().tolist()})")
        return left
