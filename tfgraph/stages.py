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
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from tfgraph.errors import BadInputError

STAGE_FILE = "stage{index}.onnx"

#: Ops that may be recomputed in every stage when they only compute shape-like integer values.
CHEAP_OPS = frozenset({
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Constant",
    "ConstantOfShape", "Range", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
    "And", "Or", "Where", "Add", "Sub", "Mul", "Div", "Max", "Min", "Reshape", "Identity", "Expand",
    "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Neg", "Abs", "Mod", "Sqrt", "Ceil", "Floor",
})
_INT_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8})
_ELEMENTWISE_FLOPS = {"LayerNormalization": 8, "SkipLayerNormalization": 9, "Softmax": 5, "Gelu": 8, "FastGelu": 8,
                      "BiasGelu": 9, "Erf": 8, "Tanh": 6, "Pow": 2, "Sqrt": 2, "Div": 1}


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


# ---------------------------------------------------------------------------------------------
# graph analysis


def _subgraph_uses(node: ir.Node, top_values: set) -> list[ir.Value]:
    """Values of the top graph that a node's subgraphs (If/Loop/Scan bodies) read from outer scope."""
    found = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            for inner in g:
                for v in inner.inputs:
                    if v is not None and v in top_values:
                        found.append(v)
                found += _subgraph_uses(inner, top_values)
    return found


def _uses(node: ir.Node, top_values: set) -> list[ir.Value]:
    seen, out = set(), []
    for v in [*node.inputs, *_subgraph_uses(node, top_values)]:
        if v is not None and v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _concrete_values(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every top-level value of one onnxruntime run (graph optimizations off)."""
    from tfgraph.verify import run

    graph = model.graph
    existing = {v.name for v in graph.outputs}
    added = []
    for node in graph:
        for v in node.outputs:
            if v.name and v.name not in existing:
                added.append(v)
                existing.add(v.name)
    graph.outputs.extend(added)
    try:
        values = run(model, feeds)
    finally:
        for _ in added:
            graph.outputs.pop()
    values.update(feeds)
    return values


def _node_flops(node: ir.Node, shape, dims_out) -> float:
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    out_n = float(np.prod(dims_out(out))) if out is not None and dims_out(out) is not None else 0.0
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "MatMulNBits"):
        a = shape(node.inputs[0])
        return 2.0 * out_n * (a[-1] if a else 1)
    if op == "Gemm":
        a = shape(node.inputs[0])
        k = a[0] if node.attributes.get_int("transA", 0) else a[-1]
        return 2.0 * out_n * k
    if op == "Attention":  # com.microsoft: fused QKV projection + attention
        x = shape(node.inputs[0])
        w = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if node.domain == "com.microsoft" and x and w and len(x) == 3:
            b, s, d = x
            return 2.0 * b * s * d * w[-1] + 4.0 * b * s * s * (w[-1] / 3)
        q = shape(node.inputs[0])
        k = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else q
        if q and k:
            skv = k[-2] if len(k) == 4 else k[1]
            return 4.0 * out_n * skv
    if op in ("MultiHeadAttention", "GroupQueryAttention", "SparseAttention"):
        k = shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        skv = (k[-2] if len(k) == 4 else k[1]) if k else (shape(node.inputs[0]) or [0, 0])[1]
        return 4.0 * out_n * skv
    return out_n * _ELEMENTWISE_FLOPS.get(op, 1)


def _profile_costs(model: ir.Model, feeds: Mapping[str, np.ndarray], runs: int = 10) -> dict[str, float]:
    """Kernel time (s) per node name from an onnxruntime profile (graph optimizations off, so names match)."""
    import onnxruntime as ort

    from tfgraph.verify import SerializedModel, session_options

    with tempfile.TemporaryDirectory(prefix="tfgraph-profile-") as tmp:
        so = session_options({"graph_optimization_level": "ORT_DISABLE_ALL"})
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        with SerializedModel(model) as serialized:
            session = ort.InferenceSession(serialized.source, so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, dict(feeds))
        path = session.end_profiling()
        events = json.loads(pathlib.Path(path).read_text())
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] * 1e-6)
    # Drop the first (warm-up) run: take the median over the runs.
    return {name: float(np.median(ts[1:] if len(ts) > 1 else ts)) for name, ts in totals.items()}


def _dtype_name(v: ir.Value, arr: np.ndarray | None) -> str:
    if v.dtype is not None:
        return v.dtype.name.lower()
    return str(arr.dtype) if arr is not None else "unknown"


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
    from tfgraph.verify import generate_inputs

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
        pipeline.info["verification"] = verify_pipeline(pipeline, model, feeds)
    pipeline.profile = [(g, order[g - 1].op_type, float(prefix[g] / total), int(cut[g])) for g in gaps]
    pipeline.bounds = bounds
    return pipeline


def _describe(v: ir.Value, a: np.ndarray | None) -> dict:
    if v.shape is not None:
        dims = [d if isinstance(d, int) else (d.value or None) for d in v.shape]
    elif a is not None:
        dims = [None] * a.ndim
    else:
        dims = None
    return {"name": v.name, "dtype": _dtype_name(v, a), "shape": dims}


def _value_info(v: ir.Value, a: np.ndarray | None, known: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    if (v.is_graph_input() or v.is_graph_output()) and v.name in known and known[v.name].type.HasField("tensor_type"):
        info = onnx.ValueInfoProto()
        info.CopyFrom(known[v.name])
        return info
    if v.dtype is not None:
        elem = v.dtype.value
    elif a is not None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
    else:
        raise BadInputError(f"value '{v.name}' crosses a stage boundary but has no known type")
    rank = a.ndim if a is not None else (len(v.shape) if v.shape is not None else None)
    # Rank only: dims stay dynamic so stages take any batch/sequence (micro-batches).
    return onnx.helper.make_tensor_value_info(v.name, elem, [None] * rank if rank is not None else None)


def _as_ir(model) -> ir.Model:
    from tfgraph import ir as tir

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    path = pathlib.Path(model)
    if path.is_dir():
        from tfgraph.artifact import MODEL_FILE, read_manifest

        read_manifest(path)
        path = path / MODEL_FILE
    if not path.is_file():
        raise BadInputError(f"{model}: no such model file or artifact folder")
    return tir.load(path).model


def chain(sessions: Sequence[Any], stage_inputs: Sequence[Sequence[str]], stage_outputs: Sequence[Sequence[str]],
          feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run stages one after the other on ``feeds`` (the reference for the executors)."""
    env = dict(feeds)
    for session, ins, outs in zip(sessions, stage_inputs, stage_outputs):
        env.update(zip(outs, session.run(list(outs), {k: env[k] for k in ins})))
    return {k: env[k] for k in output_names}


def verify_pipeline(pipeline: Pipeline, model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from tfgraph.verify import make_session, run

    reference = run(model, feeds, options=None)
    sessions = [make_session(s.model.SerializeToString()) for s in pipeline.stages]
    names = [o["name"] for o in pipeline.outputs]
    got = chain(sessions, [s.input_names for s in pipeline.stages], [s.output_names for s in pipeline.stages], feeds, names)
    result = {}
    for name in names:
        ref, out = reference[name], got[name]
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        err = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))) if ref.size else 0.0
        result[name] = {"max_abs": err, "max_rel": err / scale if scale else err}
    return {"outputs": result, "max_rel": max((r["max_rel"] for r in result.values()), default=0.0)}


def write_pipeline_artifact(artifact, pipeline: Pipeline, output: os.PathLike | str, *, force: bool = False) -> pathlib.Path:
    """Write a compiled artifact (the whole model) plus its stage models, atomically."""
    from tfgraph.artifact import MANIFEST_FILE, MODEL_FILE, atomic_write_dir
    from tfgraph.ir import save

    path = pathlib.Path(output)

    def write(tmp: pathlib.Path) -> None:
        files = save(artifact.model, tmp / MODEL_FILE)
        files += pipeline.write(tmp)
        for name, data in sorted(getattr(artifact, "files", {}).items()):  # tokenizer, config
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
            files.append(name)
        artifact.manifest["files"] = files
        artifact.manifest["pipeline"] = pipeline.manifest()
        (tmp / MANIFEST_FILE).write_text(json.dumps(artifact.manifest, indent=2) + "\n")

    atomic_write_dir(path, write, force=force)
    artifact.path = path
    return path


def partition_artifact(path: os.PathLike | str, stages: int, output: os.PathLike | str | None = None, *,
                       force: bool = False, **kwargs) -> Pipeline:
    """Partition a written artifact; writes the stages into ``output`` (default: in place)."""
    from tfgraph.artifact import Artifact, read_manifest

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    model = _as_ir(path)
    pipeline = partition(model, stages, **kwargs)
    write_pipeline_artifact(Artifact(model, manifest), pipeline, output or path, force=force or output is None)
    return pipeline
