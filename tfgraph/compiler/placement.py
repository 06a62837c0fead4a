"""Where a compiled model's nodes run under a target: from a real onnxruntime session where the
target's accelerator EPs run here, from the EP's standalone runtime, else from the target's
operator table. Compile-time (it reads the targets' tables); the report is a
:class:`tfgraph.deploy.runtime.Placement`."""

from __future__ import annotations

import collections

import onnx_ir as ir

from tfgraph.deploy.runtime import CPU, Placement, _count_nodes, session, standalone_runtime, usable


def placement(model: ir.Model, profile) -> Placement:
    """The placement report of ``model`` under ``profile``: from a real session when the profile's
    accelerator EPs run here, else from the profile's operator table."""
    accelerators = [p for p in profile.providers if p.name != CPU]
    names = [p.name for p in profile.providers]
    allowed = list(profile.allowed_fallbacks)
    if not accelerators:  # a CPU target: everything runs where it should, if it loads at all
        return Placement("onnxruntime session", names, {CPU: _count_nodes(model)}, [], allowed)
    ok, missing = usable(accelerators)
    if not missing:
        return _session_placement(model, profile, names, allowed)
    standalone = standalone_runtime(profile)
    if standalone is not None:
        report = standalone.placement(model, profile)
        report.note = "; ".join(x for x in (report.note, *(f"{k}: {v}" for k, v in missing.items())) if x)
        return report
    from tfgraph.targets.op_table import load_table, runtime_table

    table = load_table(profile.op_table) if profile.op_table else runtime_table(accelerators[0].name)
    unsupported = table.coverage(model)
    total = _count_nodes(model)
    fallback = [{"name": u.node_name, "op_type": u.op_type, "domain": u.domain, "reason": u.reason} for u in unsupported]
    return Placement(
        f"op table {table.name} ({table.version})", names,
        {accelerators[0].name: total - len(fallback), **({CPU: len(fallback)} if fallback else {})},
        fallback, allowed, note="; ".join(f"{k}: {v}" for k, v in missing.items()),
    )


def _session_placement(model: ir.Model, profile, names: list[str], allowed: list[str]) -> Placement:
    sess = session(model, profile.providers, options=profile.session_options,
                   config={"session.record_ep_graph_assignment_info": "1"})
    nodes: collections.Counter = collections.Counter()
    fallback = []
    for subgraph in sess.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            nodes[subgraph.ep_name] += 1
            if subgraph.ep_name == CPU:
                fallback.append({"name": node.name, "op_type": node.op_type, "domain": node.domain})
    return Placement("onnxruntime session", names, dict(nodes), fallback, allowed,
                     note="nodes as onnxruntime runs them, after its own graph optimizations")
