"""Symbolic shape inference, as a pass."""

from __future__ import annotations

import logging
import re

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from tfgraph.ir import PROTOBUF_LIMIT, model_bytes
from tfgraph.passes.element_types import fill_element_types, symbolic_engine
from tfgraph.passes.registry import register_pass

logger = logging.getLogger(__name__)


def _shape_key(model: ir.Model) -> list:
    return [
        (v.name, str(v.type), None if v.shape is None else tuple(str(d) for d in v.shape))
        for g in model.graphs()
        for n in g
        for v in n.outputs
    ]


def _symbolic(model: ir.Model) -> bool:
    """onnxruntime's sympy-based inference: tracks symbolic dims through Shape/Gather/Concat/Reshape
    chains and broadcasts, where ONNX inference gives up (fresh ``unk__`` dims).

    Driven step by step rather than through ``SymbolicShapeInference.infer_shapes``, which
    raises on the first op it cannot handle (e.g. ReduceL2) and then writes a debug file
    into the working directory: here the shapes inferred up to that op are kept.
    """
    proto = ir.serde.serialize_model(model)
    engine = symbolic_engine()
    try:
        engine._preprocess(proto)
        while engine.run_:
            engine._infer_impl()
    except Exception as e:  # an op it does not know: keep what was inferred before it
        logger.info("symbolic shape inference stopped early (%s: %s)", type(e).__name__, e)
    known = getattr(engine, "known_vi_", None)
    if not known:
        return False
    by_name = {v.name: v for g in model.graphs() for n in g for v in n.outputs}
    for name, info in known.items():
        value = by_name.get(name)
        if value is None or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type and value.dtype is None:
            value.dtype = ir.DataType(tensor_type.elem_type)
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
            value.shape = ir.Shape(dims)
    return True


_FAILING_NODE = re.compile(r"node name: ([^)]*)\)")


def _drop_contradicted(model: ir.Model, onnx_shapes: dict[str, ir.Shape | None], limit: int = 50) -> int:
    """Put back ONNX's own shape on the outputs of every node at which ONNX's strict inference
    contradicts a symbolic shape (onnxruntime's engine can be wrong: it broadcast (1, 1, Min(30, S),
    Min(30, S)) with (B, 1, 1, S) into (B, 2, S, S) on a TorchScript export); everything symbolic,
    if the failing node cannot be told. Returns how many nodes were put back."""
    nodes = {n.name: n for g in model.graphs() for n in g if n.name}
    restored = 0
    for _ in range(limit):
        try:
            onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), check_type=True, strict_mode=True,
                                              data_prop=True)
            return restored
        except Exception as e:  # noqa: BLE001 - onnx raises several types
            match = _FAILING_NODE.search(str(e))
            node = nodes.get(match.group(1)) if match else None
            if node is None or all(onnx_shapes.get(v.name, v.shape) == v.shape for v in node.outputs):
                break
            for value in node.outputs:
                value.shape = onnx_shapes.get(value.name)
            restored += 1
    for g in model.graphs():
        for n in g:
            for value in n.outputs:
                if value.name in onnx_shapes:
                    value.shape = onnx_shapes[value.name]
    logger.info("symbolic shapes dropped: ONNX's strict inference contradicts them")
    return restored


def _onnx_types(model: ir.Model) -> None:
    """ONNX inference again, adopting only what it adds (types and shapes of values still lacking them)."""
    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        try:  # as onnx-ir's own pass does: large weights are not copied into the proto
            from onnx_ir.passes.common._c_api_utils import call_onnx_api
        except ImportError:
            inferred = infer(ir.serde.serialize_model(model))
        else:
            inferred = call_onnx_api(infer, model)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.info("ONNX inference after typing contrib outputs failed (%s)", e)
        return
    found = {vi.name: vi.type for vi in inferred.graph.value_info if vi.type.HasField("tensor_type")}
    for node in model.graph:
        for value in node.outputs:
            info = found.get(value.name)
            if info is None:
                continue
            tensor_type = info.tensor_type
            if value.dtype is None and tensor_type.elem_type:
                value.dtype = ir.DataType(tensor_type.elem_type)
            if value.shape is None and tensor_type.HasField("shape"):
                value.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in tensor_type.shape.dim])


@register_pass("infer-shapes")
class InferShapesPass(ir.passes.InPlacePass):
    """Annotate every value with the type and (symbolic) shape that can be proved.

    Uses onnxruntime's symbolic shape inference (named dims such as ``batch`` and
    ``sequence`` followed through shape computations and broadcasts), falling back to
    ONNX inference with partial data propagation; a symbolic shape that ONNX's strict
    inference contradicts is dropped again. Outputs of onnxruntime contrib ops that neither
    engine types get their element type from the op's schema, and ONNX inference runs again
    so that what follows them is typed too (``passes/element_types.py``). Rules read these
    shapes. Reports ``modified`` when an annotation changed or the graph was rebuilt.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _shape_key(model)
        # ONNX inference first (it knows every standard op), then the symbolic engine refines dims.
        # (onnx-ir's pass rebuilds the graph from the inferred proto, so its own flag counts too.)
        modified = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model).modified
        if model_bytes(model) < PROTOBUF_LIMIT // 2:
            onnx_shapes = {v.name: v.shape for g in model.graphs() for n in g for v in n.outputs}
            if _symbolic(model):
                _drop_contradicted(model, onnx_shapes)
        for _ in range(8):  # each round types what follows the contrib ops typed in the round before
            if not fill_element_types(model):
                break
            _onnx_types(model)
        return ir.passes.PassResult(model, modified or _shape_key(model) != before)
