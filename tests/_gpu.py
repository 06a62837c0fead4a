"""Helpers of the GPU-target tests (tests/test_gpu_lowering.py, tests/test_gpu_targets.py)."""

from __future__ import annotations

import tfgraph


def table_fallbacks(artifact) -> list[str]:
    """Nodes the target's operator table says fall back to the CPU, beyond its documented ones. Here that is
    the manifest's placement; on a host where the EP runs, placement comes from a real session (where the CUDA
    EP keeps int64 shape arithmetic on the CPU on purpose), so the graph is judged by the table directly."""
    from tfgraph.deploy.runtime import op_name

    place = artifact.manifest["placement"]
    nodes = place["fallback"]
    if not place["source"].startswith("op table"):
        from tfgraph.targets.op_table import load_table

        table = load_table(tfgraph.get_target(artifact.manifest["target"]).op_table)
        nodes = [{"op_type": u.op_type, "domain": u.domain, "reason": u.reason} for u in table.coverage(artifact.model)]
    allowed = place["allowed_fallbacks"]
    return [f"{n['op_type']}: {n.get('reason', '')}" for n in nodes if op_name(n) not in allowed and n["op_type"] not in allowed]


def kept_for_unknown_type(manifest) -> list:
    return [k for p in (manifest.get("precision") or {}).get("passes", []) for k in p.get("kept_float32", [])
            if "unknown" in k["reason"]]
