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
    PassSpec("dedup-initializers"),
    PassSpec("remove-dead"),
)

# Fusion: shapes first (rules read them), then the reshape normal form, then attention
# to the neutral tfgraph.Attention, lowered to the op the CPU EP runs best.
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
)

CPU_FP32 = Target(
    name="cpu-fp32",
    description="onnxruntime CPU EP, fp32: canonicalized graph, attention fused to MultiHeadAttention",
    providers=(Provider("CPUExecutionProvider"),),
    precision="fp32",
    passes=CLEANUP + FUSION + (PassSpec("lower-attention", {"to": "com.microsoft.MultiHeadAttention"}), PassSpec("remove-dead")),
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
)
