"""Semantic weight deduplication: initializers that are a transpose, reshape or cast of another."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from tfgraph.passes.registry import register_pass

_PROBE = 16


def _relation(a: np.ndarray, b: np.ndarray) -> str | None:
    """How ``b`` follows from ``a``: ``transpose`` (2-D), ``reshape`` (same bytes, other shape) or ``cast``; else None."""
    if a.size != b.size:
        return None
    if a.dtype == b.dtype:
        if a.ndim == 2 and b.ndim == 2 and b.shape == a.shape[::-1] and a.shape[0] != a.shape[1]:
            n = min(_PROBE, a.shape[0])
            if np.array_equal(b[0, :n], a[:n, 0]) and np.array_equal(b, a.T):
                return "transpose"
        if a.shape != b.shape:
            if np.array_equal(a.reshape(-1)[:_PROBE], b.reshape(-1)[:_PROBE]) and np.array_equal(a.reshape(b.shape), b):
                return "reshape"
        return None
    # Cast from the wider type must give the narrower one exactly (fp32 weights and an fp16 copy).
    if a.dtype.kind in "fiub" and b.dtype.kind in "fiub" and a.dtype.itemsize > b.dtype.itemsize and a.shape == b.shape:
        with np.errstate(all="ignore"):
            if np.array_equal(a.reshape(-1)[:_PROBE].astype(b.dtype), b.reshape(-1)[:_PROBE]) and np.array_equal(
                a.astype(b.dtype), b
            ):
                return "cast"
    return None


def _only_matmul_weight(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and all(n.op_type == "MatMul" and n.domain == "" and i == 1 for n, i in uses)


_DTYPES = {np.dtype(np.float16): ir.DataType.FLOAT16, np.dtype(np.float32): ir.DataType.FLOAT}


@register_pass("dedup-derived")
class DedupDerivedPass(ir.passes.InPlacePass):
    """Store once initializers that are a transpose, reshape or cast of another (tied embedding and LM
    head stored transposed, shared layers whose transposes were folded per use).

    The copy becomes derived: ``MatMul(x, Wᵀ)`` is rewritten to ``Gemm(x, W, transB=1)`` for 2-D
    ``x`` and to ``com.microsoft.FusedMatMul(x, W, transB=1)`` otherwise; other consumers read a
    ``Transpose``/``Reshape``/``Cast`` node on the kept tensor. Tensors under ``min_size``
    elements, graph inputs and outputs are left alone. Run it after the last constant folding
    (folding would materialize the derived tensors again).
    """

    def __init__(self, *, min_size: int = 256, contrib_ops: bool = True):
        super().__init__()
        self.min_size = min_size
        self.contrib_ops = contrib_ops
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts: collections.Counter[str] = collections.Counter()
        saved = removed = 0
        for graph in model.graphs():
            buckets: dict[int, list[ir.Value]] = collections.defaultdict(list)
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or value.is_graph_input() or value.is_graph_output() or t.size < self.min_size:
                    continue
                buckets[t.size].append(value)
            for members in buckets.values():
                done: set[int] = set()
                for i, a in enumerate(members):
                    if id(a) in done:
                        continue
                    for b in members[i + 1 :]:
                        if id(b) in done:
                            continue
                        pair = self._pair(a, b)
                        if pair is None:
                            continue
                        kept, derived, relation = pair
                        saved += derived.const_value.nbytes
                        removed += 1
                        self._derive(model, graph, kept, derived, relation, counts)
                        done.add(id(derived))
                        if derived is a:
                            break
        self.report = {relation: {"matches": n} for relation, n in counts.items()}
        if counts:
            self.report["bytes_saved"] = {"matches": removed, "bytes": saved}
        return ir.passes.PassResult(model, bool(counts))

    def _pair(self, a: ir.Value, b: ir.Value) -> tuple[ir.Value, ir.Value, str] | None:
        xa, xb = a.const_value.numpy(), b.const_value.numpy()
        relation = _relation(xa, xb)
        if relation is not None:
            # A transposed weight only MatMul reads is the one to derive (the consumer absorbs it).
            if relation == "transpose" and _only_matmul_weight(a) and not _only_matmul_weight(b):
                return b, a, relation
            return a, b, relation
        relation = _relation(xb, xa)
        if relation is not None:
            return b, a, relation
        return None

    def _derive(self, model: ir.Model, graph: ir.Graph, kept: ir.Value, derived: ir.Value, relation: str, counts) -> None:
        if relation == "transpose":
            for node, index in list(derived.uses()):
                if node.op_type == "MatMul" and node.domain == "" and index == 1:
                    self._matmul_transposed(model, graph, node, kept)
                    counts["matmul-transB"] += 1
        if derived.uses():
            if relation == "transpose":
                new = ir.node("Transpose", [kept], attributes={"perm": [1, 0]})
            elif relation == "reshape":
                shape = ir.Value(
                    name=f"{derived.name}.shape", const_value=ir.tensor(np.array(derived.const_value.shape, dtype=np.int64))
                )
                graph.register_initializer(shape)
                new = ir.node("Reshape", [kept, shape])
            else:
                new = ir.node("Cast", [kept], attributes={"to": int(derived.const_value.dtype)})
            out = new.outputs[0]
            out.name = f"{derived.name}.derived"
            out.shape, out.type = derived.shape or ir.Shape(derived.const_value.shape), derived.type or ir.TensorType(derived.const_value.dtype)
            graph.insert_before(graph[0], new) if len(graph) else graph.append(new)
            derived.replace_all_uses_with(out)
            counts[relation] += 1
        graph.initializers.pop(derived.name)

    def _matmul_transposed(self, model: ir.Model, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> None:
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank == 2:
            new = ir.node("Gemm", [x, weight], attributes={"transB": 1}, name=node.name)
        elif self.contrib_ops:
            new = ir.node("FusedMatMul", [x, weight], attributes={"transB": 1, "alpha": 1.0}, domain="com.microsoft", name=node.name)
            model.opset_imports.setdefault("com.microsoft", 1)
        else:
            t = ir.node("Transpose", [weight], attributes={"perm": [1, 0]})
            graph.insert_before(node, t)
            node.replace_input_with(1, t.outputs[0])
            return
        old = node.outputs[0]
        out = new.outputs[0]
        out.name, out.shape, out.type = old.name, old.shape, old.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old], [out])
