"""Accuracy of reduced-precision compiles against the fp32 model, and the ``max_drop`` budget loop
that turns the most harmful quantized nodes back into float."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir


def accuracy(reference, outputs) -> dict[str, dict]:
    """Per float output: max abs difference, cosine of the flattened tensors, and per row of the
    leading axis (for ``(batch, dim)`` outputs: the sentence-embedding cosine) the mean and worst
    cosine. ``reference``/``outputs``: one dict of arrays, or lists of them (one per batch)."""
    if isinstance(reference, Mapping):
        reference, outputs = [reference], [outputs]
    report = {}
    for name in reference[0]:
        dot = na = ne = 0.0
        max_abs, rows, finite, ndim = 0.0, [], True, None
        for want, got in zip(reference, outputs):
            want = np.asarray(want[name])
            if name not in got or not np.issubdtype(want.dtype, np.floating):
                break
            ndim = want.ndim
            e = want.astype(np.float64).reshape(len(want) if want.ndim else 1, -1)
            a = np.asarray(got[name], dtype=np.float64).reshape(e.shape)
            finite &= bool(np.isfinite(a).all())
            a_safe = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            dot += float((a_safe * e).sum())
            na += float((a_safe * a_safe).sum())
            ne += float((e * e).sum())
            max_abs = max(max_abs, float(np.abs(a - e).max()) if a.size else 0.0)
            norms = np.linalg.norm(a_safe, axis=1) * np.linalg.norm(e, axis=1)
            rows.append((a_safe * e).sum(1) / np.maximum(norms, 1e-30))
        else:
            if ndim is None:
                continue
            rows_all = np.concatenate(rows)
            entry = {
                "max_abs": max_abs if finite else float("inf"),
                "cosine": float(dot / max(np.sqrt(na * ne), 1e-30)),
                "row_cosine_mean": float(rows_all.mean()),
                "row_cosine_min": float(rows_all.min()),
                "finite": finite,
            }
            if ndim == 2:
                entry["embedding"] = True  # (batch, dim): rows are sentence embeddings
            report[name] = entry
    return report


def next_token(reference, outputs, masks=None, *, name: str = "logits") -> dict | None:
    """Teacher-forced next-token agreement of a causal LM's ``name`` output (batch, sequence, vocab) with
    the fp32 model's on the same prompts: top-1 agreement and mean KL(p_fp32 || p_quantized) over the
    positions ``masks`` (the batches' attention masks) keep. None when the output is not such logits."""
    if isinstance(reference, Mapping):
        reference, outputs, masks = [reference], [outputs], [masks]
    masks = masks if masks is not None else [None] * len(reference)
    agree = kept = 0
    kl_sum = 0.0
    for want, got, mask in zip(reference, outputs, masks):
        if name not in want or name not in got or np.asarray(want[name]).ndim != 3:
            return None
        e = np.asarray(want[name], np.float64)
        a = np.asarray(got[name], np.float64).reshape(e.shape)
        keep = np.asarray(mask, bool) if mask is not None and np.shape(mask) == e.shape[:2] else np.ones(e.shape[:2], bool)
        log_e = e - _logsumexp(e)
        log_a = a - _logsumexp(a)
        kl = (np.exp(log_e) * (log_e - log_a)).sum(-1)
        agree += int((e.argmax(-1) == a.argmax(-1))[keep].sum())
        kept += int(keep.sum())
        kl_sum += float(kl[keep].sum())
    if not kept:
        return None
    return {"top1_agreement": agree / kept, "kl_mean": kl_sum / kept, "positions": kept}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(-1, keepdims=True))


def score(report: Mapping[str, dict]) -> float:
    """One accuracy figure: embedding outputs' mean row cosine if the model has any, else the worst
    flattened cosine; NaN/Inf anywhere scores -1."""
    if any(not r["finite"] for r in report.values()):
        return -1.0
    embedding = [r["row_cosine_mean"] for r in report.values() if r.get("embedding")]
    if embedding:
        return min(embedding)
    return min((r["cosine"] for r in report.values()), default=1.0)


def revert_nodes(model: ir.Model, records: Mapping[str, dict], names: Sequence[str], *,
                 weights_float16: bool = False, switches: dict[str, str] | None = None) -> list[str]:
    """Rebuild the float nodes of the quantized nodes ``names`` (``records``: the quantize pass's
    ``quantized``), in place; returns the names reverted. Leftover integer weights and Q/DQ nodes
    that no longer feed anything are removed. With ``weights_float16``, 2-D weights of reverted
    nodes other than Gather are stored as float16 behind a ``Cast`` to float (onnxruntime folds the
    Cast at load: float compute, half the bytes; a weight-only ``DequantizeLinear`` was rewritten
    back into integer compute by onnxruntime's QDQ fusions, so it is not used).

    With ``switches`` (a dict to fill), nothing is replaced: each node gets its float rebuild beside
    it and its users read ``q * s + f * (1 - s)`` for a new scalar graph input ``s`` (1: quantized,
    0: float), recorded as ``switches[name] = input name`` — one session can then try every revert."""

    graph = model.graph
    done = []
    for name in names:
        record = records[name]
        quantized = next((n for n in graph if n.name == name), None)
        if quantized is None:
            continue
        values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
        values.update(graph.initializers)
        for node in graph:
            for out in node.outputs:
                values[out.name] = out
        # Where the output goes: the quantized node's output (static QDQ keeps the same node).
        target_out = values[record["output"]]
        new_nodes, main_nodes = [], []
        local: dict[str, ir.Value] = {}
        for entry in record["nodes"]:
            inputs = []
            for input_name in entry["inputs"]:
                if input_name is None:
                    inputs.append(None)
                elif input_name in local:
                    inputs.append(local[input_name])
                elif input_name in record["weights"]:
                    array = record["weights"][input_name]
                    if weights_float16 and entry["op_type"] != "Gather" and array.ndim == 2:
                        half_name = f"{input_name}_float16"
                        if half_name not in graph.initializers:
                            half = np.clip(array, -65504, 65504).astype(np.float16)
                            graph.register_initializer(ir.Value(
                                name=half_name, shape=ir.Shape(half.shape), type=ir.TensorType(ir.DataType.FLOAT16),
                                const_value=ir.tensor(half, name=half_name)))
                        cast = ir.Node("", "Cast", [graph.initializers[half_name]],
                                       attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                                       name=f"{name}__cast_{input_name}", num_outputs=1)
                        cast.outputs[0].name = f"{input_name}__{name}_float"
                        cast.outputs[0].dtype = ir.DataType.FLOAT
                        new_nodes.append(cast)
                        inputs.append(cast.outputs[0])
                    elif input_name in graph.initializers:
                        inputs.append(graph.initializers[input_name])
                    else:
                        array = record["weights"][input_name]
                        value = ir.Value(name=input_name, shape=ir.Shape(array.shape),
                                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                         const_value=ir.tensor(array, name=input_name))
                        graph.register_initializer(value)
                        inputs.append(value)
                else:
                    inputs.append(values[input_name])
            node = ir.Node(entry["domain"], entry["op_type"], inputs, attributes=list(entry["attributes"].values()),
                           name=f"{name}__float{len(main_nodes)}", num_outputs=1)
            node.outputs[0].dtype = ir.DataType.FLOAT
            node.outputs[0].name = entry["output"] + "__float"
            local[entry["output"]] = node.outputs[0]
            new_nodes.append(node)
            main_nodes.append(node)
        graph.insert_before(quantized, new_nodes)
        final = main_nodes[-1].outputs[0]
        final.shape = target_out.shape
        if switches is not None:
            _switch(graph, name, target_out, final, switches)
            continue
        ir.convenience.replace_all_uses_with(target_out, final, replace_graph_outputs=True)
        producer = target_out.producer()
        out_name = target_out.name
        if producer is not None and producer is not main_nodes[-1]:
            graph.remove(producer, safe=True)
        final.name = out_name
        main_nodes[0].name = name
        done.append(name)
    if switches is not None:
        graph.sort()
        return list(switches)
    _remove_dead(graph)
    return done


def _switch(graph: ir.Graph, name: str, quantized: ir.Value, floating: ir.Value, switches: dict[str, str]) -> None:
    s = ir.Value(name=f"tfgraph_switch_{len(switches)}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(s)
    one = ir.Value(name=f"{s.name}_one", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                   const_value=ir.tensor(np.array(1.0, np.float32), name=f"{s.name}_one"))
    graph.register_initializer(one)
    inv = ir.node("Sub", [one, s], name=f"{s.name}_inv")
    a = ir.node("Mul", [quantized, s], name=f"{s.name}_q")
    b = ir.node("Mul", [floating, inv.outputs[0]], name=f"{s.name}_f")
    mix = ir.node("Add", [a.outputs[0], b.outputs[0]], name=f"{s.name}_mix")
    for n in (inv, a, b, mix):
        n.outputs[0].name, n.outputs[0].dtype = n.name, ir.DataType.FLOAT
    graph.insert_after(quantized.producer(), [inv, a, b, mix])
    ir.convenience.replace_all_uses_with(quantized, mix.outputs[0], replace_graph_outputs=True)
    a.replace_input_with(0, quantized)
    if mix.outputs[0].is_graph_output():  # the graph output keeps its name (the accuracy report's key)
        out_name = quantized.name
        quantized.name = f"{out_name}__quantized"
        mix.outputs[0].name = out_name
    switches[name] = s.name


def _remove_dead(graph: ir.Graph) -> None:
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def budget(
    model: ir.Model,
    records: Mapping[str, dict],
    evaluate: Callable[[ir.Model], dict],
    max_drop: float,
    *,
    weights_float16: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    evaluate_configs: Callable[[ir.Model, list[dict]], list[dict]] | None = None,
) -> dict[str, Any]:
    """Revert quantized nodes to float until ``1 - score(evaluate(model)) <= max_drop``.

    Ranking: by how much reverting each node alone raises the score. Without ``evaluate_configs``,
    one evaluation (one session) per node on a copy; with it, one model holds every node beside its
    float rebuild behind a switch input (``revert_nodes(switches=...)``) and
    ``evaluate_configs(model, [extra feeds, ...])`` scores every single-node revert in one session.
    Nodes are then reverted in that order, re-evaluating after each, until the budget holds or none
    are left. Returns the report (the ranking used, which nodes, the score after each step)."""
    start = float(score(evaluate(model)))
    history = [{"reverted": None, "score": start}]
    if 1.0 - start <= max_drop:
        return {"max_drop": max_drop, "initial_score": start, "final_score": start, "reverted": [], "steps": history,
                "met": True}
    names = [n for n in records if any(node.name == n for node in model.graph)]
    gains: dict[str, float] = {}
    if evaluate_configs is not None:
        if progress:
            progress("max-drop: rank quantized nodes (one session)", 0, 1)
        switched, switches = _copy(model), {}
        revert_nodes(switched, records, names, weights_float16=weights_float16, switches=switches)
        on = {s: np.array(1.0, np.float32) for s in switches.values()}
        configs = [on] + [{**on, switches[n]: np.array(0.0, np.float32)} for n in names]
        reports = evaluate_configs(switched, configs)
        base = float(score(reports[0]))
        gains = {n: float(score(r)) - base for n, r in zip(names, reports[1:])}
        ranking = "score gain of reverting each node alone, all in one session (the rebuilds behind switch inputs)"
    else:
        for i, name in enumerate(names):
            if progress:
                progress("max-drop: rank quantized nodes", i, len(names))
            copy = _copy(model)
            revert_nodes(copy, records, [name], weights_float16=weights_float16)
            gains[name] = float(score(evaluate(copy)) - start)
        ranking = "score gain of reverting each node alone (one evaluation per node)"
    order = sorted(names, key=lambda n: -gains[n])
    reverted, current = [], start
    for name in order:
        if 1.0 - current <= max_drop:
            break
        revert_nodes(model, records, [name], weights_float16=weights_float16)
        reverted.append(name)
        current = float(score(evaluate(model)))
        history.append({"reverted": name, "gain_alone": gains[name], "score": current})
    return {"max_drop": max_drop, "initial_score": start, "final_score": current, "reverted": reverted,
            "reverted_weights": ", ".join(sorted({records[n].get("revert_to") or (
                "float16 storage, float compute" if weights_float16 else "float") for n in reverted})) or None,
            "ranking": ranking, "steps": history, "met": bool(1.0 - current <= max_drop)}
