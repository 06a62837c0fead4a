"""tfgraph's rewrite passes and the registry that names them.

A pass subclasses one of onnx-ir's pass classes (``onnx_ir.passes.InPlacePass`` for
in-place rewrites), takes keyword-only options, and returns
``PassResult(model, modified)`` with ``modified`` true only when it changed the
model. Target profiles name passes by their registered name with options, so a
pipeline is plain data.
"""

from tfgraph.passes.registry import PassSpec, available_passes, create_pass, get_pass_class, register_pass

# Importing the modules registers their passes.
from tfgraph.passes import (  # noqa: E402
    attention_fusion,
    attention_lowering,
    attention_masks,
    attention_window_approximation,
    basic_simplify,
    constant_folding,
    cse,
    dead_code,
    dedup_derived,
    dedup_initializers,
    decompose,
    eval_mode,
    float16,
    gptq,
    identity,
    inline_functions,
    lift_constants,
    opset,
    norm_fusion,
    ort_operator_fusion,
    pack_projections,
    prune_magnitude,
    prune_structured,
    quantize,
    reshape_simplify,
    shape_inference,
    shape_sources,
    static_shapes,
    shrink_pruned,
    weight_only_quant,
)  # noqa: E402,F401

__all__ = ["PassSpec", "available_passes", "create_pass", "get_pass_class", "register_pass"]
