"""specialize-unpadded-attention: skip the key-padding mask's work when a batch has no padding.

onnxruntime CPU's attention kernels (``Attention``, ``QAttention``, ``MultiHeadAttention``) turn a key-padding
mask into a (batch, sequence, total) float bias and add it to every head's scores: at batch 8, 128 tokens,
12 heads that is a 6 MB copy into the score buffers and a GEMM that reads its output back, per layer,
whether or not any position is masked. A request at batch 1 or a batch of equal lengths — most of what an
encoder serves — has no padding at all.

This pass gives each such kernel two forms and picks one at run time: ``If(min(mask) > 0)`` runs the kernel
without its mask (nothing is masked: the results are the same), else with it. The condition is computed
once per mask tensor; both branches read the same outer-scope weights (no copy in the file). Only 2-D integer
masks (batch, total) with 0 = masked are specialized (``QAttention``/``Attention``'s raw ``mask_index`` and
``MultiHeadAttention``'s ``key_padding_mask``); other mask forms (1-D end positions, 3-D/4-D) are left as
they are, and so is a kernel whose other outputs (present key/value) are read.

Run it last: the If hides the kernels from passes that match them (quantization, the max-drop loop's
reverts); the attention analysis counts an If over attention forms as one block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass

MS = "com.microsoft"
# op (domain, type) → index of its key-padding mask input
MASK_INPUTS: Mapping[tuple[str, str], int] = {
    (MS, "QAttention"): 5,
    (MS, "Attention"): 3,
    (MS, "MultiHeadAttention"): 4,
}
_INTEGER = (ir.DataType.INT32, ir.DataType.INT64)


@register_pass("specialize-unpadded-attention")
class SpecializeUnpaddedAttention(ir.passes.InPlacePass):
    """Attention kernels with a 2-D key-padding mask → ``If(no padding, kernel without mask, kernel with mask)``."""

    preserves_numerics = True  # the unmasked branch runs only when the mask masks nothing

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        conditions: dict[int, ir.Value] = {}
        done, skipped = 0, {}
        for node in list(graph):
            index = MASK_INPUTS.get((node.domain, node.op_type))
            if index is None or len(node.inputs) <= index or node.inputs[index] is None:
                continue
            why = self._unfit(node, node.inputs[index])
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            mask = node.inputs[index]
            if id(mask) not in conditions:
                conditions[id(mask)] = self._no_padding(graph, node, mask)
            self._specialize(graph, node, index, conditions[id(mask)])
            done += 1
        self.report = {"specialized": done, "masks": len(conditions), "skipped": skipped}
        return ir.passes.PassResult(model, bool(done))

    @staticmethod
    def _unfit(node: ir.Node, mask: ir.Value) -> str | None:
        if mask.dtype not in _INTEGER:
            return f"mask of type {mask.dtype}"
        if mask.shape is None or len(mask.shape) != 2:
            return "mask not 2-D (batch, total)"
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return "other outputs read (present key/value)"
        return None

    @staticmethod
    def _no_padding(graph: ir.Graph, before: ir.Node, mask: ir.Value) -> ir.Value:
        """``min(mask) > 0``: a scalar bool computed once, before the first kernel that reads ``mask``."""
        stem = f"{mask.name}_unpadded"
        zero = ir.Value(name=f"{stem}_zero", shape=ir.Shape([]), type=ir.TensorType(mask.dtype),
                        const_value=ir.tensor(np.array(0, mask.dtype.numpy()), name=f"{stem}_zero"))
        graph.register_initializer(zero)
        smallest = ir.node("ReduceMin", [mask], attributes={"keepdims": 0}, name=f"{stem}/ReduceMin")
        smallest.outputs[0].name, smallest.outputs[0].dtype = f"{stem}_min", mask.dtype
        smallest.outputs[0].shape = ir.Shape([])
        full = ir.node("Greater", [smallest.outputs[0], zero], name=f"{stem}/Greater")
        full.outputs[0].name, full.outputs[0].dtype, full.outputs[0].shape = stem, ir.DataType.BOOL, ir.Shape([])
        graph.insert_before(before, [smallest, full])
        return full.outputs[0]

    @staticmethod
    def _specialize(graph: ir.Graph, node: ir.Node, index: int, condition: ir.Value) -> None:
        out = node.outputs[0]

        def branch(tag: str, inputs: list) -> ir.Graph:
            while inputs and inputs[-1] is None:
                inputs.pop()
            attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
            inner = ir.Node(node.domain, node.op_type, inputs, attributes=attributes, name=f"{node.name}/{tag}",
                            num_outputs=1)
            value = inner.outputs[0]
            value.name, value.dtype, value.shape = f"{out.name}__{tag}", out.dtype, out.shape
            return ir.Graph(inputs=[], outputs=[value], nodes=[inner], name=f"{node.name}_{tag}")

        unmasked = list(node.inputs)
        unmasked[index] = None
        choose = ir.Node("", "If", [condition], attributes=[
            ir.AttrGraph("then_branch", branch("unpadded", unmasked)),
            ir.AttrGraph("else_branch", branch("padded", list(node.inputs)))], name=node.name, num_outputs=1)
        choose.outputs[0].dtype, choose.outputs[0].shape = out.dtype, out.shape
        graph.insert_before(node, choose)
        out.replace_all_uses_with(choose.outputs[0], replace_graph_outputs=True)
        name = out.name
        graph.remove(node, safe=True)
        choose.outputs[0].name = name
