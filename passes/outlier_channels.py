"""quantize-outlier-channels: keep int8 GEMMs accurate where a few activation channels are outliers.

onnxruntime CPU's integer kernels quantize their float input per tensor at run time
(``DynamicQuantizeMatMul``, ``DynamicQuantizeLinear`` before ``QAttention``). Transformer activations
have a few channels far larger than the rest (MiniLM: one GELU channel of layer 0 reaches 25 where the
median channel stays under 0.8; LayerNorm outputs reach 28 on one channel): one per-tensor scale then
leaves the other channels a handful of levels. This pass, after ``quantize``, finds such channels on
the calibration set (per-channel max |x| above ``ratio`` x the median channel's, at most
``max_channels``) and takes them out of the int8 range, exactly (no approximation), in one of two ways:

* **scale** (any integer GEMM with constant per-column weights): ``x * inv`` before the run-time
  quantization, ``inv[c] = ref / max|x_c|`` on the outlier channels (``ref``: the largest other channel),
  1 elsewhere, and the weight rows of those channels multiplied back (re-quantized per column). One
  ``Mul`` per activation, shared by all its integer consumers; the float value itself (residual paths)
  is untouched.
* **split** (a ``Gelu`` between two integer GEMMs, the FFN): the outlier channels of the GELU output are
  computed in float from the first GEMM's input — ``Gelu(x @ W1[:, O] + b1[O]) @ W2[O, :]``, a rank-|O|
  path, a few hundred FLOPs per token — and added to the second GEMM's output; in the integer GEMMs,
  ``W1[:, O]`` and ``W2[O, :]`` are zero and ``b1[O] = -100`` (GELU gives exactly 0), so no wide
  element-wise op is added on the 4x-wide hidden tensor.

Reverting a split second GEMM to float (the ``max-drop`` loop) keeps the float path: its record here
rebuilds ``MatMul(h, W2 without O) + b2 + outlier path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass

MS = "com.microsoft"
GELU_OFF = -100.0  # Gelu(-100) == 0 exactly in float32 (erf saturates)
# integer GEMMs with constant per-column weights: op -> (activation input, weight, weight scale, weight zero point)
INT_GEMMS = {"DynamicQuantizeMatMul": (0, 1, 2, 3), "QAttention": (0, 1, 4, 7)}


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _init(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _node(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, domain: str = "", **attrs) -> ir.Value:
    attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
    node = ir.Node(domain, op, inputs, attributes=attributes, name=name, num_outputs=1)
    node.outputs[0].name = name
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(before, node)
    return node.outputs[0]


def _requantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


@register_pass("quantize-outlier-channels")
class QuantizeOutlierChannels(ir.passes.InPlacePass):
    """Take calibrated outlier activation channels out of run-time int8 quantization (module docstring)."""

    changes_outputs = True
    uses_calibration = True

    def __init__(self, *, ratio: float = 6.0, max_channels: int = 4, split_gelu: bool = True,
                 ops: Sequence[str] = ("DynamicQuantizeMatMul", "QAttention"), calibration: Any = None, progress=None):
        super().__init__()
        if ratio <= 1.0 or max_channels < 1:
            raise ValueError("ratio must be > 1 and max_channels >= 1")
        unknown = set(ops) - set(INT_GEMMS)
        if unknown:
            raise ValueError(f"unknown integer GEMM ops {sorted(unknown)}; valid: {', '.join(INT_GEMMS)}")
        self.ratio, self.max_channels, self.split_gelu, self.ops = ratio, max_channels, split_gelu, tuple(ops)
        self.calibration, self.progress = calibration, progress
        self.quantized: dict[str, dict] = {}  # records overriding quantize's (split second GEMMs)
        self.report: dict[str, Any] = {}

    # -- what to look at --------------------------------------------------------------------------
    def _gemms(self, graph: ir.Graph) -> dict[int, tuple[ir.Value, list[ir.Node]]]:
        """activation (float) -> the integer GEMMs quantizing it at run time."""
        found: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
        for node in graph:
            if node.domain != MS or node.op_type not in self.ops:
                continue
            a, w, s, z = INT_GEMMS[node.op_type]
            if _const(node.inputs[w]) is None or _const(node.inputs[s]) is None or node.inputs[w].const_value.dtype != ir.DataType.INT8:
                continue
            zero = _const(node.inputs[z]) if z < len(node.inputs) else None
            if (zero is not None and zero.any()) or _const(node.inputs[s]).ndim != 1:
                continue  # symmetric per-column weights only (re-quantized per column here)
            x = node.inputs[a]
            if node.op_type == "QAttention":  # its input comes quantized from a DynamicQuantizeLinear
                p = x.producer()
                if p is None or p.op_type != "DynamicQuantizeLinear" or node.inputs[3] is not p.outputs[1]:
                    continue
                x = p.inputs[0]
            found.setdefault(id(x), (x, []))[1].append(node)
        return found

    def _channel_max(self, model: ir.Model, values: list[ir.Value]) -> dict[str, np.ndarray]:
        from tfgraph.ir import exposed_outputs
        from tfgraph.passes.context import current

        ctx = current()
        calibration = self.calibration if self.calibration is not None else ctx.calibration
        if calibration is None:
            return {}
        if not hasattr(calibration, "batches"):
            calibration = ctx.need("load_calibration", "quantize-outlier-channels")(calibration, model)
        run = ctx.need("run", "quantize-outlier-channels")
        amax: dict[str, np.ndarray] = {}
        with exposed_outputs(model, values):
            for i, batch in enumerate(calibration.batches):
                if self.progress:
                    self.progress("outlier channels: calibration", i, len(calibration.batches))
                outs = run(model, batch)
                for v in values:
                    a = np.abs(np.asarray(outs[v.name], np.float32))
                    a = a.reshape(-1, a.shape[-1]).max(axis=0)
                    amax[v.name] = np.maximum(amax.get(v.name, 0.0), a)
        return amax

    def _outliers(self, amax: np.ndarray) -> np.ndarray:
        order = np.argsort(amax)[::-1][: self.max_channels]
        return np.sort(order[amax[order] > self.ratio * max(float(np.median(amax)), 1e-12)])

    # -- the pass -----------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized, self.report = {}, {"scaled": {}, "split": {}}
        graph = model.graph
        groups = self._gemms(graph)
        if not groups:
            return ir.passes.PassResult(model, False)
        amax = self._channel_max(model, [x for x, _ in groups.values()])
        if not amax:
            self.report["skipped"] = "no calibration data"
            return ir.passes.PassResult(model, False)
        modified = False
        for x, nodes in groups.values():
            if x.name not in amax:
                continue
            dqls = {id(n.inputs[0].producer()): n.inputs[0].producer() for n in nodes if n.op_type == "QAttention"}
            if any(u.node not in nodes for d in dqls.values() for o in d.outputs for u in o.uses()):
                continue  # a shared DynamicQuantizeLinear read by a GEMM this pass does not rescale
            channels = self._outliers(amax[x.name])
            if not len(channels):
                continue
            if self.split_gelu and len(nodes) == 1 and self._split(graph, x, nodes[0], channels):
                self.report["split"][nodes[0].name] = channels.tolist()
            else:
                self._scale(graph, x, nodes, channels, amax[x.name])
                for n in nodes:
                    self.report["scaled"][n.name] = channels.tolist()
            modified = True
        graph.sort()
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
        return ir.passes.PassResult(model, modified)

    def _scale(self, graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], channels: np.ndarray, amax: np.ndarray) -> None:
        ref = float(np.max(np.delete(amax, channels))) if len(channels) < len(amax) else 1.0
        s = np.ones(len(amax), np.float32)
        s[channels] = np.maximum(amax[channels] / max(ref, 1e-12), 1.0)
        first = min(nodes, key=lambda n: list(graph).index(n))
        scaled = _node(graph, first, "Mul", [x, _init(graph, f"{x.name}_outlier_inv", (1.0 / s).astype(np.float32))],
                       f"{x.name}_outliers_scaled")
        scaled.shape = x.shape
        for node in nodes:
            a, w, sc, _ = INT_GEMMS[node.op_type]
            weight = _const(node.inputs[w]).astype(np.float32) * _const(node.inputs[sc])
            q, scale = _requantize(weight * s[:, None])
            node.replace_input_with(w, _init(graph, f"{node.inputs[w].name}_outliers", q))
            node.replace_input_with(sc, _init(graph, f"{node.inputs[sc].name}_outliers", scale))
            if node.op_type == "QAttention":
                dql = node.inputs[0].producer()
                dql.replace_input_with(0, scaled)
            else:
                node.replace_input_with(a, scaled)

    def _split(self, graph: ir.Graph, h: ir.Value, second: ir.Node, channels: np.ndarray) -> bool:
        gelu = h.producer()
        if second.op_type != "DynamicQuantizeMatMul" or gelu is None or gelu.op_type != "Gelu" or len(h.uses()) != 1 \
                or h.is_graph_output() or len(gelu.inputs) != 1:
            return False
        first = gelu.inputs[0].producer()
        if first is None or first.op_type != "DynamicQuantizeMatMul" or first.domain != MS or len(gelu.inputs[0].uses()) != 1:
            return False
        inputs = list(first.inputs) + [None] * (5 - len(first.inputs))
        if inputs[4] is None:  # the bias input carries the -100 that switches the channels off
            return False
        q1, s1, z1, b1 = (_const(inputs[i]) for i in (1, 2, 3, 4))
        q2, s2, z2 = (_const(second.inputs[i]) for i in (1, 2, 3))
        if any(a is None for a in (q1, s1, q2, s2)) or (z1 is not None and z1.any()) or (z2 is not None and z2.any()):
            return False
        if b1 is None or s1.ndim != 1 or s2.ndim != 1:
            return False
        b1 = b1.astype(np.float32)
        w1o = (q1[:, channels].astype(np.float32) * np.broadcast_to(s1, (q1.shape[1],))[channels]).astype(np.float32)
        w2 = q2.astype(np.float32) * s2
        tag = second.name
        # the float path, from the first GEMM's input
        x1 = inputs[0]
        p = _node(graph, first, "MatMul", [x1, _init(graph, f"{tag}_outlier_w1", w1o)], f"{tag}_outlier_mm1")
        p = _node(graph, first, "Add", [p, _init(graph, f"{tag}_outlier_b1", b1[channels].copy())], f"{tag}_outlier_bias")
        p = _node(graph, first, "Gelu", [p], f"{tag}_outlier_gelu", domain=gelu.domain)
        p = _node(graph, first, "MatMul", [p, _init(graph, f"{tag}_outlier_w2", w2[channels].copy())], f"{tag}_outlier_mm2")
        # the integer GEMMs without those channels
        q1z = q1.copy()
        q1z[:, channels] = 0
        b1z = b1.copy()
        b1z[channels] = GELU_OFF
        first.replace_input_with(1, _init(graph, f"{first.inputs[1].name}_outliers", q1z))
        first.replace_input_with(4, _init(graph, f"{first.inputs[4].name}_outliers", b1z))
        q2z = q2.copy()
        q2z[channels] = 0
        second.replace_input_with(1, _init(graph, f"{second.inputs[1].name}_outliers", q2z))
        out = second.outputs[0]
        total = ir.Node("", "Add", [out, p], name=f"{tag}_outlier_sum", num_outputs=1)
        total.outputs[0].dtype = ir.DataType.FLOAT
        total.outputs[0].shape = out.shape
        graph.insert_after(second, total)
        ir.convenience.replace_all_uses_with(out, total.outputs[0], replace_graph_outputs=True)
        total.replace_input_with(0, out)
        name = out.name
        out.name = f"{name}_inliers"
        total.outputs[0].name = name
        # reverted to float: MatMul(h, W2 without O) (+ bias) + the float path
        w2z = w2.copy()
        w2z[channels] = 0
        bias = second.inputs[4].name if len(second.inputs) > 4 and second.inputs[4] is not None else None
        entries = [{"op_type": "MatMul", "domain": "", "inputs": [h.name, f"{tag}__w2"], "attributes": {}, "output": f"{tag}__mm"}]
        if bias is not None:
            entries.append({"op_type": "Add", "domain": "", "inputs": [f"{tag}__mm", bias], "attributes": {}, "output": f"{tag}__b"})
        entries.append({"op_type": "Add", "domain": "", "inputs": [entries[-1]["output"], p.name], "attributes": {}, "output": name})
        self.quantized[second.name] = {"nodes": entries, "weights": {f"{tag}__w2": w2z}, "output": name}
        return True
