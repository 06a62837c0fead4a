"""The packed attention of onnxruntime CPU in int8: ``com.microsoft.QAttention`` with per-column weights.

Helpers of the ``quantize`` pass (``attention_kernel="qattention"``), kept in their own file.

``com.microsoft.Attention(x, W, b, attention_bias=M)`` becomes ``DynamicQuantizeLinear(x)`` (one per
input tensor, shared by every block that reads it) + ``QAttention(xq, Wq, b, x_scale, W_scale, mask_index,
x_zero, W_zero)``: the Q/K/V projection runs as one int8 GEMM inside the kernel, which writes Q, K and V
straight into the head layout (no ``Split``, no transposes). Measured on onnxruntime 1.32 CPU:

* per-column weight scales (``W_scale`` of length 3·hidden) are honoured: the kernel's output equals
  the dequantized computation to 4e-5 on MiniLM-sized blocks, and they cost nothing over per-tensor
  scales (0.99x, b8 s128). (An earlier note in this project said otherwise; re-measured, it holds.)
* QAttention has no ``attention_bias`` input, only ``mask_index``. onnxruntime's own quantizer drops
  the mask (a padded batch then attends to its padding); here a block is converted only when its
  additive mask is exactly "key j of batch row b is masked where ``m[b, j] == 0``" for a
  ``(batch, keys)`` graph input ``m`` — checked by running the mask's subgraph on probes — and ``m``
  goes in as the 2-D raw ``mask_index`` (right, left or any padding). Other masks keep the
  ``DynamicQuantizeMatMul`` + ``Split`` + ``MultiHeadAttention`` form. The 2-D mask costs ~15% of
  the kernel's time at b8 s128 (measured, all-ones mask vs none): the price of being correct.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - RemoveUnusedNodesPass

MS = "com.microsoft"
MASKED = -1e4  # a bias entry at or below this counts as masked (exporters use finfo.min, -inf, -10000)
MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.FLOAT)


def _slice(model: ir.Model, value: ir.Value) -> ir.Model:
    """A copy of ``model`` computing only ``value`` (weights shared, not copied)."""
    copy = model.clone()
    by_name = {v.name: v for v in copy.graph.inputs}
    by_name.update(copy.graph.initializers)
    for node in copy.graph:
        for out in node.outputs:
            by_name[out.name] = out
    copy.graph.outputs.clear()
    copy.graph.outputs.append(by_name[value.name])
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    used = {v.name for n in copy.graph for v in n.inputs if v is not None} | {value.name}
    copy.graph.inputs[:] = [v for v in copy.graph.inputs if v.name in used]
    copy.functions.clear()
    return copy


def padding_mask_input(model: ir.Model, bias: ir.Value, *, run=None, generate_inputs=None) -> ir.Value | None:
    """The ``(batch, keys)`` graph input whose zeros are exactly the masked keys of the additive
    attention ``bias`` (B|1, N|1, S, T), or None. Checked on probes: random 0/1 patterns (at least
    one visible key per row), right padding and no padding; every entry must be 0 or masked."""
    if bias.is_graph_input():
        return None
    if run is None or generate_inputs is None:
        from tfgraph.passes.context import current

        ctx = current()
        run, generate_inputs = ctx.run, ctx.generate_inputs
        if run is None or generate_inputs is None:
            return None
    try:
        sliced = _slice(model, bias)
        feeds = generate_inputs(sliced, {}, seed=1)
    except Exception:  # noqa: BLE001 - an input the probes cannot generate: not converted
        return None
    candidates = [v for v in sliced.graph.inputs
                  if v.shape is not None and len(v.shape) == 2 and v.dtype in MASK_TYPES and v.name in feeds]
    rng = np.random.default_rng(0)
    for cand in candidates:
        shape = feeds[cand.name].shape
        if shape[1] < 3:
            continue
        patterns = [rng.integers(0, 2, shape), np.ones(shape, np.int64), np.ones(shape, np.int64)]
        patterns[0][:, 0] = 1
        patterns[2][:, shape[1] // 2:] = 0
        if _explains(run, sliced, feeds, cand, bias.name, patterns):
            return next(v for v in model.graph.inputs if v.name == cand.name)
    return None


def _explains(run, sliced, feeds, cand, name, patterns) -> bool:
    for pattern in patterns:
        probe = dict(feeds)
        probe[cand.name] = pattern.astype(feeds[cand.name].dtype)
        try:
            out = np.asarray(run(sliced, probe)[name])
        except Exception:  # noqa: BLE001
            return False
        b, t = pattern.shape
        if out.ndim != 4 or out.shape[0] not in (1, b) or out.shape[-1] != t:
            return False
        if not np.isfinite(out).all() and not np.isneginf(out[~np.isfinite(out)]).all():
            return False
        masked = out <= MASKED
        if not (masked | (out == 0)).all():
            return False
        want = np.broadcast_to((pattern == 0)[:, None, None, :], (b, *out.shape[1:]))
        if not np.array_equal(np.broadcast_to(masked, want.shape), want):
            return False
    return True


class QAttentionBuilder:
    """Builds ``DynamicQuantizeLinear`` + ``QAttention`` for packed Attention nodes of one graph; one
    ``DynamicQuantizeLinear`` per input tensor and one ``Cast`` per mask input, shared."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.quantized_inputs: dict[int, tuple[ir.Node, tuple[ir.Value, ...]]] = {}
        self.masks: dict[str, ir.Value] = {}

    def supported(self, node: ir.Node, weight_columns: int) -> str | None:
        """Why ``node`` cannot become a QAttention (None: it can)."""
        if "qkv_hidden_sizes" in node.attributes:
            sizes = list(node.attributes["qkv_hidden_sizes"].value)
            if len(set(sizes)) != 1:
                return "unequal Q/K/V sizes (QAttention packs three equal ones)"
        if weight_columns % 3:
            return "packed weight width not divisible by 3"
        return None

    def _quantized(self, x: ir.Value, before: ir.Node) -> tuple[ir.Value, ...]:
        key = id(x)
        if key not in self.quantized_inputs:
            dql = ir.Node("", "DynamicQuantizeLinear", [x], name=f"{x.name}_quantize_dynamic", num_outputs=3)
            for out, tag, dtype in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                       (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
                out.name = f"{x.name}_{tag}_dynamic"
                out.dtype = dtype
            dql.outputs[0].shape = x.shape
            dql.outputs[1].shape = dql.outputs[2].shape = ir.Shape([])
            producer = x.producer()
            if producer is not None:
                self.graph.insert_after(producer, dql)
            else:
                self.graph.insert_before(next(iter(self.graph)), dql)
            self.quantized_inputs[key] = (dql, tuple(dql.outputs))
        return self.quantized_inputs[key][1]

    def _mask(self, mask: ir.Value) -> ir.Value:
        if mask.name not in self.masks:
            cast = ir.Node("", "Cast", [mask], attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
                           name=f"{mask.name}_mask_index", num_outputs=1)
            cast.outputs[0].name = f"{mask.name}_mask_index"
            cast.outputs[0].dtype = ir.DataType.INT32
            cast.outputs[0].shape = mask.shape
            self.graph.insert_before(next(iter(self.graph)), cast)
            self.masks[mask.name] = cast.outputs[0]
        return self.masks[mask.name]

    def build(self, node: ir.Node, weight: tuple[ir.Value, ir.Value, ir.Value], bias: ir.Value,
              mask: ir.Value | None) -> ir.Node:
        """Replace packed ``node`` by a QAttention (int8 ``weight`` = (values, scale, zero point))."""
        xq, xs, xz = self._quantized(node.inputs[0], node)
        mask_index = self._mask(mask) if mask is not None else None
        attrs = [ir.AttrInt64("num_heads", node.attributes.get_int("num_heads"))]
        if "scale" in node.attributes:
            attrs.append(ir.AttrFloat32("scale", node.attributes.get_float("scale")))
        q, scale, zero = weight
        qa = ir.Node(MS, "QAttention", [xq, q, bias, xs, scale, mask_index, xz, zero], attributes=attrs,
                     name=node.name, num_outputs=1)
        old = node.outputs[0]
        qa.outputs[0].dtype = ir.DataType.FLOAT
        qa.outputs[0].shape = old.shape
        self.graph.insert_before(node, qa)
        ir.convenience.replace_all_uses_with(old, qa.outputs[0], replace_graph_outputs=True)
        name = old.name
        self.graph.remove(node, safe=True)
        qa.outputs[0].name = name
        return qa
