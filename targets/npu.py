"""NPU-style targets (Qualcomm QNN HTP through the onnxruntime-qnn plugin execution provider)."""

from __future__ import annotations

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.cpu import CLEANUP, FUSION
from tfgraph.targets.profile import Phase, Provider, Quantization, Target, Tolerance, phases

# QNN HTP through the plugin EP (onnxruntime-qnn 2.7.0; on x86-64 Linux its HTP backend is a simulator).
# soc_model: without it, HTP graph finalization of a tiny BERT already fails with
# "QNN_COMMON_ERROR_MEM_ALLOC" (measured); "60" (Snapdragon 8 Gen 3, HTP v75) lets BERT- and
# MiniLM-sized graphs finalize. enable_htp_fp16_precision made no difference in the simulator
# (0 vs default: same placement, same outputs): left at its default.
QNN_HTP = Provider("QNNExecutionProvider", {"backend_type": "htp", "soc_model": "60"}, plugin="onnxruntime_qnn", extra="qnn")

# Fusion to the standard form: shapes, the reshape normal form, attention to the neutral
# tfgraph.Attention (one form for every exporter variant: SDPA's split scale and per-layer mask
# rebuilt, TorchScript's shape chains), LayerNorm/RMSNorm to single ops. No mask classification:
# nothing here reads the kind (the lowering is the neutral op's own standard-ONNX body), and the
# shapes are pinned, so probing the mask at other sizes would not apply.
NPU_FUSION = tuple(spec for spec in FUSION if spec.name != "classify-attention-masks")

# Lowering: QNN rejects com.microsoft Attention/MultiHeadAttention, so the neutral ops are inlined
# to their standard bodies (Reshape/Transpose/MatMul/Mul/Add/Softmax/MatMul, with the NaN guard
# IsNaN/Where that QNN HTP takes as well: measured, every node on QNN); then every shape is made
# static (Reshape targets without 0/-1, masks of pinned inputs folded to constants).
NPU_LOWERING = (
    # QNN's GELU fusion (Div/Erf/Add/Mul → its Gelu) failed validation on an opset-17 a8w8 graph and
    # left Erf (which QNN lacks) on the CPU EP; at opset 21 every node ran on QNN (bert-small,
    # TorchScript export; benchmarks/results/placement.md). a16w8 needs 21 for uint16 Q/DQ anyway.
    PassSpec("inline-neutral-ops"),  # first: onnx's version converter drops model-local functions' domains
    PassSpec("upgrade-opset", {"version": 21}),
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
# negative number so padded keys are attended again.
# Weights: uint8 asymmetric per tensor. Measured (all-MiniLM-L6-v2 at 1x128, 16 real calibration
# sentences, 24 held-out ones, the quantized graph run on onnxruntime CPU vs fp32; sentence-embedding
# cosine mean/min): a16w8 per-tensor minmax 0.9900/0.9840, a8w8 per-tensor minmax 0.9837/0.9703,
# a8w8 percentile 0.910 (percentile clips MiniLM's outlier activations: minmax for both);
# per-channel weights would be far better (a16 + uint8 asym per-channel 0.9997/0.9994, a16 + int8
# symmetric per-channel 0.9996/0.9993, a8 + uint8 per-channel 0.9931) but QNN HTP does not take them
# on MatMul: asymmetric per-channel DQs all fall back to CPU; symmetric int8 per-channel runs only
# where onnxruntime's MatMulAddFusion made a Gemm first (tiny BERT: 6 of 12 weight DQs on CPU with
# ORT_ENABLE_ALL, 12 of 12 with ORT_DISABLE_ALL). Per-channel needs a Gemm/FullyConnected lowering first.
NPU_PLACEMENT = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1)}

NPU_A8W8 = Quantization(
    mode="static", activation_type="uint8", weight_type="uint8", activation_symmetric=False, weight_symmetric=False,
    per_channel=False, placement=NPU_PLACEMENT, calibrator="minmax",
    reason="QNN-style NPUs: uint8 activations and uint8 weights, asymmetric, per tensor (see targets/npu.py)",
)
NPU_A16W8 = Quantization(
    mode="static", activation_type="uint16", weight_type="uint8", activation_symmetric=False, weight_symmetric=False,
    per_channel=False, placement=NPU_PLACEMENT, calibrator="minmax",
    reason="QNN-style NPUs: uint16 activations (ai.onnx Q/DQ, opset 21) and uint8 weights, asymmetric, per tensor "
    "(see targets/npu.py)",
)


def _quantized(scheme: Quantization) -> tuple[Phase, ...]:
    return phases(normalize=CLEANUP, fuse=NPU_FUSION, lower=NPU_LOWERING,
                  precision=(PassSpec("quantize", scheme.to_options()),),
                  finalize=(PassSpec("dedup-initializers"), PassSpec("remove-dead")))


_ATTENTION = ("standard MatMul/Softmax attention (the neutral tfgraph.Attention inlined; QNN rejects "
              "com.microsoft Attention/MultiHeadAttention), static Reshape shapes")

# Tolerance: checks after quantization compare against the quantized graph on onnxruntime CPU (the
# quantize pass rebaselines), so it is the EP's own fidelity: float ops in fp16 on HTP plus its integer
# kernels. Measured QNN vs the same graph on CPU: MiniLM a16w8 1x128 max abs 0.056 (last_hidden_state,
# |x| up to ~10), 0.005 (sentence_embedding), cosine 0.9997; tiny BERT/GPT (hidden 64) max abs <= 0.012
# for both schemes.
# No min_cosine (max-drop budget): compile ranks every quantized node by evaluating the model on the
# profile's providers, one new QNN session each; the HTP simulator takes ~30 s per MiniLM 1x128
# inference here (+3 s to finalize), so 48 MatMuls mean ~30 min. The accuracy vs fp32 is reported
# (manifest precision section), not enforced.
# Opset: both at ai.onnx 21 (upgrade-opset in NPU_LOWERING): a16w8's uint16 Q/DQ need it, and a8w8's
# GELU stays on QNN with it (see NPU_LOWERING).
# No allowed_fallbacks: on the tiny BERT/GPT models (both exporters' dynamo form) and MiniLM every node
# runs on QNN once specialize-shapes has turned SDPA's mask GatherND into a Reshape (GatherND was the
# one CPU fallback before).
NPU_A16W8_TARGET = Target(
    name="npu-a16w8",
    description="Qualcomm QNN HTP (onnxruntime-qnn plugin EP), static shapes, QDQ uint16 activations / uint8 weights "
    "on MatMul inputs, standard-ONNX attention",
    providers=(QNN_HTP,),
    precision="a16w8",
    phases=_quantized(NPU_A16W8),
    tolerance=Tolerance(atol=0.1, rtol=0.05),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=NPU_A16W8,
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
    phases=_quantized(NPU_A8W8),
    tolerance=Tolerance(atol=0.25, rtol=0.1),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=NPU_A8W8,
    static_shapes=True,
    opset=(21, 21),
    attention=_ATTENTION,
)

TARGETS = (NPU_A16W8_TARGET, NPU_A8W8_TARGET)
