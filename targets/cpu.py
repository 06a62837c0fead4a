"""CPU targets (onnxruntime's CPU execution provider)."""

from __future__ import annotations

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.profile import Provider, Target, Tolerance

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

CPU_LOWERING = (
    PassSpec("pack-projections"),
    PassSpec(
        "lower-attention",
        {
            "to": "com.microsoft.Attention",
            "window_to": "auto",
            "window_kernel": "com.microsoft.MultiHeadAttention",
            "blocked_min_sequence": WINDOW_CROSSOVER,
        },
    ),
    PassSpec("dedup-initializers"),
    PassSpec("dedup-derived"),
    PassSpec("remove-dead"),
)

CPU_FP32 = Target(
    name="cpu-fp32",
    description="onnxruntime CPU EP, fp32: canonicalized graph, attention fused (packed Attention, else MultiHeadAttention)",
    providers=(Provider("CPUExecutionProvider"),),
    precision="fp32",
    passes=CLEANUP + FUSION + CPU_LOWERING,
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
)
