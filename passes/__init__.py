"""tfgraph's rewrite passes and the registry that names them.

A pass subclasses one of onnx-ir's pass classes (``onnx_ir.passes.InPlacePass`` for
in-place rewrites), takes keyword-only options, and returns
``PassResult(model, modified)`` with ``modified`` true only when it changed the
model. Target profiles name passes by their registered name with options, so a
pipeline is plain data.
"""

from tfgraph.passes.registry import PassSpec, available_passes, create_pass, get_pass_class, register_pass
from tfgraph.passes.registry import register_lazy as _register_lazy

# Built-in passes by registered name → the module that registers them, imported on first use (so
# ``import tfgraph`` does not import every pass). tests/test_layers.py checks this table against what
# importing every module registers.
BUILTIN_PASSES: dict[str, str] = {
    "approximate-attention-window": "attention_window_approximation",
    "classify-attention-masks": "attention_masks",
    "compact-padding": "compact_padding",
    "convert-float16": "float16",
    "cse": "cse",
    "decompose-unsupported": "decompose",
    "dedup-derived": "dedup_derived",
    "dedup-initializers": "dedup_initializers",
    "eliminate-identity": "identity",
    "eval-mode": "eval_mode",
    "fold-constants": "constant_folding",
    "fuse-attention": "attention_fusion",
    "fuse-normalization": "norm_fusion",
    "fuse-ort-operators": "ort_operator_fusion",
    "fuse-quantized-gather": "quantized_gather",
    "gptq": "gptq",
    "infer-shapes": "shape_inference",
    "inline-neutral-ops": "inline_functions",
    "lift-constants": "lift_constants",
    "lower-attention": "attention_lowering",
    "lower-cached-attention": "attention_lowering_cached",
    "pack-projections": "pack_projections",
    "prune-magnitude": "prune_magnitude",
    "prune-structured": "prune_structured",
    "quantize": "quantize",
    "quantize-outlier-channels": "outlier_channels",
    "quantize-weights-nbits": "weight_only_quant",
    "specialize-unpadded-attention": "unpadded_attention",
    "remove-dead": "dead_code",
    "shape-from-inputs": "shape_sources",
    "shrink-pruned": "shrink_pruned",
    "simplify-ops": "basic_simplify",
    "simplify-reshapes": "reshape_simplify",
    "specialize-shapes": "static_shapes",
    "upgrade-opset": "opset",
}
_register_lazy(BUILTIN_PASSES)

__all__ = ["PassSpec", "available_passes", "create_pass", "get_pass_class", "register_pass"]
