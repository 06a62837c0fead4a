"""decompose-unsupported: rewrite ops the target's execution provider lacks into ops it has.

Input models often arrive already "optimized" for another runtime — onnxruntime's transformers
optimizer leaves ``com.microsoft`` Gelu/FastGelu/BiasGelu/SkipLayerNormalization/FusedMatMul
behind, and an opset-20 export uses ai.onnx ``Gelu`` — which TensorRT, OpenVINO or QNN may not run
(the node then falls back to the CPU or the engine build fails). This pass asks the target's
operator table (``table``: a checked-in table name such as ``tensorrt``, or ``runtime:<EP>`` for the
installed onnxruntime's kernel registry) about every node, and replaces each one the table does not
support, and for which a decomposition is known, by standard ONNX ops:

==============================================  =============================================
op                                              becomes
==============================================  =============================================
Gelu (ai.onnx 20, com.microsoft), BiasGelu      x·½·(1 + erf(x/√2)) (after the bias Add)
FastGelu (com.microsoft), Gelu tanh (ai.onnx)   x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
QuickGelu (com.microsoft)                       x·sigmoid(alpha·x)
SkipLayerNormalization                          Add(input, skip[, bias]) → LayerNormalization
SkipSimplifiedLayerNormalization                Add(input, skip[, bias]) → RMS normalization
FusedMatMul (com.microsoft)                     Transpose(s) → MatMul → Mul(alpha)
CastLike (ai.onnx; CUDA has no kernel)          Cast to the (known) type of its second input,
                                                a constant of that type when the input is one
a model-local function call (e.g. a neutral     its body, inlined, when the body holds an op
``tfgraph`` op; ``inline_functions=True``)      the table lacks (then decomposed as above)
==============================================  =============================================

Only the first output of the normalizations is rebuilt (the optional mean/variance outputs must be
unused; the input+skip sum output is kept when read). Nodes the table rejects that have no known
decomposition are left in place and listed in ``self.report["left"]``: the placement report shows
them as CPU fallbacks.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from tfgraph.builder import Builder
from tfgraph.passes.registry import register_pass

MS = "com.microsoft"


def _gelu_erf(e: Builder, x: ir.Value) -> ir.Value:
    inner = e("Erf", e("Div", x, e.scalar(math.sqrt(2.0), x)))
    return e("Mul", e("Mul", x, e.scalar(0.5, x)), e("Add", inner, e.scalar(1.0, x)))


def _gelu_tanh(e: Builder, x: ir.Value) -> ir.Value:
    cube = e("Mul", e("Mul", x, x), x)
    inner = e("Mul", e("Add", x, e("Mul", cube, e.scalar(0.044715, x))), e.scalar(math.sqrt(2.0 / math.pi), x))
    return e("Mul", e("Mul", x, e.scalar(0.5, x)), e("Add", e("Tanh", inner), e.scalar(1.0, x)))


def _with_bias(e: Builder, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    return e("Add", x, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else x


def _gelu(e: Builder, node: ir.Node):
    x = _with_bias(e, node) if node.domain == MS and node.op_type in ("BiasGelu", "FastGelu") else node.inputs[0]
    tanh = node.op_type == "FastGelu" or node.attributes.get_string("approximate", "none") == "tanh"
    return [_gelu_tanh(e, x) if tanh else _gelu_erf(e, x)]


def _quick_gelu(e: Builder, node: ir.Node):
    x = node.inputs[0]
    alpha = node.attributes.get_float("alpha", 1.702)
    return [e("Mul", x, e("Sigmoid", e("Mul", x, e.scalar(alpha, x))))]


def _skip_layer_norm(e: Builder, node: ir.Node):
    # SkipLayerNormalization(input, skip, gamma, beta?, bias?) -> (output, mean, inv_std_var, input_skip_bias_sum)
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    total = e("Add", node.inputs[0], node.inputs[1])
    if bias is not None:
        total = e("Add", total, bias)
    eps = node.attributes.get_float("epsilon", 1e-12)
    normed = e("LayerNormalization", total, node.inputs[2], *([beta] if beta is not None else []), axis=-1, epsilon=eps)
    return [normed, None, None, total]


def _skip_rms_norm(e: Builder, node: ir.Node):
    # SkipSimplifiedLayerNormalization(input, skip, gamma, bias?)
    total = e("Add", node.inputs[0], node.inputs[1])
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        total = e("Add", total, node.inputs[3])
    eps = node.attributes.get_float("epsilon", 1e-6)
    mean = e("ReduceMean", e("Mul", total, total), _axes(e, total), keepdims=1)
    normed = e("Mul", e("Div", total, e("Sqrt", e("Add", mean, e.scalar(eps, total)))), node.inputs[2])
    return [normed, None, None, total]


def _axes(e: Builder, like: ir.Value) -> ir.Value:
    return e.i64(-1)


def _fused_matmul(e: Builder, node: ir.Node):
    a, b = node.inputs[0], node.inputs[1]
    if node.attributes.get_int("transBatchA", 0) or node.attributes.get_int("transBatchB", 0):
        return None
    for flag, value in (("transA", a), ("transB", b)):
        if node.attributes.get_int(flag, 0):
            if value.shape is None:
                return None
            rank = len(value.shape)
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            transposed = e("Transpose", value, perm=perm)
            a, b = (transposed, b) if flag == "transA" else (a, transposed)
    out = e("MatMul", a, b)
    alpha = node.attributes.get_float("alpha", 1.0)
    return [out if alpha == 1.0 else e("Mul", out, e.scalar(alpha, node.inputs[0]))]


def _constant_array(value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value.numpy()
    return None


def _cast_like(e: Builder, node: ir.Node):
    dtype = node.inputs[1].dtype if node.inputs[1] is not None else None
    if dtype is None:
        return None  # the type to cast to is unknown: left (infer-shapes before this pass types it)
    array = _constant_array(node.inputs[0])
    if array is not None:
        out = e("Constant", value=ir.tensor(array.astype(dtype.numpy())))
    else:
        out = e("Cast", node.inputs[0], to=dtype)
    out.dtype = dtype
    return [out]


DECOMPOSITIONS = {
    ("", "CastLike"): _cast_like,
    ("", "Gelu"): _gelu,
    (MS, "Gelu"): _gelu,
    (MS, "BiasGelu"): _gelu,
    (MS, "FastGelu"): _gelu,
    (MS, "QuickGelu"): _quick_gelu,
    (MS, "SkipLayerNormalization"): _skip_layer_norm,
    (MS, "SkipSimplifiedLayerNormalization"): _skip_rms_norm,
    (MS, "FusedMatMul"): _fused_matmul,
}


@register_pass("decompose-unsupported")
class DecomposeUnsupported(ir.passes.InPlacePass):
    """Replace ops the target's operator table lacks by standard-ONNX decompositions."""

    def __init__(self, *, table: str, inline_functions: bool = False, infer_types: bool = True):
        super().__init__()
        self.table_name = table
        # Inline model-local functions whose body the table rejects (after lowering: before it, the
        # neutral ops are what the lowering passes look for); then type the inlined values (infer-shapes).
        self.inline_functions = inline_functions
        self.infer_types = infer_types
        self.report: dict = {}

    def _table(self):
        from tfgraph.passes.context import current

        return current().need("op_table", "decompose-unsupported")(self.table_name)

    def _inline_rejected_functions(self, model: ir.Model, table, done: dict[str, int]) -> None:
        """Inline the calls of every model-local function whose body holds an op ``table`` rejects."""
        from onnx_ir.passes.common import InlinePass

        rejected = set()
        for key, function in model.functions.items():
            for node in function:
                domain = "" if node.domain in ("", "ai.onnx") else node.domain
                version = function.opset_imports.get(domain, model.opset_imports.get(domain, 1))
                if (domain, node.op_type, "") not in model.functions and table.supports(domain, node.op_type, version) is not None:
                    rejected.add(key)
                    break
        calls = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_identifier() in rejected]
        if not calls:
            return
        for node in calls:
            name = f"{node.domain}.{node.op_type} (inlined)"
            done[name] = done.get(name, 0) + 1
        InlinePass(criteria=lambda f: f.identifier() in rejected)(model)
        for key in rejected:
            model.functions.pop(key, None)
        for domain in {key[0] for key in rejected}:
            if domain in model.opset_imports and not any(
                n.domain == domain for n in ir.traversal.RecursiveGraphIterator(model.graph)
            ) and not any(f.domain == domain for f in model.functions.values()):
                del model.opset_imports[domain]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table = self._table()
        opset = model.opset_imports.get("", 18)
        done: dict[str, int] = {}
        left: dict[str, int] = {}
        if self.inline_functions:
            self._inline_rejected_functions(model, table, done)
        inlined = bool(done)
        for graph in model.graphs():
            for node in list(graph):
                key = ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)
                version = model.opset_imports.get(key[0], 1) if key[0] else opset
                types = [v.dtype.name.lower() if v is not None and v.dtype is not None else None for v in node.inputs]
                if table.supports(key[0], key[1], version, types) is None:
                    continue
                build = DECOMPOSITIONS.get(key)
                emit = Builder(node.name or node.op_type)
                outputs = build(emit, node) if build is not None else None
                name = f"{key[0]}.{key[1]}" if key[0] else key[1]
                if outputs is None or any(o is None and i < len(node.outputs) and (node.outputs[i].uses()
                                          or node.outputs[i].is_graph_output())
                                          for i, o in enumerate(outputs)):
                    left[name] = left.get(name, 0) + 1
                    continue
                for old, new in zip(node.outputs, outputs):
                    if new is None:
                        continue
                    if old.type is not None:
                        new.type, new.shape = old.type, old.shape
                graph.insert_before(node, emit.nodes)
                renames = []
                for old, new in zip(node.outputs, outputs):
                    if new is not None:
                        old.replace_all_uses_with(new, replace_graph_outputs=True)
                        renames.append((new, old.name))
                graph.remove(node, safe=True)
                for new, name_out in renames:
                    new.name = name_out
                done[name] = done.get(name, 0) + 1
        if inlined and self.infer_types:  # the inlined bodies' values carry no types yet
            from tfgraph.passes.shape_inference import InferShapesPass

            InferShapesPass()(model)
        self.report = {"table": f"{table.name} ({table.version})", "decomposed": done, "left": left}
        return ir.passes.PassResult(model, bool(done))
