"""NPU-style targets (Qualcomm QNN HTP through the onnxruntime-qnn plugin execution provider)."""

from __future__ import annotations

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.cpu import CLEANUP
from tfgraph.targets.profile import Provider, Quantization, Target, Tolerance

# QNN HTP through the plugin EP (onnxruntime-qnn 2.7.0; on x86-64 Linux its HTP backend is a simulator).
# soc_model: without it, HTP graph finalization of a tiny BERT already fails with
# "QNN_COMMON_ERROR_MEM_ALLOC" (measured); "60" (Snapdragon 8 Gen 3, HTP v75) lets BERT- and
# MiniLM-sized graphs finalize. enable_htp_fp16_precision made no difference in the simulator
# (0 vs default: same placement, same outputs): left at its default.
QNN_HTP = Provider("QNNExecutionProvider", {"backend_type": "htp", "soc_model": "60"}, plugin="onnxruntime_qnn")

# Fusion to the standard form: shapes, the reshape normal form, attention to the neutral
# tfgraph.Attention (one form for every exporter variant: SDPA's split scale and per-layer mask
# rebuilt, TorchScript's shape chains), LayerNorm/RMSNorm to single ops. No mask classification:
# nothing here reads the kind (the lowering is the neutral op's own standard-ONNX body), and the
# shapes are pinned, so probing the mask at other sizes would not apply.
NPU_FUSION = (
    PassSpec("infer-shapes"),
    PassSpec("shape-from-inputs"),
    PassSpec("simplify-ops"),
    PassSpec("simplify-reshapes"),
    PassSpec("eliminate-identity"),
    PassSpec("cse"),
    PassSpec("fold-constants"),
    PassSpec("remove-dead"),
    PassSpec("fuse-attention"),
    PassSpec("fuse-normalization"),
    PassSpec("shrink-pruned"),
)

# Lowering: QNN rejects com.microsoft Attention/MultiHeadAttention, so the neutral ops are inlined
# to their standard bodies (Reshape/Transpose/MatMul/Mul/Add/Softmax/MatMul, with the NaN guard
# IsNaN/Where that QNN HTP takes as well: measured, every node on QNN); then every shape is made
# static (Reshape targets without 0/-1, masks of pinned inputs folded to constants).
NPU_LOWERING = (
    PassSpec("inline-neutral-ops"),
    PassSpec("specialize-shapes"),
    PassSpec("fold-constants"),
    PassSpec("cse"),
    PassSpec("remove-dead"),
)

# Q/DQ placement: MatMul inputs (weights and activations, the attention's Q·Kᵀ and P·V included),
# Gemm/Conv likewise. Add, Softmax and LayerNormalization stay float (HTP runs them in fp16):
# quantizing Softmax's input or the mask Add (tried: placement on every op's inputs) puts the
# additive padding mask (-3.4e38 where attention_mask is 0) into the activation range, which
# either ruins the scores' resolution or, calibrated on unpadded inputs, clips the mask to a small
# negative number so padded keys are attended again. Weights uint8 asymmetric per tensor (the
# NPU's uint8 weight format); per-channel is not used.
NPU_PLACEMENT = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1)}

NPU_A8W8 = Quantization(
    mode="static", activation_type="uint8", weight_type="uint8", activation_symmetric=False, weight_symmetric=False,
    per_channel=False, placement=NPU_PLACEMENT, calibrator="percentile",
    reason="QNN-style NPUs: uint8 activations and uint8 weights, asymmetric, per tensor",
)
NPU_A16W8 = Quantization(
    mode="static", activation_type="uint16", weight_type="uint8", activation_symmetric=False, weight_symmetric=False,
    per_channel=False, placement=NPU_PLACEMENT, calibrator="minmax",
    reason="QNN-style NPUs: uint16 activations (ai.onnx Q/DQ, opset 21) and uint8 weights, asymmetric, per tensor",
)


def _quantized(scheme: Quantization) -> tuple[PassSpec, ...]:
    return (
        PassSpec("quantize", scheme.to_options()),
        PassSpec("dedup-initializers"),
        PassSpec("remove-dead"),
    )


_ATTENTION = ("standard MatMul/Softmax attention (the neutral tfgraph.Attention inlined; QNN rejects "
              "com.microsoft Attention/MultiHeadAttention), static Reshape shapes")

NPU_A16W8_TARGET = Target(
    name="npu-a16w8",
    description="Qualcomm QNN HTP (onnxruntime-qnn plugin EP), static shapes, QDQ uint16 activations / uint8 weights "
    "on MatMul inputs, standard-ONNX attention",
    providers=(QNN_HTP,),
    precision="a16w8",
    passes=CLEANUP + NPU_FUSION + NPU_LOWERING + _quantized(NPU_A16W8),
    tolerance=Tolerance(atol=0.05, rtol=0.05),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=NPU_A16W8,
    min_cosine=0.999,
    static_shapes=True,
    opset=(21, 21),
    attention=_ATTENTION,
)

NPU_A8W8_TARGET = Target(
    name="npu-a8w8",
    description="Qualcomm QNN HTP (onnxruntime-qnn plugin EP), static shapes, QDQ uint8 activations / uint8 weights "
    "on MatMul inputs, standard-ONNX attention",
    providers=(QNN_HTP,),
    precision="a8w8",
    passes=CLEANUP + NPU_FUSION + NPU_LOWERING + _quantized(NPU_A8W8),
    tolerance=Tolerance(atol=0.25, rtol=0.1),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=NPU_A8W8,
    min_cosine=0.99,
    static_shapes=True,
    opset=(17, 21),
    attention=_ATTENTION,
)

TARGETS = (NPU_A16W8_TARGET, NPU_A8W8_TARGET)
