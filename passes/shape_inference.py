"""Symbolic shape inference, as a pass."""

from __future__ import annotations

import logging
import re

import onnx
import onnx_ir as ir

from tfgraph.ir import PROTOBUF_LIMIT, model_bytes, without_weights
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


# Initializers above this size leave the proto handed to ONNX inference (their type stays, as an input).
_BIG_TENSOR_BYTES = 1000


class ShapeInferencePass(ir.passes.InPlacePass):
    """onnx_ir's ``ShapeInferencePass`` (ONNX inference on a proto without the large weights, merged
    back), in linear time: onnx_ir's version tests ``initializer not in graph.inputs`` (a list) once
    per initializer while appending to that list, quadratic in the number of initializers (111 s of
    infer-shapes on a 100,000-node chain with one initializer per node). Same contract: on failure
    the model is left unchanged; ``modified`` when a shape or type changed."""

    def __init__(self, check_type: bool = True, strict_mode: bool = True, data_prop: bool = True) -> None:
        super().__init__()
        self.check_type, self.strict_mode, self.data_prop = check_type, strict_mode, data_prop

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            inferred = self._infer(model)
        except Exception as e:  # noqa: BLE001 - onnx raises several types; as onnx_ir: leave the model
            logger.warning("Shape inference failed: %s. Model is left unchanged", e)
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, _merge(model, inferred))

    def _infer(self, model: ir.Model) -> onnx.ModelProto:
        graph = model.graph
        initializers = tuple(graph.initializers.values())
        tensors = {v.name: v.const_value for v in initializers}
        original_inputs = len(graph.inputs)
        inputs = set(graph.inputs)
        # As onnx_ir: initializers become typed inputs; the large ones leave the proto for the call.
        for value in initializers:
            if value.const_value is not None:
                if value.shape is None:
                    value.shape = value.const_value.shape
                if value.dtype is None:
                    value.dtype = value.const_value.dtype
            if value not in inputs:
                inputs.add(value)
                graph.inputs.append(value)
            if value.const_value is None:
                graph.initializers.pop(value.name)
            elif value.const_value.nbytes > _BIG_TENSOR_BYTES:
                value.const_value = None
                graph.initializers.pop(value.name)
        try:
            proto = ir.serde.serialize_model(model)
            return onnx.shape_inference.infer_shapes(
                proto, check_type=self.check_type, strict_mode=self.strict_mode, data_prop=self.data_prop
            )
        finally:
            for value in initializers:
                value.const_value = tensors[value.name]
                if value.const_value is not None:
                    graph.register_initializer(value)
                else:
                    graph.initializers.add(value)
            kept = graph.inputs[:original_inputs]
            graph.inputs.clear()
            graph.inputs.extend(kept)


def _merge(model: ir.Model, inferred_proto: onnx.ModelProto) -> bool:
    """Copy the inferred shapes and types onto the model's values (onnx_ir's ``_merge_func``)."""
    inferred_model = ir.serde.deserialize_model(inferred_proto)
    modified = False
    for original_graph, inferred_graph in zip(model.graphs(), inferred_model.graphs()):
        inferred_values = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(original_graph).items():
            inferred = inferred_values.get(name)
            if inferred is None:
                continue
            if inferred.shape is not None and value.shape != inferred.shape:
                value.shape = inferred.shape
                modified = True
            if inferred.dtype is not None and value.dtype != inferred.dtype:
                value.dtype = inferred.dtype
                modified = True
    return modified


def _symbolic(model: ir.Model) -> bool:
    """onnxruntime's sympy-based inference: tracks symbolic dims through Shape/Gather/Concat/Reshape
    chains and broadcasts, where ONNX inference gives up (fresh ``unk__`` dims).

    Driven step by step rather than through ``SymbolicShapeInference.infer_shapes``, which
    raises on the first op it cannot handle (e.g. ReduceL2) and then writes a debug file
    into the working directory: here the shapes inferred up to that op are kept.
    """
    proto = without_weights(model)  # large weights as typed inputs: their values never matter here
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
            onnx.shape_inference.infer_shapes(without_weights(model), check_type=True, strict_mode=True, data_prop=True)
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

    preserves_numerics = True  # exact rewrites: checked numerically at the end of the phase

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
