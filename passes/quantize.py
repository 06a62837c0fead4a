"""quantize: integer weights (and activations) where the target's scheme places them.

The scheme is the target's data (``targets.profile.Quantization.to_options()``): which op inputs
carry integers, the integer types, symmetric or not, per-channel axes, excluded op types. Two
modes:

* ``dynamic`` — onnxruntime CPU's run-time quantized kernels: ``MatMul(x, W)`` (+ a following
  bias ``Add``) becomes ``com.microsoft.DynamicQuantizeMatMul(x, Wq, scale, zero_point, bias)``;
  activations are quantized per tensor by the kernel at run time; no calibration. A packed
  ``com.microsoft.Attention`` whose input (0) is placed has its Q/K/V projection moved out into one
  ``DynamicQuantizeMatMul`` + ``Split`` + ``com.microsoft.MultiHeadAttention`` (onnxruntime's
  QAttention has no attention-bias input, which is how tfgraph's lowering passes the mask); with
  ``attention_kernel="qattention"`` a block whose mask is a key-padding input becomes ``QAttention``
  (per-column weights, the mask as ``mask_index``: passes/quantize_attention.py). Other
  placed ops with only constant inputs placed get weight-only storage: the integer weight behind a
  ``DequantizeLinear`` (smaller, not faster: see targets/cpu.py).
* ``static`` — ``QuantizeLinear``/``DequantizeLinear`` pairs: weights stored quantized behind a
  ``DequantizeLinear`` (per-channel on ``weight_axes``), activations behind a Q/DQ pair with a range
  from the calibration set (one pair per tensor, shared by its consumers).

Every quantized node is recorded (``self.quantized``: name → how to rebuild the float node) so
``tfgraph.compiler.precision.revert_nodes`` can turn the most harmful ones back into float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass

INT_TYPES = {
    "uint8": (np.uint8, ir.DataType.UINT8, 0, 255),
    "int8": (np.int8, ir.DataType.INT8, -128, 127),
    "uint16": (np.uint16, ir.DataType.UINT16, 0, 65535),
    "int16": (np.int16, ir.DataType.INT16, -32768, 32767),
}
MS = "com.microsoft"
# ai.onnx QuantizeLinear/DequantizeLinear take 16-bit integers from opset 21 on.
SIXTEEN_BIT_OPSET = 21


def upgrade_opset(model: ir.Model, version: int, why: str = "16-bit Q/DQ") -> bool:
    """Convert ``model`` to ai.onnx ``version`` in place (onnx's version converter) when it imports
    an older one; True when converted."""
    import onnx.version_converter

    current = model.opset_imports.get("", None)
    if current is None or current >= version:
        return False
    # onnx's converter drops node metadata (tfgraph's attention-form marks): carried across by node name.
    saved = {}
    for i, node in enumerate(model.graph.all_nodes()):
        if node.metadata_props:
            node.name = node.name or f"tfgraph_node_{i}"
            saved[node.name] = dict(node.metadata_props)
    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
    except Exception as e:  # noqa: BLE001 - reported with what was asked
        raise ValueError(f"cannot convert the model from opset {current} to {version} for {why}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    converted = ir.serde.deserialize_model(proto)
    for node in converted.graph.all_nodes():
        if node.name in saved:
            node.metadata_props.update(saved[node.name])
    model.graph = converted.graph
    model.functions.clear()
    model.functions.update(converted.functions)
    model.ir_version = max(model.ir_version, converted.ir_version)
    return True


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _limits(type_name: str, reduce_range: bool) -> tuple[int, int]:
    _, _, qmin, qmax = INT_TYPES[type_name]
    if reduce_range:  # one bit less: u8 x s8 pair sums stay inside int16 (AVX2 without VNNI)
        qmin, qmax = (qmin // 2, qmax // 2) if qmin < 0 else (0, qmax // 2)
    return qmin, qmax


def quant_params(lo: np.ndarray, hi: np.ndarray, type_name: str, symmetric: bool,
                 reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (arrays, same shape as lo/hi) mapping [lo, hi] (widened to hold 0) to ``type_name``."""
    qmin, qmax = _limits(type_name, reduce_range)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        half = (qmax - qmin) // 2  # 127 for 8 bits: the range stays symmetric around the zero point
        scale = amax / half
        zero = np.full(scale.shape, 0 if qmin < 0 else (qmax + 1) // 2, dtype=np.float64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zero


def quantize_array(w: np.ndarray, type_name: str, symmetric: bool, axis: int | None, reduce_range: bool = False):
    """(quantized, scale, zero point) of ``w``: per tensor (``axis`` None) or per slice along ``axis``."""
    np_type = INT_TYPES[type_name][0]
    qmin, qmax = _limits(type_name, reduce_range)
    if axis is None:
        lo, hi = np.array(w.min()), np.array(w.max())
        scale, zero = quant_params(lo, hi, type_name, symmetric, reduce_range)
        q = np.clip(np.round(w / scale) + zero, qmin, qmax).astype(np_type)
        return q, scale.reshape(()), zero.astype(np_type).reshape(())
    axis = axis % w.ndim
    other = tuple(i for i in range(w.ndim) if i != axis)
    lo, hi = w.min(axis=other), w.max(axis=other)
    scale, zero = quant_params(lo, hi, type_name, symmetric, reduce_range)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)) + zero.reshape(shape), qmin, qmax).astype(np_type)
    return q, scale, zero.astype(np_type)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the initializers nothing reads any more (the float weights a quantization replaced)."""
    for value in list(graph.initializers.values()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _record(nodes: Sequence[ir.Node], output: ir.Value) -> dict:
    """How to rebuild the float nodes (by value names; weights as arrays)."""
    entries, weights = [], {}
    for node in nodes:
        names = []
        for value in node.inputs:
            if value is None:
                names.append(None)
                continue
            names.append(value.name)
            if value.is_initializer() and value.const_value is not None:
                weights[value.name] = value.const_value.numpy()
        entries.append({"op_type": node.op_type, "domain": node.domain, "inputs": names,
                        "attributes": dict(node.attributes), "output": node.outputs[0].name})
    return {"nodes": entries, "weights": weights, "output": output.name}


@register_pass("quantize")
class Quantize(ir.passes.InPlacePass):
    """Quantize the inputs the scheme places (see the module docstring)."""

    changes_outputs = True
    uses_calibration = True

    def __init__(
        self,
        *,
        mode: str = "dynamic",
        activation_type: str = "uint8",
        weight_type: str = "int8",
        activation_symmetric: bool = False,
        weight_symmetric: bool = True,
        per_channel: bool = True,
        placement: Mapping[str, Sequence[int]] | None = None,
        weight_axes: Mapping[str, Mapping[str | int, int]] | None = None,
        exclude_ops: Sequence[str] = (),
        calibrator: str = "minmax",
        reduce_range: bool = False,
        exclude_nodes: Sequence[str] | str = (),
        attention_kernel: str = "multiheadattention",
        calibration: Any = None,
        progress=None,
    ):
        super().__init__()
        if attention_kernel not in ("multiheadattention", "qattention"):
            raise ValueError(f"attention_kernel must be 'multiheadattention' or 'qattention', not {attention_kernel!r}")
        self.attention_kernel = attention_kernel
        if mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be 'dynamic' or 'static', not {mode!r}")
        for t in (activation_type, weight_type):
            if t not in INT_TYPES:
                raise ValueError(f"unknown integer type {t!r}; valid: {', '.join(INT_TYPES)}")
        self.mode = mode
        self.activation_type = activation_type
        self.weight_type = weight_type
        self.activation_symmetric = activation_symmetric
        self.weight_symmetric = weight_symmetric
        self.per_channel = per_channel
        self.placement = {k: tuple(v) for k, v in (placement or {"MatMul": (0, 1)}).items()}
        self.weight_axes = {k: {int(i): int(a) for i, a in v.items()} for k, v in (weight_axes or {}).items()}
        self.exclude_ops = set(exclude_ops)
        self.calibrator = calibrator
        self.reduce_range = reduce_range
        self.exclude_nodes = set(exclude_nodes.split(";") if isinstance(exclude_nodes, str) else exclude_nodes)
        self.calibration = calibration
        self.progress = progress
        self.quantized: dict[str, dict] = {}
        self.report: dict[str, Any] = {}

    # -- selection --------------------------------------------------------------------------
    def _candidates(self, graph: ir.Graph) -> list[ir.Node]:
        out, seen = [], set()
        for i, node in enumerate(graph):
            key = op_key(node)
            if key not in self.placement or key in self.exclude_ops or node.op_type in self.exclude_ops:
                continue
            if not node.name or node.name in seen:  # records and reverts find nodes by name
                node.name = f"{node.op_type}_{i}" if not node.name else f"{node.name}_{i}"
                self._renamed = True
            seen.add(node.name)
            if node.name in self.exclude_nodes:
                self.report.setdefault("excluded_by_option", []).append(node.name)
                continue
            out.append(node)
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized = {}
        self.report = {"mode": self.mode}
        self._renamed = False
        upgraded = False
        if self.mode == "static" and {self.activation_type, self.weight_type} & {"uint16", "int16"}:
            upgraded = upgrade_opset(model, SIXTEEN_BIT_OPSET)
            if upgraded:
                self.report["opset_upgraded_to"] = SIXTEEN_BIT_OPSET
        graph = model.graph
        self._model, self._qattention, self._masks = model, None, {}
        candidates = self._candidates(graph)
        for node in [n for n in candidates if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
            self._gather(graph, node)
        candidates = [n for n in candidates if n.op_type != "Gather"]
        if self.mode == "dynamic":
            rest = []
            for node in candidates:
                if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                    self._dynamic_matmul(graph, node)
                elif node.op_type == "Attention" and node.domain == MS and 0 in self.placement[op_key(node)]:
                    if not self._dynamic_attention(graph, node):
                        rest.append(node)
                else:
                    rest.append(node)
            # Other placed ops (the packed Attention's weight): stored quantized behind a DequantizeLinear.
            self._static(model, rest, weights_only=True)
        else:
            self._static(model, candidates)
        drop_unused_initializers(graph)
        if any(n.domain == MS for n in graph):
            graph.opset_imports.setdefault(MS, 1)
            model.opset_imports.setdefault(MS, 1)
        self.report["quantized"] = len(self.quantized)
        self.report["nodes"] = sorted(self.quantized)
        return ir.passes.PassResult(model, bool(self.quantized) or self._renamed or upgraded)

    def _skip(self, why: str, node: ir.Node) -> None:
        self.report.setdefault("skipped", {}).setdefault(why, []).append(node.name)

    # -- embedding tables (weight-only, both modes) ----------------------------------------
    def _gather(self, graph: ir.Graph, node: ir.Node) -> None:
        """``Gather(table, ids)`` on a float table -> rows gathered from the integer table, times their
        own scale (per row, symmetric: no zero point to subtract); the table is never dequantized whole."""
        table = _const(node.inputs[0])
        if table is None or table.dtype != np.float32 or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
            return self._skip("not a Gather of rows from a 2-D float32 table", node)
        weight_type = "int8" if self.weight_type in ("int8", "uint8") else self.weight_type
        q, scale, _ = quantize_array(table, weight_type, True, 0 if self.per_channel else None)
        record = _record([node], node.outputs[0])
        base = node.inputs[0].name
        qv = _initializer(graph, f"{base}_quantized", q)
        ids = node.inputs[1]
        rows = ir.Node("", "Gather", [qv, ids], attributes=[ir.AttrInt64("axis", 0)], name=f"{node.name}_rows", num_outputs=1)
        cast = ir.Node("", "Cast", [rows.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                       name=f"{node.name}_cast", num_outputs=1)
        if scale.ndim:
            sv = _initializer(graph, f"{base}_scale", scale.reshape(-1, 1))
            row_scale = ir.Node("", "Gather", [sv, ids], attributes=[ir.AttrInt64("axis", 0)], name=f"{node.name}_scales",
                                num_outputs=1)
            scale_value, extra = row_scale.outputs[0], [row_scale]
        else:
            scale_value, extra = _initializer(graph, f"{base}_scale", scale.reshape(())), []
        mul = ir.Node("", "Mul", [cast.outputs[0], scale_value], name=node.name, num_outputs=1)
        old = node.outputs[0]
        mul.outputs[0].dtype = ir.DataType.FLOAT
        mul.outputs[0].shape = old.shape
        graph.insert_before(node, [rows, cast, *extra, mul])
        ir.convenience.replace_all_uses_with(old, mul.outputs[0], replace_graph_outputs=True)
        name = old.name
        graph.remove(node, safe=True)
        mul.outputs[0].name = name
        self.quantized[node.name] = record

    # -- dynamic ----------------------------------------------------------------------------
    def _weight(self, graph, node, index, axis_default):
        w = _const(node.inputs[index])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        axis = self.weight_axes.get(op_key(node), {}).get(index, axis_default) if self.per_channel else None
        q, scale, zero = quantize_array(w, self.weight_type, self.weight_symmetric, axis, self.reduce_range)
        base = node.inputs[index].name
        # all-zero int8 zero points are left out: DynamicQuantizeMatMul ran 4-10% faster without them (measured)
        zp = None if zero.dtype == np.int8 and not zero.any() else _initializer(graph, f"{base}_zero_point", zero)
        return _initializer(graph, f"{base}_quantized", q), _initializer(graph, f"{base}_scale", scale), zp

    def _dynamic_matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        if node.inputs[1] is None or node.inputs[1].const_value is None:
            return self._skip("activation weight (no constant B)", node)
        weight = self._weight(graph, node, 1, 1)
        if weight is None:
            return self._skip("B is not a 2-D float32 constant", node)
        replaced, bias, out = [node], None, node.outputs[0]
        users = out.uses()
        if len(users) == 1 and not out.is_graph_output():
            add = users[0].node
            other = add.inputs[1 - users[0].idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
            b = _const(other)
            if b is not None and b.ndim == 1 and b.shape[0] == weight[0].shape[1] and b.dtype == np.float32:
                bias, replaced, out = other, [node, add], add.outputs[0]
        record = _record(replaced, out)
        new = ir.Node(MS, "DynamicQuantizeMatMul", [node.inputs[0], *weight, bias], name=node.name, num_outputs=1)
        new.outputs[0].dtype = ir.DataType.FLOAT
        new.outputs[0].shape = out.shape
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
        new_name = out.name
        for old in reversed(replaced):
            graph.remove(old, safe=True)
        new.outputs[0].name = new_name
        self.quantized[node.name] = record

    def _dynamic_attention(self, graph: ir.Graph, node: ir.Node) -> bool:
        """Packed ``com.microsoft.Attention(x, W, b, attention_bias=...)`` with its input placed: the
        Q/K/V projection moves out of the op into one ``DynamicQuantizeMatMul`` (per-column int8 packed
        weight, bias folded in), split into Q, K, V for ``com.microsoft.MultiHeadAttention`` (which,
        unlike QAttention, takes the attention bias)."""
        allowed = {"num_heads", "scale", "qkv_hidden_sizes", "mask_filter_value"}
        extra = set(node.attributes) - allowed
        if extra or node.attributes.get_int("unidirectional", 0):
            self._skip(f"attributes MultiHeadAttention lacks: {sorted(extra)}", node)
            return False
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        if inputs[3] is not None or inputs[4] is not None or len(node.inputs) > 6:
            self._skip("mask_index/past inputs", node)
            return False
        w = _const(inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            self._skip("packed weight is not a 2-D float32 constant", node)
            return False
        sizes = list(node.attributes["qkv_hidden_sizes"].value) if "qkv_hidden_sizes" in node.attributes else [w.shape[1] // 3] * 3
        if self.attention_kernel == "qattention" and self._to_qattention(graph, node, inputs, w):
            return True
        weight = self._weight(graph, node, 1, 1)
        record = _record([node], node.outputs[0])
        mm = ir.Node(MS, "DynamicQuantizeMatMul", [inputs[0], *weight, inputs[2]], name=f"{node.name}_qkv", num_outputs=1)
        mm.outputs[0].name = f"{node.name}_qkv"
        mm.outputs[0].dtype = ir.DataType.FLOAT
        split_sizes = _initializer(graph, f"{node.name}_qkv_sizes", np.array(sizes, dtype=np.int64))
        split = ir.Node("", "Split", [mm.outputs[0], split_sizes], attributes=[ir.AttrInt64("axis", -1)],
                        name=f"{node.name}_split", num_outputs=3)
        for value, tag in zip(split.outputs, "qkv"):
            value.name = f"{node.name}_{tag}"
            value.dtype = ir.DataType.FLOAT
        mha_inputs = [*split.outputs, None, None, inputs[5]] if inputs[5] is not None else list(split.outputs)
        attrs = [ir.AttrInt64("num_heads", node.attributes.get_int("num_heads"))]
        if "scale" in node.attributes:
            attrs.append(ir.AttrFloat32("scale", node.attributes.get_float("scale")))
        if "mask_filter_value" in node.attributes:
            attrs.append(ir.AttrFloat32("mask_filter_value", node.attributes.get_float("mask_filter_value")))
        mha = ir.Node(MS, "MultiHeadAttention", mha_inputs, attributes=attrs, name=node.name, num_outputs=1)
        old = node.outputs[0]
        mha.outputs[0].dtype = ir.DataType.FLOAT
        mha.outputs[0].shape = old.shape
        graph.insert_before(node, [mm, split, mha])
        ir.convenience.replace_all_uses_with(old, mha.outputs[0], replace_graph_outputs=True)
        name = old.name
        graph.remove(node, safe=True)
        mha.outputs[0].name = name
        self.quantized[node.name] = record
        return True

    def _to_qattention(self, graph: ir.Graph, node: ir.Node, inputs: list, w: np.ndarray) -> bool:
        """QAttention with per-column weights where the mask is a key-padding input (passes/quantize_attention.py)."""
        from tfgraph.passes.quantize_attention import QAttentionBuilder, padding_mask_input

        if self._qattention is None:
            self._qattention = QAttentionBuilder(graph)
        why = self._qattention.supported(node, w.shape[1])
        mask = None
        if why is None and inputs[5] is not None:
            if inputs[5].name not in self._masks:
                self._masks[inputs[5].name] = padding_mask_input(self._model, inputs[5])
            mask = self._masks[inputs[5].name]
            why = None if mask is not None else "attention bias is not a key-padding mask of a graph input"
        if why is not None:
            self.report.setdefault("attention", {}).setdefault("multiheadattention", {})[node.name] = why
            return False
        bias = inputs[2] if inputs[2] is not None else _initializer(graph, f"{node.name}_bias", np.zeros(w.shape[1], np.float32))
        record = _record([node], node.outputs[0])
        qa = self._qattention.build(node, self._weight(graph, node, 1, 1), bias, mask)
        # reverted, it runs as the float Attention with the same raw mask (the bias subgraph is gone)
        record["nodes"][0]["inputs"][3:] = [qa.inputs[5].name if mask is not None else None]
        self.report.setdefault("attention", {}).setdefault("qattention", []).append(node.name)
        self.quantized[node.name] = record
        return True

    # -- static (QDQ) -----------------------------------------------------------------------
    def _static(self, model: ir.Model, candidates: list[ir.Node], weights_only: bool = False) -> None:
        from tfgraph.passes.context import current

        ctx = current()

        graph = model.graph
        activations = []
        for node in candidates:
            for index in self.placement[op_key(node)]:
                if index < len(node.inputs) and node.inputs[index] is not None and _const(node.inputs[index]) is None:
                    v = node.inputs[index]
                    if v.dtype == ir.DataType.FLOAT and not weights_only:
                        activations.append(v.name)
        ranges = {}
        if activations:
            calibration = self.calibration
            if calibration is None:
                calibration = ctx.calibration
            if not hasattr(calibration, "batches"):  # arrays, a dict or an .npz path: the context loads them
                calibration = ctx.need("load_calibration", "quantize")(calibration, model)
            ranges = ctx.need("collect_ranges", "quantize")(model, activations, calibration, calibrator=self.calibrator, progress=self.progress)
        qdq: dict[str, ir.Value] = {}
        for node in candidates:
            record = _record([node], node.outputs[0])
            changed = False
            for index in self.placement[op_key(node)]:
                if index >= len(node.inputs) or node.inputs[index] is None:
                    continue
                value = node.inputs[index]
                w = _const(value)
                if w is not None:
                    if w.dtype != np.float32:
                        continue
                    axis = self.weight_axes.get(op_key(node), {}).get(index) if self.per_channel else None
                    if axis is not None and not (-w.ndim <= axis < w.ndim):
                        axis = None
                    q, scale, zero = quantize_array(w, self.weight_type, self.weight_symmetric, axis, self.reduce_range)
                    base = value.name
                    attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
                    dq = ir.Node("", "DequantizeLinear", [
                        _initializer(graph, f"{base}_quantized", q), _initializer(graph, f"{base}_scale", scale),
                        _initializer(graph, f"{base}_zero_point", zero)],
                        attributes=attrs, name=f"{node.name}_dequantize_{index}", num_outputs=1)
                    dq.outputs[0].name = f"{node.name}_{base}_dequantized"
                    dq.outputs[0].dtype = ir.DataType.FLOAT
                    dq.outputs[0].shape = value.shape
                    graph.insert_before(node, dq)
                    node.replace_input_with(index, dq.outputs[0])
                    changed = True
                elif value.name in ranges:
                    if value.name not in qdq:
                        lo, hi = ranges[value.name]
                        scale, zero = quant_params(np.array(lo), np.array(hi), self.activation_type, self.activation_symmetric)
                        np_type = INT_TYPES[self.activation_type][0]
                        s = _initializer(graph, f"{value.name}_scale", scale.reshape(()))
                        z = _initializer(graph, f"{value.name}_zero_point", zero.astype(np_type).reshape(()))
                        qn = ir.Node("", "QuantizeLinear", [value, s, z], name=f"{value.name}_quantize", num_outputs=1)
                        dq = ir.Node("", "DequantizeLinear", [qn.outputs[0], s, z], name=f"{value.name}_dequantize", num_outputs=1)
                        qn.outputs[0].name = f"{value.name}_quantized"
                        qn.outputs[0].dtype = INT_TYPES[self.activation_type][1]
                        qn.outputs[0].shape = value.shape
                        dq.outputs[0].name = f"{value.name}_dequantized"
                        dq.outputs[0].dtype = ir.DataType.FLOAT
                        dq.outputs[0].shape = value.shape
                        graph.insert_before(node, [qn, dq])
                        qdq[value.name] = dq.outputs[0]
                    node.replace_input_with(index, qdq[value.name])
                    changed = True
            if changed:
                self.quantized[node.name] = record
        # Q/DQ pairs shared by several consumers were inserted before the first one: keep the graph sorted.
        graph.sort()
