"""Pipeline stages: split a model into K stages of balanced compute, cut where little data crosses.

The graph's nodes are put in a topological order (networkx); the valid cuts are the gaps
between consecutive nodes, and what crosses a gap is its live set (tensors defined before it
and used after it). Initializers and Constant nodes are never cut: each stage gets a copy of
those it uses. Shape-only values (integer tensors of rank ≤ 1 computed from the graph inputs'
shapes and constants, like the sequence length or position ids) are recomputed inside each
stage that needs them instead of being passed along, so the cuts carry the hidden state and
the mask.

Each node has a cost: a roofline estimate (``max(FLOPs / peak, bytes / memory bandwidth)``
at the concrete shapes of one onnxruntime run) or, with ``cost="profile"``, its measured
kernel time from an onnxruntime profile. A dynamic program over candidate gaps with small
cuts (at most ``cut_slack`` × the smallest cut in the interior of the graph (the middle 60% of
its cost, away from the tiny cuts before the embeddings and after the last attention), which in a
Transformer are the layer boundaries and the points between attention and MLP) minimizes the
slowest stage, where a stage's time is its compute plus the transfer of its outgoing cut at
``link_bandwidth`` bytes/s; an optional ``max_stage_param_bytes`` caps each stage's weights.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from tfgraph.errors import BadInputError

STAGE_FILE = "stage{index}.onnx"

#: Ops that may be recomputed in every stage when they only compute shape-like integer values.
from tfgraph.compiler.stage_graph import (  # noqa: F401 - used by partition
    _INT_DTYPES,
    CHEAP_OPS,
    _as_ir,
    _concrete_values,
    _describe,
    _has_subgraph,
    _node_flops,
    _profile_costs,
    _uses,
    _value_info,
)


@dataclasses.dataclass
class Roofline:
    """The machine of the roofline model: peak compute (FLOP/s) and memory bandwidth (bytes/s)."""

    peak_flops: float = 100e9
    memory_bandwidth: float = 20e9

    def time(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak_flops, nbytes / self.memory_bandwidth)


@dataclasses.dataclass
class Stage:
    index: int
    model: onnx.ModelProto
    inputs: list[dict]
    outputs: list[dict]
    nodes: int
    recomputed_nodes: int
    cost_s: float
    transfer_s: float
    flops: float
    cut_bytes: int
    param_bytes: int
    device: str = "cpu"
    provider: str = "CPUExecutionProvider"

    @property
    def input_names(self) -> list[str]:
        return [v["name"] for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v["name"] for v in self.outputs]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": STAGE_FILE.format(index=self.index),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "nodes": self.nodes,
            "recomputed_nodes": self.recomputed_nodes,
            "cost_s": self.cost_s,
            "transfer_s": self.transfer_s,
            "flops": self.flops,
            "cut_bytes": self.cut_bytes,
            "param_bytes": self.param_bytes,
            "device": self.device,
            "provider": self.provider,
        }


@dataclasses.dataclass
class Pipeline:
    """K stage models and their description; ``save`` writes them, ``manifest`` describes them."""

    stages: list[Stage]
    inputs: list[dict]
    outputs: list[dict]
    info: dict[str, Any]
    #: (gap, op before it, cost fraction before it, cut bytes) for every gap, and the chosen gaps.
    profile: list = dataclasses.field(default_factory=list, repr=False)
    bounds: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def balance(self) -> float:
        """Slowest stage time (compute + transfer of its cut) over the mean."""
        times = [s.cost_s + s.transfer_s for s in self.stages]
        return max(times) / (sum(times) / len(times))

    @property
    def compute_balance(self) -> float:
        costs = [s.cost_s for s in self.stages]
        return max(costs) / (sum(costs) / len(costs))

    def manifest(self) -> dict[str, Any]:
        return {
            "num_stages": len(self.stages),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "balance": self.balance,
            "compute_balance": self.compute_balance,
            **self.info,
            "stages": [s.to_json() for s in self.stages],
        }

    def write(self, folder: pathlib.Path) -> list[str]:
        """Write the stage models into ``folder``; returns the file names."""
        from tfgraph.ir import save

        files = []
        for stage in self.stages:
            name = STAGE_FILE.format(index=stage.index)
            files += save(ir.serde.deserialize_model(stage.model), folder / name)
        return files


def partition(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    stages: int,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Any] | None = None,
    cost: str = "roofline",
    roofline: Roofline | None = None,
    link_bandwidth: float = 10e9,
    max_stage_param_bytes: int | None = None,
    cut_slack: float = 2.0,
    verify: bool = True,
    devices: Sequence[str] | None = None,
) -> Pipeline:
    """Split ``model`` (an artifact folder, an ``.onnx`` path or a model) into ``stages`` pipeline stages.

    Costs are taken at the shapes of ``feeds`` (or inputs generated at ``shapes``; default
    batch 2, sequence 128). With ``verify`` the chained stages are run and compared with the
    whole model; the result is in ``pipeline.info["verification"]``.
    """
    from tfgraph.compiler.verify import generate_inputs

    if not isinstance(stages, int) or stages < 1:
        raise BadInputError(f"--stages {stages}: expected a positive number of stages")
    if cost not in ("roofline", "profile"):
        raise BadInputError(f"cost '{cost}': expected roofline or profile")
    if link_bandwidth <= 0:
        raise BadInputError("link bandwidth must be positive")
    model = _as_ir(model)
    roofline = roofline or Roofline()
    graph = model.graph
    if feeds is None:
        feeds = generate_inputs(model, {"sequence": 128, **dict(shapes or {})})
    values = _concrete_values(model, feeds)

    nodes = list(graph)
    index = {n: i for i, n in enumerate(nodes)}
    graph_inputs = list(graph.inputs)
    initializers = set(graph.initializers.values())
    top_values = set(graph_inputs) | initializers | {v for n in nodes for v in n.outputs}
    uses = {n: _uses(n, top_values) for n in nodes}

    def arr(v: ir.Value) -> np.ndarray | None:
        if v.const_value is not None and v.name not in values:
            return None
        return values.get(v.name)

    def shape(v: ir.Value | None):
        if v is None:
            return None
        if v.const_value is not None:
            return list(v.const_value.shape)
        a = values.get(v.name)
        return list(a.shape) if a is not None else None

    def nbytes(v: ir.Value) -> int:
        if v.const_value is not None:
            return int(v.const_value.nbytes)
        a = values.get(v.name)
        return int(a.nbytes) if a is not None else 0

    # networkx: the dependency graph (subgraph outer-scope reads are uses of the If/Loop node).
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(nodes)))
    for n in nodes:
        for v in uses[n]:
            p = v.producer()
            if p is not None and p in index:
                dag.add_edge(index[p], index[n])
    topo = list(nx.lexicographical_topological_sort(dag))  # stable: the graph's own order where free

    # Shape-only values: recomputed in each stage instead of cut.
    recomputable: set[ir.Node] = set()
    for i in topo:
        n = nodes[i]
        if n.domain not in ("", "ai.onnx") or n.op_type not in CHEAP_OPS or _has_subgraph(n):
            continue
        if n.op_type != "Constant":
            ok = all(
                (v.dtype in _INT_DTYPES and shape(v) is not None and len(shape(v)) <= 1) for v in n.outputs
            )
            ok = ok and all(
                v in initializers or v.is_graph_input() or (v.producer() in recomputable) for v in uses[n]
            )
            if not ok:
                continue
        recomputable.add(n)
    order = [nodes[i] for i in topo if nodes[i] not in recomputable]
    if len(order) < stages:
        raise BadInputError(f"the model has {len(order)} compute nodes; cannot split it into {stages} stages")
    pos = {n: p for p, n in enumerate(order)}

    def closure(v: ir.Value, acc: set) -> None:
        """Recomputable producer nodes of ``v`` (transitively)."""
        p = v.producer()
        if p is None or p not in recomputable or p in acc:
            return
        acc.add(p)
        for u in uses[p]:
            closure(u, acc)

    def leaf_inputs(v: ir.Value) -> list[ir.Value]:
        acc: set = set()
        closure(v, acc)
        return [u for p in acc for u in uses[p] if u.is_graph_input()]

    # Node costs.
    if cost == "profile":
        measured = _profile_costs(model, feeds)
        missing = [n.name for n in order if n.name not in measured]
        node_cost = [measured.get(n.name, 0.0) for n in order]
        cost_info = {"model": "profile", "unmeasured_nodes": len(missing)}
    else:
        node_cost = []
        for n in order:
            flops = _node_flops(n, shape, shape)
            moved = sum(nbytes(v) for v in n.outputs if v is not None)
            for i, v in enumerate(n.inputs):
                if v is None or (n.op_type == "Gather" and i == 0):  # a lookup reads rows, not the table
                    continue
                moved += nbytes(v)
            node_cost.append(roofline.time(flops, moved))
        cost_info = {"model": "roofline", "peak_flops": roofline.peak_flops, "memory_bandwidth": roofline.memory_bandwidth}
    node_flops = [_node_flops(n, shape, shape) for n in order]
    prefix = np.concatenate([[0.0], np.cumsum(node_cost)])
    total = float(prefix[-1]) or 1.0

    # Live sets at each gap g (between order[g-1] and order[g]), in bytes.
    N = len(order)
    diff = np.zeros(N + 2)
    last_use: dict[ir.Value, int] = {}
    for p, n in enumerate(order):
        for v in uses[n]:
            if v in initializers:
                continue
            if v.producer() in recomputable:
                for leaf in leaf_inputs(v):
                    last_use[leaf] = max(last_use.get(leaf, -1), p)
            else:
                last_use[v] = max(last_use.get(v, -1), p)
    for v, u in last_use.items():
        d = -1 if v.is_graph_input() else pos[v.producer()]
        if u > d:
            diff[d + 1] += nbytes(v)
            diff[u + 1] -= nbytes(v)
    cut = np.cumsum(diff)[: N + 1]  # cut[g] for g in 0..N
    cut[0] = cut[N] = 0.0

    gaps = list(range(1, N))
    frac = [prefix[g] / total for g in gaps]
    interior = [cut[g] for g, f in zip(gaps, frac) if 0.2 <= f <= 0.8] or [cut[g] for g in gaps]
    reference = float(min(interior))
    candidates = [g for g in gaps if cut[g] <= cut_slack * reference]
    if len(candidates) < stages - 1:
        candidates = sorted(gaps, key=lambda g: (cut[g], g))[: max(stages - 1, len(candidates))]
        candidates.sort()

    # Parameter bytes of a stage (unique initializers of its nodes and their recomputed closures).
    node_params = []
    for n in order:
        acc: set = set()
        for v in uses[n]:
            if v in initializers:
                acc.add(v)
            elif v.producer() in recomputable:
                c: set = set()
                closure(v, c)
                acc |= {u for p in c for u in uses[p] if u in initializers}
        node_params.append(acc)

    def params(a: int, b: int) -> int:
        acc: set = set()
        for s in node_params[a:b]:
            acc |= s
        return sum(nbytes(v) for v in acc)

    # Dynamic program: best[k][j] = (slowest stage, total cut) over splits of order[:P[j]] into k stages.
    P = [0, *candidates, N]
    xfer = {g: (cut[g] / link_bandwidth if g < N else 0.0) for g in P}
    INF = (float("inf"), float("inf"))
    best = [[INF] * len(P) for _ in range(stages + 1)]
    back = [[-1] * len(P) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    param_cache: dict[tuple[int, int], int] = {}
    for k in range(1, stages + 1):
        for j in range(1, len(P)):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == INF:
                    continue
                if max_stage_param_bytes is not None:
                    key = (P[i], P[j])
                    if key not in param_cache:
                        param_cache[key] = params(P[i], P[j])
                    if param_cache[key] > max_stage_param_bytes:
                        continue
                t = prefix[P[j]] - prefix[P[i]] + xfer[P[j]]
                cand = (max(prev[0], t), prev[1] + (cut[P[j]] if P[j] < N else 0.0))
                if cand < best[k][j]:
                    best[k][j] = cand
                    back[k][j] = i
    if best[stages][len(P) - 1] == INF:
        raise BadInputError(
            f"no split into {stages} stages fits the per-stage parameter cap of {max_stage_param_bytes:,} bytes"
        )
    bounds = [N]
    j = len(P) - 1
    for k in range(stages, 0, -1):
        j = back[k][j]
        bounds.append(P[j])
    bounds = bounds[::-1]

    # Build each stage.
    proto = ir.serde.serialize_model(model)
    proto_nodes = list(proto.graph.node)
    proto_inits = {t.name: t for t in proto.graph.initializer}
    graph_output_names = [v.name for v in graph.outputs]
    io_info = {vi.name: vi for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]}
    later_needs: list[set[str]] = [set() for _ in range(stages + 1)]  # names needed by stages >= s
    stage_members = []
    for s in range(stages):
        core = order[bounds[s]:bounds[s + 1]]
        core_set = set(core)
        extra: set = set()
        needed: list[ir.Value] = []
        for n in core:
            for v in uses[n]:
                if v.producer() in recomputable:
                    closure(v, extra)
                needed.append(v)
        members = core_set | extra
        for n in extra:
            needed += uses[n]
        # Graph outputs that are recomputable values are produced by the last stage.
        if s == stages - 1:
            for v in graph.outputs:
                if v.producer() in recomputable:
                    closure(v, extra)
                    members |= extra
                    for n in extra:
                        needed += uses[n]
        stage_inputs = []
        seen = set()
        for v in needed:
            if v in seen or v in initializers or v.producer() in members:
                continue
            seen.add(v)
            stage_inputs.append(v)
        stage_members.append((core, members, stage_inputs))
    for s in range(stages - 1, -1, -1):
        later_needs[s] = later_needs[s + 1] | {v.name for v in stage_members[s][2]}

    built: list[Stage] = []
    for s, (core, members, stage_inputs) in enumerate(stage_members):
        produced = [v for n in core for v in n.outputs if v.name]
        outs = [v for v in produced if v.name in later_needs[s + 1] or v.name in graph_output_names]
        if s == stages - 1:
            outs += [v for v in graph.outputs if v.producer() in members and v not in outs and v.producer() not in core]
        g = onnx.GraphProto(name=f"{graph.name or 'graph'}_stage{s}")
        member_idx = sorted(index[n] for n in members)
        g.node.extend(proto_nodes[i] for i in member_idx)
        init_names: list[str] = []
        for i in member_idx:
            for v in uses[nodes[i]]:
                if v in initializers and v.name not in init_names:
                    init_names.append(v.name)
        g.initializer.extend(proto_inits[name] for name in init_names if name in proto_inits)
        g.input.extend(_value_info(v, arr(v), io_info) for v in stage_inputs)
        g.output.extend(_value_info(v, arr(v), io_info) for v in outs)
        stage_model = onnx.helper.make_model(g, opset_imports=list(proto.opset_import), producer_name="tfgraph")
        stage_model.ir_version = proto.ir_version
        stage_model.functions.extend(proto.functions)
        a, b = bounds[s], bounds[s + 1]
        built.append(Stage(
            index=s,
            model=stage_model,
            inputs=[_describe(v, arr(v)) for v in stage_inputs],
            outputs=[_describe(v, arr(v)) for v in outs],
            nodes=len(core),
            recomputed_nodes=len(members) - len(core),
            cost_s=float(prefix[b] - prefix[a]),
            transfer_s=float(xfer[b]) if b < N else 0.0,
            flops=float(sum(node_flops[a:b])),
            cut_bytes=int(cut[b]) if b < N else 0,
            param_bytes=params(a, b),
            device=(devices[s] if devices else "cpu"),
        ))

    info = {
        "cost": cost_info,
        "shapes": {k: list(np.asarray(v).shape) for k, v in feeds.items()},
        "link_bandwidth": link_bandwidth,
        "max_stage_param_bytes": max_stage_param_bytes,
        "cut_slack": cut_slack,
        "reference_cut_bytes": reference,
        "candidate_gaps": len(candidates),
        "compute_nodes": N,
        "recomputed_value_nodes": len(recomputable),
        "total_cost_s": float(prefix[-1]),
    }
    pipeline = Pipeline(built, [_describe(v, arr(v)) for v in graph_inputs], [_describe(v, arr(v)) for v in graph.outputs], info)
    if verify:
        from tfgraph.compiler.stage_io import verify_pipeline

        pipeline.info["verification"] = verify_pipeline(pipeline, model, feeds)
    pipeline.profile = [(g, order[g - 1].op_type, float(prefix[g] / total), int(cut[g])) for g in gaps]
    pipeline.bounds = bounds
    return pipeline


_IO = ("chain", "verify_pipeline", "write_pipeline_artifact", "partition_artifact")


def __getattr__(name: str):  # the pipeline I/O lives in tfgraph.compiler.stage_io; importable from here too
    if name in _IO:
        from tfgraph.compiler import stage_io

        return getattr(stage_io, name)
    raise AttributeError(name)
