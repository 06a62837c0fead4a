"""Element types for every value: what ONNX and onnxruntime's symbolic inference leave unknown.

ONNX's inference knows no ``com.microsoft`` op, and onnxruntime's symbolic engine stops at the
first node whose output type it cannot set (a GroupQueryAttention without past key/value: its
``present_key``/``present_value`` stay untyped), leaving every value after it untyped. Passes that
decide by element type (``convert-float16``; the placement report, whose CUDA kernels are
fp16-only for some ops) must never meet an unknown type. Two remedies, used by ``infer-shapes``:

* :func:`symbolic_engine` — onnxruntime's engine with GroupQueryAttention's present outputs typed
  (the query's type; fresh symbolic dims) when there is no past, so it runs to the end;
* :func:`fill_element_types` — every still-untyped output of an op outside ONNX's own domains is
  typed from the op's schema (onnxruntime's contrib schemas): an output whose type parameter a typed
  input binds takes that type; a fixed ``tensor(x)`` or a single allowed type is that type.

:func:`output_may_be` tells ``convert-float16`` which outputs its schema fixes to another type
(SkipLayerNormalization's mean and inv_std_var stay float32 when the op computes in float16).
"""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.ops import contrib_schema

# A type parameter no input binds, read as another one of the same node (onnxruntime's own
# inference does this: without a past cache, GroupQueryAttention's present cache has the query's type).
UNBOUND_AS = {("com.microsoft", "GroupQueryAttention", "T_CACHE"): "T",
              ("com.microsoft", "PagedAttention", "T_CACHE"): "T"}

_TYPE_NAMES = {f"tensor({dt.name.lower()})": dt for dt in ir.DataType if dt is not ir.DataType.UNDEFINED}
_TYPE_NAMES.update({"tensor(float)": ir.DataType.FLOAT, "tensor(double)": ir.DataType.DOUBLE})


def _formal(params: list, index: int):
    if index < len(params):
        return params[index]
    if params and "Variadic" in str(params[-1].option):
        return params[-1]
    return None


def _dtype(type_str: str) -> ir.DataType | None:
    return _TYPE_NAMES.get(type_str)


def output_types(node: ir.Node, version: int) -> list[ir.DataType | None]:
    """The element type of each output of ``node`` that its schema and its typed inputs determine."""
    schema = contrib_schema(node.domain, node.op_type, version)
    if schema is None:
        return [None] * len(node.outputs)
    bound: dict[str, ir.DataType] = {}
    for i, value in enumerate(node.inputs):
        formal = _formal(schema.inputs, i)
        if value is not None and value.dtype is not None and formal is not None and formal.typeStr not in _TYPE_NAMES:
            bound.setdefault(formal.typeStr, value.dtype)
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    result: list[ir.DataType | None] = []
    for i in range(len(node.outputs)):
        formal = _formal(schema.outputs, i)
        if formal is None:
            result.append(None)
            continue
        param = formal.typeStr
        dtype = _dtype(param) or bound.get(param)
        if dtype is None:
            alias = UNBOUND_AS.get((node.domain, node.op_type, param))
            dtype = bound.get(alias) if alias else None
        if dtype is None and len(allowed.get(param, ())) == 1:
            dtype = _dtype(allowed[param][0])
        result.append(dtype)
    return result


def fill_element_types(model: ir.Model) -> int:
    """Type every untyped output of a non-ONNX-domain node that its schema determines; returns how
    many values were typed. Run ONNX inference again afterwards: ops downstream of them can then be typed."""
    filled = 0
    for graph in model.graphs():
        for node in graph:
            if node.domain in ("", "ai.onnx", "ai.onnx.ml") or all(o.dtype is not None for o in node.outputs):
                continue
            if node.op_identifier() in model.functions:
                continue  # a model-local function: ONNX's inference types it through its body
            for value, dtype in zip(node.outputs, output_types(node, model.opset_imports.get(node.domain, 1))):
                if value.dtype is None and dtype is not None:
                    value.dtype = dtype
                    filled += 1
    return filled


def unknown_types(model: ir.Model) -> list[str]:
    """Names of node inputs/outputs (read ones) whose element type is still unknown."""
    names: list[str] = []
    for node in model.graph:
        for value in [*node.inputs, *(o for o in node.outputs if o.uses() or o.is_graph_output())]:
            if value is not None and value.dtype is None and value.name not in names:
                names.append(value.name)
    return names


def _symbolic_module():
    """onnxruntime's ``tools/symbolic_shape_infer.py``, loaded from its file where the package is not
    imported yet: ``import onnxruntime.tools`` imports torch when it is installed (3-4 s, 0.2 GB)."""
    import importlib.util
    import pathlib
    import sys

    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules or "onnxruntime.tools" in sys.modules:
        return importlib.import_module(name)
    import onnxruntime

    path = pathlib.Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    own = "tfgraph_ort_symbolic_shape_infer"
    if own not in sys.modules:
        spec = importlib.util.spec_from_file_location(own, path)
        if spec is None or spec.loader is None:
            return importlib.import_module(name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[own] = module
        spec.loader.exec_module(module)
    return sys.modules[own]


def symbolic_engine():
    """onnxruntime's SymbolicShapeInference, with GroupQueryAttention's present outputs typed
    when it has no past inputs (the stock engine leaves them untyped and stops there)."""
    from onnx import helper

    SymbolicShapeInference = _symbolic_module().SymbolicShapeInference  # noqa: N806 - a class

    class Engine(SymbolicShapeInference):
        def _infer_GroupQueryAttention(self, node):  # noqa: N802 - onnxruntime's dispatch name
            super()._infer_GroupQueryAttention(node)
            dtype = self.known_vi_[node.input[0]].type.tensor_type.elem_type
            for index in (1, 2):
                if len(node.output) <= index or not node.output[index]:
                    continue
                vi = self.known_vi_[node.output[index]]
                if vi.type.tensor_type.elem_type:
                    continue
                shape = [str(self._new_symbolic_dim_from_output(node, index, d)) for d in range(4)]
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, dtype, shape))

    return Engine(2**31 - 1, True, False, 0)


def output_may_be(node: ir.Node, index: int, dtype: ir.DataType, version: int) -> bool:
    """Whether output ``index`` of ``node`` may have element type ``dtype`` by its op's schema (ONNX's or
    onnxruntime's): False for outputs fixed to another type, e.g. SkipLayerNormalization's float-only
    mean/inv_std_var. True where no schema says (a model-local function, an unknown op)."""
    wanted = f"tensor({dtype.name.lower()})"
    if node.domain in ("", "ai.onnx", "ai.onnx.ml"):
        import onnx

        try:
            schema = onnx.defs.get_schema(node.op_type, version, node.domain if node.domain != "ai.onnx" else "")
        except onnx.defs.SchemaError:
            return True
        formal = _formal(list(schema.outputs), index)
        param = formal.type_str if formal is not None else None
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    else:
        schema = contrib_schema(node.domain, node.op_type, version)
        if schema is None:
            return True
        formal = _formal(schema.outputs, index)
        param = formal.typeStr if formal is not None else None
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    if param is None:
        return True
    if param.startswith("tensor("):
        return param == wanted
    return wanted in allowed.get(param, (wanted,))
