"""convert-float16: compute in float16 (or bfloat16) where it is safe, keep the rest in float32.

1. Large negative constant elements (``<= mask_threshold``, -1e8: the sentinels masks are built from,
   ``(1 - mask) * finfo(float32).min``, ``-1e9``, ``-inf`` fills of ``Where``) are clamped to ``mask_fill`` (a quarter of the float16 minimum, so that a
   score plus the fill stays finite): ``exp`` of either is 0, so float32 outputs do not change on
   rows with at least one attended key.
2. Every float32 tensor's range is measured on the calibration set (streamed min/max).
3. A node stays in float32, with the reason recorded, when: its op type is in ``keep_ops`` or its
   name in ``exclude_nodes``; a float input/output range exceeds ``overflow_fraction`` of the
   float16 maximum (overflow) or all of an output's nonzero values lie below the float16 normal
   range (underflow); it is a sensitive op (``sensitive_ops``: Softmax, normalizations) whose input
   range exceeds ``sensitive_max`` (e.g. x² overflow in a variance, masked scores); it reduces
   (``reduce_ops``) over more than ``reduction_max`` elements or over a dynamic-length axis.
4. Graph inputs and outputs keep their types (Casts at the boundary); float constants used by
   float16 nodes are stored in float16; Casts are inserted where a float32 and a float16 region meet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.passes.element_types import output_may_be
from tfgraph.passes.registry import register_pass

FLOAT = ir.DataType.FLOAT
# The additive-mask input of onnxruntime's attention ops (clamped to the float16 range when computed at run time).
MASK_INPUTS = {("com.microsoft", "Attention"): 5, ("com.microsoft", "MultiHeadAttention"): 5,
               ("com.microsoft", "GroupQueryAttention"): 10}


def _float_types() -> dict[str, tuple[Any, ir.DataType, float, float]]:
    import ml_dtypes

    return {
        "float16": (np.float16, ir.DataType.FLOAT16, 65504.0, float(np.finfo(np.float16).tiny)),
        "bfloat16": (ml_dtypes.bfloat16, ir.DataType.BFLOAT16, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
                     float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny)),
    }


def _version(model: ir.Model, node: ir.Node) -> int:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return model.opset_imports.get(domain, 1)


# Ops that create float32 from attributes or convert types: left alone, never "kept" (no reason needed).
UNTOUCHED = {"Cast", "CastLike", "ConstantOfShape", "Range", "RandomNormal", "RandomUniform", "RandomNormalLike",
             "RandomUniformLike", "EyeLike", "Constant"}


@register_pass("convert-float16")
class ConvertFloat16(ir.passes.InPlacePass):
    """float32 → float16/bfloat16 compute with fp32 IO; nodes whose calibrated ranges or reductions demand it stay fp32."""

    changes_outputs = True
    uses_calibration = True

    def __init__(
        self,
        *,
        float_type: str = "float16",
        keep_ops: Sequence[str] = (),
        exclude_nodes: Sequence[str] | str = (),
        sensitive_ops: Sequence[str] = ("Softmax", "LayerNormalization", "SkipLayerNormalization",
                                        "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                                        "RMSNormalization", "GroupNormalization", "InstanceNormalization"),
        sensitive_max: float = 255.0,
        reduce_ops: Sequence[str] = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceL1",
                                     "ReduceLogSumExp", "ReduceProd"),
        reduction_max: int = 4096,
        overflow_fraction: float = 0.5,
        clamp_masks: bool = True,
        mask_threshold: float = -1e8,
        calibration: Any = None,
        progress=None,
    ):
        super().__init__()
        types = _float_types()
        if float_type not in types:
            raise ValueError(f"float_type must be one of {', '.join(types)}")
        self.float_type = float_type
        self.np_type, self.dtype, self.max, self.tiny = types[float_type]
        self.mask_fill = -self.max / 4 if float_type == "float16" else -1e30
        self.keep_ops = set(keep_ops)
        self.exclude_nodes = set(exclude_nodes.split(";") if isinstance(exclude_nodes, str) else exclude_nodes)
        self.sensitive_ops = set(sensitive_ops)
        self.sensitive_max = sensitive_max
        self.reduce_ops = set(reduce_ops)
        self.reduction_max = reduction_max
        self.overflow_fraction = overflow_fraction
        self.clamp_masks = clamp_masks
        self.mask_threshold = mask_threshold
        self.calibration = calibration
        self.progress = progress
        self.report: dict[str, Any] = {}

    # -- 1. masks -------------------------------------------------------------------------
    def _clamp(self, graph: ir.Graph) -> list[dict]:
        clamped = []
        for name, value in list(graph.initializers.items()):
            if value.const_value is None or value.dtype != FLOAT:
                continue
            array = value.const_value.numpy()
            low = array <= self.mask_threshold
            if not low.any():
                continue
            fixed = np.where(low, np.float32(self.mask_fill), array).astype(np.float32)
            value.const_value = ir.tensor(fixed, name=name)
            clamped.append({"initializer": name, "elements": int(low.sum()), "to": self.mask_fill})
        return clamped

    # -- 3. decisions -----------------------------------------------------------------------
    def _reason(self, node: ir.Node, ranges: dict[str, tuple[float, float]]) -> str | None:
        # Optional outputs nothing reads (SkipLayerNormalization's mean/inv_std_var, GroupQueryAttention's
        # present key/value) often carry no type: they do not decide the node's precision.
        used_outputs = [v for v in node.outputs if v.uses() or v.is_graph_output()]
        unknown = [v.name for v in [*node.inputs, *used_outputs] if v is not None and v.dtype is None]
        if unknown:
            return f"element type of {unknown[0]!r} unknown (cannot tell float from integer)"
        if node.op_type in self.keep_ops:
            return f"{node.op_type} kept in float32 by option"
        if node.name in self.exclude_nodes:
            return "excluded by option"
        limit = self.max * self.overflow_fraction
        for value in [*node.inputs, *node.outputs]:
            if value is None or value.dtype != FLOAT:
                continue
            if self._runtime_mask(node, value, ranges):
                continue  # clamped to the float16 range at conversion (a mask's "minus infinity")
            if value.const_value is not None:
                array = value.const_value.numpy()
                amax = float(np.abs(array).max()) if array.size else 0.0
                with np.errstate(over="ignore", under="ignore"):
                    lost = (array != 0) & (array.astype(self.np_type) == 0)
                # e.g. a 1e-12 epsilon: it would become 0 (a division by zero waiting); in a large weight a
                # few tiny values flushing to 0 do not matter, a sizeable fraction does.
                if lost.any() and (array.size <= 16 or lost.mean() > 0.01):
                    return f"constant '{value.name}' has values that underflow to 0 in {self.float_type}"
            elif value.name in ranges:
                lo, hi = ranges[value.name]
                amax = max(abs(lo), abs(hi))
            else:
                continue
            if not np.isfinite(amax) or amax > limit:
                return f"range of '{value.name}' reaches {amax:.3g}, beyond {self.overflow_fraction:g} x the {self.float_type} maximum"
        for value in node.outputs:
            if value.dtype == FLOAT and value.name in ranges:
                lo, hi = ranges[value.name]
                amax = max(abs(lo), abs(hi))
                if 0 < amax < self.tiny:
                    return f"range of '{value.name}' (max |x| {amax:.3g}) underflows {self.float_type}"
        if node.op_type in self.sensitive_ops and node.inputs and node.inputs[0] is not None:
            lo, hi = ranges.get(node.inputs[0].name, (0.0, 0.0))
            amax = max(abs(lo), abs(hi))
            if amax > self.sensitive_max:
                return f"{node.op_type} input range reaches {amax:.3g} (> {self.sensitive_max:g}): sensitive in {self.float_type}"
        if node.op_type in self.reduce_ops and node.inputs and node.inputs[0] is not None:
            n = self._reduced_elements(node)
            if n is None:
                return f"{node.op_type} over a dynamic-length axis"
            if n > self.reduction_max:
                return f"{node.op_type} over {n} elements (> {self.reduction_max})"
        return None

    def _runtime_mask(self, node: ir.Node, value: ir.Value, ranges: dict[str, tuple[float, float]]) -> bool:
        """``value`` is the additive mask an attention op reads, computed at run time (e.g.
        ``(1 - mask) * finfo(float32).min``): its low end is a stand-in for minus infinity, the rest
        is in range. Clamping it to ``mask_fill`` keeps the op's result and lets the op run in fp16."""
        index = MASK_INPUTS.get((node.domain, node.op_type))
        if (not self.clamp_masks or index is None or len(node.inputs) <= index or node.inputs[index] is not value
                or value.const_value is not None or value.name not in ranges):
            return False
        lo, hi = ranges[value.name]
        return lo <= self.mask_threshold and abs(hi) <= self.max * self.overflow_fraction

    @staticmethod
    def _reduced_elements(node: ir.Node) -> int | None:
        shape = node.inputs[0].shape
        if shape is None:
            return None
        axes = None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            if node.inputs[1].const_value is None:
                return None
            axes = [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
        elif "axes" in node.attributes:
            axes = list(node.attributes["axes"].value)
        if axes is None or not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return 1
            axes = list(range(len(shape)))
        n = 1
        for a in axes:
            dim = shape[a % len(shape)]
            if not isinstance(dim, int):
                return None
            n *= dim
        return n

    # -- 4. conversion ----------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from tfgraph.passes.context import current

        ctx = current()

        graph = model.graph
        for value in graph.initializers.values():  # constants made by earlier passes may lack a declared type
            if value.dtype is None and value.const_value is not None:
                value.dtype = value.const_value.dtype
        clamped = self._clamp(graph) if self.clamp_masks else []
        names = [v.name for v in graph.inputs if v.dtype == FLOAT]
        names += [o.name for n in graph for o in n.outputs if o.dtype == FLOAT]
        ranges: dict[str, tuple[float, float]] = {}
        if names:
            calibration = self.calibration
            if calibration is None:
                calibration = ctx.calibration
            if not hasattr(calibration, "batches"):  # arrays, a dict or an .npz path: the context loads them
                calibration = ctx.need("load_calibration", "convert-float16")(calibration, model)
            ranges = ctx.need("collect_ranges", "convert-float16")(model, names, calibration, calibrator="minmax", progress=self.progress)

        renamed = False
        for i, node in enumerate(graph):
            if not node.name:  # the report names every node kept in float32
                node.name = f"{node.op_type}_{i}"
                renamed = True
        decisions: dict[ir.Node, bool] = {}
        kept = []
        for node in graph:
            touches = any(v is not None and v.dtype == FLOAT for v in [*node.inputs, *node.outputs])
            has_subgraph = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
            if not touches or node.op_type in UNTOUCHED or has_subgraph:
                decisions[node] = False
                continue
            reason = self._reason(node, ranges)
            decisions[node] = reason is None
            if reason is not None:
                kept.append({"node": node.name, "op_type": node.op_type, "reason": reason})

        converted_consts: dict[str, ir.Value] = {}
        to_half: dict[str, ir.Value] = {}
        converted = 0
        for node in list(graph):
            if not decisions.get(node):
                continue
            converted += 1
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype != FLOAT:
                    continue
                if value.const_value is not None and value.is_initializer():
                    if value.name not in converted_consts:
                        array = value.const_value.numpy().astype(np.float32)
                        half = np.clip(array, -self.max, self.max).astype(self.np_type)
                        new = ir.Value(name=f"{value.name}_{self.float_type}", shape=value.shape,
                                       type=ir.TensorType(self.dtype), const_value=ir.tensor(half, name=f"{value.name}_{self.float_type}"))
                        graph.register_initializer(new)
                        converted_consts[value.name] = new
                    node.replace_input_with(index, converted_consts[value.name])
                else:
                    original = value
                    if value.name not in to_half and self._runtime_mask(node, value, ranges):
                        fill = ir.Value(name=f"{value.name}_mask_fill", shape=ir.Shape([]), type=ir.TensorType(FLOAT),
                                        const_value=ir.tensor(np.array(self.mask_fill, np.float32)))
                        graph.register_initializer(fill)
                        clamp = ir.Node("", "Max", [value, fill], name=f"{value.name}_clamp", num_outputs=1)
                        clamp.outputs[0].name, clamp.outputs[0].dtype = f"{value.name}_clamped", FLOAT
                        clamp.outputs[0].shape = value.shape
                        graph.insert_before(node, clamp)
                        clamped.append({"value": value.name, "to": self.mask_fill})
                        value = clamp.outputs[0]
                    if value.name not in to_half:
                        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", self.dtype)],
                                       name=f"{value.name}_to_{self.float_type}", num_outputs=1)
                        cast.outputs[0].name = f"{value.name}_{self.float_type}"
                        cast.outputs[0].dtype = self.dtype
                        cast.outputs[0].shape = value.shape
                        graph.insert_before(node, cast)
                        to_half[value.name] = cast.outputs[0]
                    node.replace_input_with(index, to_half[value.name])
                    to_half.setdefault(original.name, to_half[value.name])
            for k, out in enumerate(node.outputs):
                if out.dtype != FLOAT or not output_may_be(node, k, self.dtype, _version(model, node)):
                    continue  # e.g. SkipLayerNormalization's mean: float by its schema whatever the input
                out.dtype = self.dtype
                back_uses = [(u.node, u.idx) for u in out.uses() if not decisions.get(u.node) and u.node.op_type != "Cast"]
                casts_back = [(u.node, u.idx) for u in out.uses() if u.node.op_type == "Cast"]
                del casts_back  # an existing Cast converts from any float type: nothing to do
                is_output = out.is_graph_output()
                if not back_uses and not is_output:
                    continue
                cast = ir.Node("", "Cast", [out], attributes=[ir.AttrInt64("to", FLOAT)], name=f"{out.name}_to_float32",
                               num_outputs=1)
                cast.outputs[0].dtype = FLOAT
                cast.outputs[0].shape = out.shape
                graph.insert_after(node, cast)
                for user, idx in back_uses:
                    user.replace_input_with(idx, cast.outputs[0])
                original = out.name
                if is_output:
                    for k, o in enumerate(graph.outputs):
                        if o is out:
                            graph.outputs[k] = cast.outputs[0]
                    out.name = f"{original}_{self.float_type}"
                    cast.outputs[0].name = original
                else:
                    cast.outputs[0].name = f"{original}_float32"
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
        self.report = {
            "float_type": self.float_type,
            "converted_nodes": converted,
            "kept_float32": kept,
            "clamped_constants": clamped,
        }
        return ir.passes.PassResult(model, bool(converted or clamped or renamed))
