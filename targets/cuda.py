"""CUDA and TensorRT targets (onnxruntime-gpu's CUDA and TensorRT execution providers).

Neither EP can run on this machine (no GPU; TensorRT's builder is not on the package index), so:
* the placement report of a compile comes from the checked-in operator tables
  (targets/op_tables/cuda.json from onnxruntime's OperatorKernels.md, tensorrt.json from
  onnx-tensorrt's operator list) — an op outside them is a CPU fallback (``--strict`` fails);
* verification runs the same graph on onnxruntime's CPU EP (which computes fp16 nodes that lack
  CPU fp16 kernels in fp32 behind inserted Casts): it proves the graph, not the GPU kernels;
* ``benchmarks/gpu_check.py`` runs the artifacts on a CUDA host: numerics against fp32 and latency
  against onnxruntime's transformers optimizer + fp16, in one run.

What the profiles emit, and why (figures from ../shared/MEASUREMENTS.md, H200, onnxruntime-gpu):
* cuda-fp16: onnxruntime's fused ops, which its CUDA EP runs as fused kernels: packed
  ``com.microsoft.Attention`` (else MultiHeadAttention), SkipLayerNormalization, BiasGelu/FastGelu;
  causal and left-windowed attention to GroupQueryAttention, whose CUDA kernel skips the work
  outside ``local_window_size`` (1.09 ms at S=32768 vs 4.56 ms causal; the blocked form 1.27 ms),
  unlike onnxruntime CPU's. fp16 with fp32 IO; LayerNorm/Softmax kept fp32 where calibrated ranges
  demand it (convert-float16). The baseline to beat is onnxruntime's transformers optimizer + fp16
  (BERT-base 0.98 ms at b8 s128, 7.74 ms at b32 s512).
* cuda-int8: onnxruntime's CUDA EP has no int8 GEMM for Q/DQ graphs (it dequantizes and runs the
  float MatMul: slower than fp16); what it runs fast is weight-only ``MatMulNBits`` (8-bit blocks of
  32 along K, dequantized inside the GEMM), which halves weight reads against fp16. So cuda-int8 is
  cuda-fp16 with every projection/FFN MatMul weight in 8-bit blocks; attention lowered to
  MultiHeadAttention so the Q/K/V projections stay MatMuls (a packed Attention's weight cannot be
  MatMulNBits).
* tensorrt-fp16 / tensorrt-int8: TensorRT parses standard ONNX only (no com.microsoft ops) and builds
  its own fused kernels (it recognizes MatMul-Softmax-MatMul attention and LayerNormalization), so
  the neutral ops are inlined into standard ops and windowed attention takes the blocked form in
  standard ops. Precision is TensorRT's builder flag (``trt_fp16_enable``): the graph stays fp32.
  tensorrt-int8 is explicit quantization: Q/DQ pairs (symmetric int8, per-channel weights, entropy
  calibration) on GEMM inputs only, where TensorRT fuses them into int8 GEMMs.
"""

from __future__ import annotations

import dataclasses

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.cpu import CLEANUP, FUSION
from tfgraph.targets.profile import Provider, Quantization, Target, Tolerance, phases

CPU = Provider("CPUExecutionProvider")
CUDA_INSTALL = "pip install onnxruntime-gpu (in place of onnxruntime; an NVIDIA GPU with CUDA 12 and cuDNN 9)"
CUDA = Provider("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True},
                install=CUDA_INSTALL)

# The CUDA EP itself assigns shape arithmetic (Shape, Gather/Concat on int64 shape tensors…) to the
# CPU on purpose (it is cheaper than a device round trip); the table-based report cannot see that
# and counts only ops the CUDA table lacks.
CUDA_ATTENTION = (
    "packed com.microsoft.Attention (else MultiHeadAttention); causal and left-windowed attention → "
    "GroupQueryAttention (local_window_size skips the out-of-window work on CUDA); two-sided windows → "
    "blocked form with MultiHeadAttention tiles"
)

# Attention lowering rules, first match wins: windows (causal ones to GroupQueryAttention's
# local_window_size), causal blocks to GroupQueryAttention, then the packed Attention / MultiHeadAttention.
CUDA_WINDOW_RULE = {"rule": "window", "mode": "fused", "min_sequence": 1024, "block": None,
                    "kernel": "com.microsoft.MultiHeadAttention"}

CUDA_FP16_LOWERING = (
    PassSpec("pack-projections"),
    PassSpec("lower-attention", {"rules": [CUDA_WINDOW_RULE, "group-query", "packed", "multi-head"]}),
    PassSpec("fuse-ort-operators"),
    PassSpec("infer-shapes"),  # element types of every value (contrib ops' from their schemas): convert-float16 needs them
    # What the CUDA table lacks, resolved now: CastLike → Cast/constant, neutral ops left (the final
    # RMSNorm) inlined into standard ops (then typed again).
    PassSpec("decompose-unsupported", {"table": "cuda", "inline_functions": True}),
)
FINALIZE = (PassSpec("dedup-initializers"), PassSpec("remove-dead"))

FP16_TOLERANCE = Tolerance(atol=2e-2, rtol=2e-2)

CUDA_FP16 = Target(
    name="cuda-fp16",
    description="onnxruntime CUDA EP, fp16 (fp32 IO): onnxruntime fused ops (Attention/MHA/GQA, SkipLayerNorm, "
    "BiasGelu), LayerNorm/Softmax kept fp32 where ranges demand",
    providers=(CUDA, CPU),
    precision="fp16",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=CUDA_FP16_LOWERING,
                  precision=(PassSpec("convert-float16"),), finalize=FINALIZE),
    tolerance=FP16_TOLERANCE,
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    min_cosine=0.999,
    op_table="cuda",
    attention=CUDA_ATTENTION,
)

CUDA_INT8 = Target(
    name="cuda-int8",
    description="onnxruntime CUDA EP: fp16 compute with 8-bit block-quantized MatMul weights (MatMulNBits), "
    "attention as MultiHeadAttention/GroupQueryAttention",
    providers=(CUDA, CPU),
    precision="int8-weights",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=(
        PassSpec("lower-attention", {"rules": [CUDA_WINDOW_RULE, "group-query", "multi-head"]}),
        PassSpec("fuse-ort-operators"),
        PassSpec("infer-shapes"),
        PassSpec("decompose-unsupported", {"table": "cuda", "inline_functions": True}),
    ), precision=(
        PassSpec("convert-float16"),
        PassSpec("quantize-weights-nbits", {"bits": 8, "block_size": 32}),
    ), finalize=FINALIZE),
    tolerance=Tolerance(atol=5e-2, rtol=5e-2),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    min_cosine=0.995,
    op_table="cuda",
    attention="MultiHeadAttention (Q/K/V projections stay MatMulNBits); causal and left-windowed → GroupQueryAttention",
)

# Decoders on CUDA at small batch are bound by weight reads: 4-bit blocks (MatMulNBits, blocks of 32
# along K with their own fp16 scale and zero point, dequantized inside the GEMM kernel) read a quarter
# of fp16's weight bytes. cuda-int8's graph otherwise; tolerances as cpu-int4's (the check after the
# quantizing pass is against the quantized graph; the precision report measures the change vs fp32).
CUDA_INT4 = dataclasses.replace(
    CUDA_INT8,
    name="cuda-int4",
    description="onnxruntime CUDA EP: fp16 compute with 4-bit block-quantized MatMul weights (MatMulNBits, "
    "blocks of 32), attention as MultiHeadAttention/GroupQueryAttention",
    precision="int4-weights",
    phases=CUDA_INT8.map_passes(
        lambda p: PassSpec(p.name, {**p.options, "bits": 4}) if p.name == "quantize-weights-nbits" else p).phases,
    tolerance=Tolerance(atol=0.25, rtol=0.05),
    min_cosine=None,
    attention="MultiHeadAttention (Q/K/V projections stay 4-bit MatMulNBits); causal and left-windowed → "
    "GroupQueryAttention",
)

# --- TensorRT ---------------------------------------------------------------------------------
STANDARD_LOWERING = (
    # Contrib ops an input model may carry (e.g. from onnxruntime's optimizer) → standard ONNX.
    PassSpec("decompose-unsupported", {"table": "tensorrt"}),
    # Only windows are lowered (to the blocked form in standard ops); other blocks keep the neutral op,
    # inlined next into MatMul/Softmax/MatMul.
    PassSpec("lower-attention", {"rules": [{"rule": "window", "mode": "blocked", "min_sequence": 1024, "block": None,
                                            "kernel": "standard"}]}),
    PassSpec("inline-neutral-ops"),
    PassSpec("cse"),
    PassSpec("remove-dead"),
)
STANDARD_ATTENTION = ("standard MatMul/Softmax/MatMul (the EP fuses it); windows → blocked form in standard ops "
                      "from 1024 tokens (an If on the sequence length when it is dynamic)")


def _trt(**options) -> Provider:
    return Provider("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_timing_cache_enable": True, **options},
                    install="pip install onnxruntime-gpu tensorrt (in place of onnxruntime; an NVIDIA GPU with CUDA 12 "
                            "and TensorRT 10)")


TENSORRT_INT8_SCHEME = Quantization(
    mode="static", activation_type="int8", weight_type="int8", activation_symmetric=True, weight_symmetric=True,
    per_channel=True, placement={"MatMul": (0, 1), "Gemm": (0, 1)},
    weight_axes={"MatMul": {1: 1}, "Gemm": {1: 0}}, calibrator="entropy",
    reason="TensorRT fuses Q/DQ on GEMM inputs only, symmetric int8, per-channel weights (explicit quantization)",
)

TENSORRT_FP16 = Target(
    name="tensorrt-fp16",
    description="onnxruntime TensorRT EP, fp16 builder flag: standard ONNX only (neutral ops inlined), "
    "TensorRT fuses attention and LayerNorm itself",
    providers=(_trt(trt_fp16_enable=True), CUDA, CPU),
    precision="fp16 (TensorRT builder)",
    # finalize: folding after the fusion phase's CSE can leave equal constants (TorchScript's rotate_half split
    # points, read back by gather-of-concat, one per Q and K): stored once.
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=STANDARD_LOWERING, finalize=FINALIZE),
    # The graph stays fp32 (TensorRT picks fp16 kernels when it builds the engine): verified in fp32.
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options={"graph_optimization_level": "ORT_ENABLE_BASIC"},
    op_table="tensorrt",
    attention=STANDARD_ATTENTION,
)

TENSORRT_INT8 = Target(
    name="tensorrt-int8",
    description="onnxruntime TensorRT EP, explicit int8: Q/DQ (symmetric int8, per-channel weights) on GEMM inputs, "
    "standard ONNX only",
    providers=(_trt(trt_fp16_enable=True, trt_int8_enable=True), CUDA, CPU),
    precision="int8",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=STANDARD_LOWERING,
                  precision=(PassSpec("quantize", TENSORRT_INT8_SCHEME.to_options()),), finalize=FINALIZE),
    tolerance=Tolerance(atol=0.25, rtol=0.05),
    session_options={"graph_optimization_level": "ORT_ENABLE_BASIC"},
    quantization=TENSORRT_INT8_SCHEME,
    min_cosine=0.99,
    op_table="tensorrt",
    attention=STANDARD_ATTENTION,
)

TARGETS = (CUDA_FP16, CUDA_INT8, CUDA_INT4, TENSORRT_FP16, TENSORRT_INT8)
