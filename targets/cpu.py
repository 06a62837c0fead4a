"""CPU targets (onnxruntime's CPU execution provider)."""

from __future__ import annotations

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.profile import Provider, Target, Tolerance

# Canonicalizing cleanup, in order: inline Constant weights as initializers, fold
# bounded constant subgraphs (this also collapses shape chains), merge repeats, drop
# Identity nodes and whatever became dead. A second fold after CSE catches chains that
# only became constant once their duplicates were merged.
CLEANUP = (
    PassSpec("lift-constants"),
    PassSpec("fold-constants"),
    PassSpec("cse"),
    PassSpec("fold-constants"),
    PassSpec("eliminate-identity"),
    PassSpec("remove-dead"),
)

CPU_FP32 = Target(
    name="cpu-fp32",
    description="onnxruntime CPU EP, fp32, canonicalized graph (cleanup passes only)",
    providers=(Provider("CPUExecutionProvider"),),
    precision="fp32",
    passes=CLEANUP,
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
)
