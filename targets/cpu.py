"""CPU targets (onnxruntime's CPU execution provider)."""

from __future__ import annotations

import dataclasses

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.profile import Phase, Provider, Quantization, Target, Tolerance, phases

# Canonicalizing cleanup, in order: make Constant weights initializers, drop Identity
# nodes (before folding, so `Identity(weight)` is rewired rather than folded into a
# copy), fold bounded constant subgraphs (this also collapses shape chains), merge
# repeats, fold again what only became constant once duplicates were merged, store
# byte-identical weights once, and remove whatever became dead.
CLEANUP = (
    PassSpec("lift-constants"),
    PassSpec("eliminate-identity"),
    PassSpec("fold-constants"),
    PassSpec("cse"),
    PassSpec("fold-constants"),
    PassSpec("shrink-pruned"),
    PassSpec("dedup-initializers"),
    PassSpec("remove-dead"),
)

# Fusion: shapes first (rules read them), then the reshape normal form, then attention
# to the neutral tfgraph.Attention (its mask classified: causal / windowed / bias),
# decomposed LayerNorm/RMSNorm to single ops; then lowered to the op the CPU EP runs best.
FUSION = (
    PassSpec("infer-shapes"),
    PassSpec("shape-from-inputs"),
    PassSpec("simplify-ops"),
    PassSpec("simplify-reshapes"),
    PassSpec("eliminate-identity"),
    PassSpec("cse"),
    PassSpec("fold-constants"),
    PassSpec("remove-dead"),
    PassSpec("fuse-attention"),
    PassSpec("classify-attention-masks"),
    PassSpec("fuse-normalization"),
    PassSpec("shrink-pruned"),
)

# Lowering, chosen by measured latency (benchmarks/ablation.py, 2 threads, 20 interleaved
# rounds, all-MiniLM-L6-v2): packed com.microsoft.Attention (Q/K/V projections inside the
# op, one GEMM) ran 0.82x MultiHeadAttention at b1 s512, 0.93x at b8 s128 and 1.02x
# (noise) at b1 s128. Blocks whose projections are not plain MatMul(+bias) of one tensor
# (rotary embeddings, grouped KV, Conv1D Gemm) fall back to MultiHeadAttention.
# Packing a shared layer's weights (ALBERT) builds the same packed tensor per use: the
# dedup that follows stores it once.
# Banded (sliding-window) attention: the blocked form, its tiles run as one
# MultiHeadAttention batch, from WINDOW_CROSSOVER tokens on (an If on the sequence
# length when it is dynamic); GroupQueryAttention's local_window_size below, which does
# the full causal work on CPU (benchmarks/bench_window.py).
WINDOW_CROSSOVER = 1024

# Attention lowering rules, first match wins (passes/attention_lowering.py): windows, then the
# packed Attention, then MultiHeadAttention for any block left. A decoder's KV-cached layers go first
# to GroupQueryAttention (lower-cached-attention: the kernel appends to the cache, keeps grouped KV
# heads, takes its lengths and padding from the attention mask, so the cache can be one shared buffer).
# Small Llama (hidden 512, 4 layers, 8/2 heads), fp32 decode b1/b4 against onnxruntime-genai's builder,
# interleaved (benchmarks/bench_decoder.py, 20 rounds): MultiHeadAttention 1.18x / 1.24x, GroupQueryAttention
# with shared cache buffers 1.01x / 0.98x. Only under --task text-generation (see tfgraph.ir.TASK_KEY).
CPU_WINDOW_RULE = {"rule": "window", "mode": "auto", "min_sequence": WINDOW_CROSSOVER, "block": None,
                   "kernel": "com.microsoft.MultiHeadAttention"}

CPU_LOWERING = (
    PassSpec("pack-projections"),
    PassSpec("lower-cached-attention"),
    PassSpec("compact-padding"),  # GroupQueryAttention rotates and masks itself: padding moved behind the tokens
    PassSpec(
        "lower-attention",
        {"rules": [CPU_WINDOW_RULE, "packed", "multi-head"]},
    ),
    PassSpec("dedup-initializers"),
    PassSpec("remove-dead"),
)

CPU_ATTENTION = (
    "KV-cached decoder layers: GroupQueryAttention (rotary and padding inside the kernel where compact-padding "
    "applies, else + RotaryEmbedding and a padding bias); others packed com.microsoft.Attention "
    "(else MultiHeadAttention); windows: the blocked form with MultiHeadAttention "
    f"tiles from {WINDOW_CROSSOVER} tokens, GroupQueryAttention/MultiHeadAttention below (an If when the length is dynamic)"
)

CPU_FP32 = Target(
    name="cpu-fp32",
    description="onnxruntime CPU EP, fp32: canonicalized graph, attention fused (packed Attention, else MultiHeadAttention)",
    providers=(Provider("CPUExecutionProvider"),),
    precision="fp32",
    # Semantic dedup last (fp32 only: a tied LM head read through FusedMatMul transB would stay
    # fp32 under cpu-int8's MatMul quantization, so that target keeps the transposed copy to quantize).
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=CPU_LOWERING,
                  finalize=(PassSpec("dedup-derived"), PassSpec("remove-dead"))),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    attention=CPU_ATTENTION,
)

# --- int8 -------------------------------------------------------------------------------------
# Measured on a 2-core AMD EPYC (AVX2, no VNNI/AMX), onnxruntime 1.32, all-MiniLM-L6-v2 real weights
# compiled by cpu-fp32, 64 real sentences for the sentence-embedding cosine; medians of 5-10
# interleaved rounds on a shared, heavily loaded machine (±15%), b1 s128 (b8 s128 in brackets):
#   fp32 329 ms (1874); onnxruntime quantize_dynamic defaults 205 ms (1408) at cosine 0.940 (it
#   turns the packed Attention into QAttention with per-tensor weights); MatMul-only per-channel
#   265 ms (1628) at 0.994; static QDQ per-channel 0.85 (MiniLM, 16 calibration sentences).
#   tfgraph dynamic MatMul + int8 embeddings, Attention left fp32: 253 ms (1566) at 0.9945;
#   + the Attention's packed weight stored int8 behind a DequantizeLinear: 339 ms (slower than
#   fp32 there: the weight is no longer a constant onnxruntime can prepack);
#   + the Attention's Q/K/V projection moved out into one DynamicQuantizeMatMul + Split +
#   MultiHeadAttention (which, unlike QAttention, takes the attention bias): 210 ms (1464) at 0.993.
#   Weight types: u8 weights (u8u8 kernel) ~9% slower, no more accurate; 7-bit weights
#   (reduce_range, against u8 x s8 int16 saturation without VNNI) 0.9936 vs 0.9942: not used.
# So cpu-int8 is *dynamic* (activations quantized per tensor by the kernels at run time), weights int8
# symmetric per output column, embedding tables int8 per row (rows gathered, then scaled). Quantization
# runs after lowering so the Q/K/V packing is found by the fp32 pipeline.
# Issue 20 (2-core AMD EPYC Zen 4, AVX-512 + VNNI, onnxruntime 1.32, interleaved, paired per-round ratios;
# benchmarks/results/precision_cpu.md): the Split + MultiHeadAttention form above cost more than the
# int8 GEMM it fed (profile, b8 s128: QKV DynamicQuantizeMatMul + Split + MHA 141 ms vs QAttention 93).
# onnxruntime's QAttention *does* honour per-column weight scales (re-measured: equal to the dequantized
# computation to 4e-5, no slower than per-tensor); what it lacks is an attention-bias input, so the
# packed Attention becomes DynamicQuantizeLinear + QAttention where the mask is exactly a key-padding
# input (probed; it goes in as the 2-D mask_index), else the old form (attention_kernel option).
# Accuracy: a few activation channels are outliers (MiniLM layer-0 GELU channel 856 reaches 25, median
# channel 0.75); quantize-outlier-channels takes them out of the per-tensor range (scaled into the
# weights, or a float rank-|O| path around the GELU FFN): held-out sentence cosine 0.9948 -> 0.9981 with
# no node reverted to float (the old recipe reverted layer 0's FFN2 to an fp32 MatMul, 4x slower).
CPU_INT8_SCHEME = Quantization(
    mode="dynamic",
    activation_type="uint8",
    weight_type="int8",
    activation_symmetric=False,
    weight_symmetric=True,
    per_channel=True,
    placement={"MatMul": (0, 1), "com.microsoft.Attention": (0, 1), "Gather": (0,)},
    weight_axes={"MatMul": {1: 1}, "com.microsoft.Attention": {1: 1}, "Gather": {0: 0}},
    reason="measured fastest accurate recipe on onnxruntime CPU (see targets/cpu.py)",
    # Reverted nodes compute in float32 from float16-stored weights (the artifact stays small).
    revert_weights_float16=True,
)

CPU_INT8 = Target(
    name="cpu-int8",
    description="onnxruntime CPU EP, int8: cpu-fp32's graph, MatMul and packed Q/K/V weights int8 per channel "
    "with dynamic activation quantization (DynamicQuantizeMatMul, QAttention), outlier channels kept out of "
    "the int8 range, int8 embeddings",
    providers=(Provider("CPUExecutionProvider"),),
    precision="int8",
    phases=phases(
        normalize=CLEANUP, fuse=FUSION, lower=CPU_LOWERING,
        precision=(PassSpec("quantize", {**CPU_INT8_SCHEME.to_options(), "attention_kernel": "qattention"}),
                   PassSpec("quantize-outlier-channels", {"ratio": 6.0, "max_channels": 4})),
        # the per-column zero points (all 0) of same-width weights; then the attention kernels' mask work
        # skipped for batches without padding (MiniLM b8 s128: 4% of the run; passes/unpadded_attention.py)
        finalize=(PassSpec("fuse-quantized-gather"), PassSpec("dedup-initializers"),
                  PassSpec("specialize-unpadded-attention"), PassSpec("remove-dead")),
    ),
    # Element-wise checks after quantization (each pass, and the final ORT_ENABLE_ALL session) are
    # against the quantized graph run unoptimized: they catch broken graphs, not int8 error. Run-time
    # activation quantization makes them loose: a fusion that changes float rounding flips quantization
    # levels, measured up to 0.1 on MiniLM hidden states (|x| up to ~10). The change against fp32 is
    # the accuracy report's business (min_cosine, max-drop).
    tolerance=Tolerance(atol=0.25, rtol=0.05),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=CPU_INT8_SCHEME,
    min_cosine=0.995,
    attention=CPU_ATTENTION + "; int8: QAttention (per-column weights, key-padding mask as mask_index), other "
    "masks: the packed Q/K/V projection moved out into one DynamicQuantizeMatMul + MultiHeadAttention",
)

# --- int4 weight-only ----------------------------------------------------------------------------
# Decoders at small batch read every weight once per token: 4-bit weights (com.microsoft.MatMulNBits,
# blocks of 32 along K with their own scale and zero point, dequantized inside the GEMM; accuracy
# level 4 computes with int8-quantized activations) cut the bytes read ~6x. Attention lowers to
# MultiHeadAttention (not the packed Attention, whose Q/K/V weight MatMulNBits cannot hold), so the
# projections stay MatMuls to quantize. Embedding tables int8 per row (cpu-int8's recipe).
# A decoder's KV-cached layers lower first to GroupQueryAttention (lower-cached-attention: the kernel
# appends to the cache and reads grouped heads in place; RoPE as com.microsoft.RotaryEmbedding): small
# Llama (hidden 512, 4 layers), one decode step at past 32, 1 thread: 1.82 ms with MultiHeadAttention
# (258 nodes), 1.56 ms (159 nodes), onnxruntime-genai's builder model 1.52 ms.
INT4_EMBEDDINGS = dataclasses.replace(  # cpu-int8's scheme, on the embedding tables only
    CPU_INT8_SCHEME,
    placement={"Gather": (0,)},
    weight_axes={"Gather": {0: 0}},
    reason="embedding tables int8 per row; MatMul weights 4-bit block-wise (MatMulNBits)",
    revert_weights_float16=False,
)
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4


def int4_phases(weights: PassSpec) -> tuple[Phase, ...]:
    """cpu-int4's phases with ``weights`` as the 4-bit weight pass (round-to-nearest, GPTQ, their options)."""
    return phases(
        normalize=CLEANUP,
        fuse=FUSION,
        lower=(
            PassSpec("pack-projections"),  # Q/K/V and gate/up as one MatMul each: fewer, larger 4-bit GEMMs
            PassSpec("lower-cached-attention"),  # a decoder's KV-cached layers: GroupQueryAttention
            PassSpec("compact-padding"),  # ... rotating and masking itself: padding moved behind the tokens
            PassSpec("lower-attention", {"rules": [CPU_WINDOW_RULE, "multi-head"]}),
            PassSpec("fuse-ort-operators"),  # residual Add + RMSNorm -> SkipSimplifiedLayerNormalization
            PassSpec("remove-dead"),
        ),
        precision=(weights, PassSpec("quantize", INT4_EMBEDDINGS.to_options())),
        # the int8 embedding lookup (four kernels) as one GatherBlockQuantized
        finalize=(PassSpec("fuse-quantized-gather"), PassSpec("dedup-initializers"), PassSpec("remove-dead")),
    )


INT4_TOLERANCE = Tolerance(atol=0.5, rtol=0.05)  # see CPU_INT4
# The LM head (the logits MatMul, tied or not) 8-bit: every token's distribution goes through it. SmolLM2-135M
# (real weights, benchmarks/bench_gptq_decoder.py, held-out top-1 agreement with fp32, RTN block 128): head
# float 0.66, head 4-bit 0.48 (perplexity 228 -> 312); 8 bits cost a quarter of the head's float bytes.
# The 8-bit head in blocks of 128, not 32: onnxruntime 1.32's CPU MatMulNBits (accuracy level 4) runs 8-bit
# blocks of 32 far slower (32000x1024 head: 821 vs 327 us, 10th percentiles of 80 interleaved rounds; decode
# step of the small Llama 1.26x -> 1.06x the builder's, of the 155 M one 0.99x -> 0.94x, one interleaved run),
# and 256 levels per block keep the error small at any block (max abs 3e-4 re-quantizing the small head).
INT4_OPTIONS = {"bits": 4, "head_bits": 8, "block_size": INT4_BLOCK, "block_size_8bit": 128,
                "accuracy_level": INT4_ACCURACY_LEVEL, "min_elements": 1024}

CPU_INT4 = Target(
    name="cpu-int4",
    description="onnxruntime CPU EP, int4 weight-only: MatMul weights 4-bit in blocks of 32 (MatMulNBits, "
    "round-to-nearest), int8 embeddings, float activations",
    providers=(Provider("CPUExecutionProvider"),),
    precision="int4",
    phases=int4_phases(PassSpec("quantize-weights-nbits", INT4_OPTIONS)),
    # Checks after quantization are against the quantized graph (run unoptimized); the change against
    # fp32 is the precision report's business. The final check runs another kernel path: verification
    # sessions share their weights and do not prepack, so MatMulNBits computes in float there, while the
    # deployed session prepacks and computes with int8-quantized activations (accuracy level 4). The two
    # differ by 0.07 on the logits of a random 155 M Llama, by 4.76 on those of SmolLM2-135M (real
    # weights, logits RMS 16; atol is scaled by the output's RMS, see tfgraph.compiler.verify.compare).
    tolerance=INT4_TOLERANCE,
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=INT4_EMBEDDINGS,
    attention="KV-cached decoder layers: GroupQueryAttention (+ RotaryEmbedding); others MultiHeadAttention "
    "(projections stay MatMuls, 4-bit)",
)

CPU_INT4_GPTQ = Target(
    name="cpu-int4-gptq",
    description="cpu-int4 with the 4-bit levels chosen by GPTQ on the calibration set (--calibration)",
    providers=(Provider("CPUExecutionProvider"),),
    precision="int4",
    phases=int4_phases(PassSpec("gptq", {k: v for k, v in INT4_OPTIONS.items()})),
    tolerance=INT4_TOLERANCE,
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    quantization=INT4_EMBEDDINGS,
    attention="KV-cached decoder layers: GroupQueryAttention (+ RotaryEmbedding); others MultiHeadAttention "
    "(projections stay MatMuls, 4-bit)",
)

# The static Q/DQ schemes of other runtimes live with their targets: targets/cuda.py (TensorRT),
# targets/openvino.py, targets/npu.py.
TARGETS = (CPU_FP32, CPU_INT8, CPU_INT4, CPU_INT4_GPTQ)
