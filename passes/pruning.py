"""Pruning, part 2: score the heads and neurons :mod:`tfgraph.passes.pruning_units` finds, zero the
weakest (structured, optionally gradual), or zero the smallest weights (magnitude). The models these
functions run and the pipelines they normalize with come from the pass context
(:mod:`tfgraph.passes.context`): this module imports neither the targets nor the verifier."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.ir import exposed_outputs
from tfgraph.passes.context import current
from tfgraph.passes.pruning_units import (  # noqa: F401 - part of this module's API
    SCORES,
    AttentionUnit,
    Block,
    FFNUnit,
    _const,
    attention_units,
    ffn_units,
)

# ---------------------------------------------------------------------------------------------
# Normalized copy, scoring, zeroing
# ---------------------------------------------------------------------------------------------


def normalized_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with the cpu-fp32 cleanup and attention fusion applied (no verification)."""
    ctx = current()
    copy = model.clone()
    for spec in (*ctx.need("cleanup", "pruning"), *ctx.need("attention_fusion", "pruning")):
        if spec.name != "shrink-pruned":  # zeroed weights must stay findable in the original
            spec.create()(copy)
    return copy


def _digest(array: np.ndarray) -> tuple:
    return (str(array.dtype), tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())


class _Locator:
    """Finds the original model's initializers that hold a tensor of the normalized copy (or its transpose)."""

    def __init__(self, model: ir.Model):
        self.index: dict[tuple, list[ir.Value]] = {}
        for graph in model.graphs():
            for value in graph.initializers.values():
                if value.const_value is not None and not value.is_graph_input():
                    self.index.setdefault(_digest(value.const_value.numpy()), []).append(value)
        self.cache: dict[int, list[tuple[ir.Value, bool]]] = {}

    def find(self, value: ir.Value) -> list[tuple[ir.Value, bool]]:
        if id(value) not in self.cache:
            array = value.const_value.numpy()
            found = [(v, False) for v in self.index.get(_digest(array), [])]
            if array.ndim == 2:
                found += [(v, True) for v in self.index.get(_digest(array.T), [])]
            self.cache[id(value)] = found
        return self.cache[id(value)]


def _set_tensor(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _zero(value: ir.Value, index: tuple) -> None:
    array = value.const_value.numpy().copy()
    array[index] = 0
    _set_tensor(value, array)


def _zero_ops_attention(unit: AttentionUnit, h: int) -> list[tuple[ir.Value, tuple, int]]:
    """(value, index expression, axis of a 2-D weight) triples that zero head ``h``."""
    ops = []
    for block, d in ((unit.q, unit.qk_dim), (unit.k, unit.qk_dim), (unit.v, unit.v_dim)):
        cols = slice(block.offset + h * d, block.offset + (h + 1) * d)
        node, i = block.weight
        ops.append((node.inputs[i], (slice(None), cols)))
        if block.bias is not None:
            node, i = block.bias
            ops.append((node.inputs[i], (cols,)))
    ops.append((unit.out.inputs[1], (slice(h * unit.v_dim, (h + 1) * unit.v_dim), slice(None))))
    return ops


def _zero_ops_ffn(unit: FFNUnit, j: int) -> list[tuple[ir.Value, tuple]]:
    ops = [(u.inputs[1], (slice(None), j)) for u in unit.ups]
    ops += [(node.inputs[i], (Ellipsis, j)) for node, i in unit.vectors]
    ops.append((unit.down.inputs[1], (j, slice(None))))
    return ops


def _apply(ops: list[tuple[ir.Value, tuple]], locator: _Locator | None) -> int:
    """Zero in the normalized copy and, through ``locator``, in the original; returns the originals touched."""
    touched = 0
    for value, index in ops:
        targets = locator.find(value) if locator is not None else []
        _zero(value, index)
        for original, transposed in targets:
            idx = index
            if transposed:
                idx = tuple(reversed(index)) if len(index) == 2 else index
            _zero(original, idx)
            touched += 1
    return touched


def _norm(arrays: list[np.ndarray], score: str) -> float:
    if score == "l1":
        return float(sum(np.abs(a).sum(dtype=np.float64) for a in arrays))
    return float(math.sqrt(sum(np.square(a, dtype=np.float64).sum() for a in arrays)))


def _activation_scores(copy: ir.Model, att_groups, ffn_groups, feeds) -> tuple[dict, dict]:
    run = current().need("run", "pruning (activation scores)")

    extra = []
    for units in att_groups.values():
        extra += [u.node.outputs[0] for u in units]
    for units in ffn_groups.values():
        extra += [u.down.inputs[0] for u in units]
    with exposed_outputs(copy, extra):
        outputs = run(copy, feeds)
    head_scores, neuron_scores = {}, {}
    for key, units in att_groups.items():
        total = np.zeros(units[0].num_heads)
        for u in units:
            ctx = np.abs(outputs[u.node.outputs[0].name].astype(np.float64))
            ctx = ctx.reshape(-1, u.num_heads, u.v_dim).mean(axis=0).sum(axis=1)
            w = u.out.inputs[1].const_value.numpy().reshape(u.num_heads, u.v_dim, -1)
            total += ctx * np.sqrt(np.square(w, dtype=np.float64).sum(axis=(1, 2)))
        head_scores[key] = total
    for key, units in ffn_groups.items():
        total = np.zeros(units[0].width)
        for u in units:
            act = np.abs(outputs[u.down.inputs[0].name].astype(np.float64)).reshape(-1, u.width).mean(axis=0)
            w = u.down.inputs[1].const_value.numpy()
            total += act * np.sqrt(np.square(w, dtype=np.float64).sum(axis=1))
        neuron_scores[key] = total
    return head_scores, neuron_scores


def _weight_scores(att_groups, ffn_groups, score: str) -> tuple[dict, dict]:
    head_scores = {
        key: np.array([sum(_norm(u.head_arrays(h), score) for u in units) for h in range(units[0].num_heads)])
        for key, units in att_groups.items()
    }
    neuron_scores = {}
    for key, units in ffn_groups.items():
        total = np.zeros(units[0].width)
        for u in units:
            parts = [np.abs(u.ups[i].inputs[1].const_value.numpy()) for i in range(len(u.ups))]
            down = np.abs(u.down.inputs[1].const_value.numpy())
            if score == "l1":
                s = sum(p.sum(axis=0, dtype=np.float64) for p in parts) + down.sum(axis=1, dtype=np.float64)
                s += sum(np.abs(node.inputs[i].const_value.numpy()).reshape(-1) for node, i in u.vectors) if u.vectors else 0
            else:
                s = sum(np.square(p, dtype=np.float64).sum(axis=0) for p in parts) + np.square(down, dtype=np.float64).sum(axis=1)
                s += sum(np.square(node.inputs[i].const_value.numpy().reshape(-1), dtype=np.float64) for node, i in u.vectors) if u.vectors else 0
                s = np.sqrt(s)
            total += s
        neuron_scores[key] = total
    return head_scores, neuron_scores


def _dead_heads(unit: AttentionUnit) -> list[bool]:
    return [all(not np.any(a) for a in unit.head_arrays(h)) for h in range(unit.num_heads)]


def _dead_neurons(unit: FFNUnit) -> np.ndarray:
    dead = ~np.any(unit.down.inputs[1].const_value.numpy(), axis=1)
    for u in unit.ups:
        dead &= ~np.any(u.inputs[1].const_value.numpy(), axis=0)
    return dead


def parse_schedule(schedule: str | float | Sequence[float] | None, target: float) -> list[float]:
    """Fractions to prune at, ending at ``target``: None → one step; a float step s → s, 2s, … target;
    a comma list → those fractions (then the target)."""
    if target <= 0:
        return [0.0]
    if schedule in (None, "", "none", "oneshot"):
        return [target]
    if isinstance(schedule, str):
        parts = [p for p in schedule.replace(";", ",").split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise BadInputError(f"bad pruning schedule {schedule!r}: a step (0.1) or fractions (0.1,0.2,0.3)") from None
        schedule = numbers[0] if len(numbers) == 1 else numbers
    if isinstance(schedule, (int, float)):
        step = float(schedule)
        if not 0 < step <= 1:
            raise BadInputError(f"schedule step must be in (0, 1], got {step}")
        steps, k = [], 1
        while k * step < target - 1e-9:
            steps.append(round(k * step, 6))
            k += 1
        return steps + [target]
    steps = sorted(float(s) for s in schedule if 0 < float(s) < target)
    return steps + [target]


def _choose(scores: dict, fraction: float, scope: str, already: dict) -> dict:
    """Indices to zero per group: the lowest-scoring ``fraction`` of all units (keeping one per group)."""
    chosen = {key: set(already.get(key, ())) for key in scores}
    if fraction <= 0:
        return chosen
    if scope == "layer":
        for key, s in scores.items():
            n = max(min(int(round(fraction * len(s))), len(s) - 1), len(chosen[key]))
            order = sorted(range(len(s)), key=lambda i: (i not in chosen[key], s[i], i))
            chosen[key] = set(order[:n])
        return chosen
    total = sum(len(s) for s in scores.values())
    n = int(round(fraction * total))
    ranked = sorted(((s[i], key, i) for key, s in scores.items() for i in range(len(s)) if i not in chosen[key]),
                    key=lambda t: (t[0], str(t[1]), t[2]))
    count = sum(len(c) for c in chosen.values())
    for _, key, i in ranked:
        if count >= n:
            break
        if len(chosen[key]) >= len(scores[key]) - 1:
            continue  # every layer keeps at least one head / neuron
        chosen[key].add(i)
        count += 1
    return chosen


def _group(units, key_fn) -> dict:
    groups: dict = {}
    for u in units:
        groups.setdefault(key_fn(u), []).append(u)
    return groups


def prune_structured(
    model: ir.Model,
    *,
    heads: float = 0.0,
    neurons: float = 0.0,
    score: str = "l2",
    schedule: str | float | Sequence[float] | None = None,
    scope: str = "global",
    calibration: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero the least important ``heads`` fraction of attention heads and ``neurons`` fraction of FFN
    neurons of ``model`` in place; returns a report.

    ``score``: ``l1``/``l2`` (norm of every weight a head/neuron owns) or ``activation``
    (mean |output| on ``calibration`` inputs — generated from the signature at ``shapes``
    when not given — times the norm of its output-projection rows). ``scope``: ``global``
    (rank across layers: per-layer counts differ) or ``layer`` (the same fraction in every
    layer). ``schedule``: prune gradually (scores recomputed after every step on the
    partially pruned model), see :func:`parse_schedule`. Every layer keeps at least one
    head and one neuron.
    """
    if score not in SCORES:
        raise BadInputError(f"unknown pruning score {score!r}; choose one of {', '.join(SCORES)}")
    if scope not in ("global", "layer"):
        raise BadInputError(f"unknown pruning scope {scope!r}; choose global or layer")
    for name, fraction in (("heads", heads), ("neurons", neurons)):
        if not 0 <= fraction < 1:
            raise BadInputError(f"{name} fraction must be in [0, 1), got {fraction}")
    copy = normalized_copy(model)
    att_units = attention_units(copy)
    ffn = ffn_units(copy)
    att_groups = _group(att_units, AttentionUnit.key)
    ffn_groups = _group(ffn, FFNUnit.key)
    locator = _Locator(model)
    feeds = None
    if score == "activation":
        ctx = current()
        feeds = (ctx.need("check_feeds", "pruning")(calibration, copy) if calibration is not None
                 else ctx.need("generate_inputs", "pruning")(copy, shapes, seed=seed))
    head_plan = parse_schedule(schedule, heads)
    neuron_plan = parse_schedule(schedule, neurons)
    steps = max(len(head_plan), len(neuron_plan))
    head_plan = head_plan + [head_plan[-1]] * (steps - len(head_plan))
    neuron_plan = neuron_plan + [neuron_plan[-1]] * (steps - len(neuron_plan))
    pruned_heads: dict = {}
    pruned_neurons: dict = {}
    step_reports = []
    for h_frac, n_frac in zip(head_plan, neuron_plan):
        if feeds is not None:
            h_scores, n_scores = _activation_scores(copy, att_groups, ffn_groups, feeds)
        else:
            h_scores, n_scores = _weight_scores(att_groups, ffn_groups, score)
        new_heads = _choose(h_scores, h_frac, scope, pruned_heads) if att_groups else {}
        new_neurons = _choose(n_scores, n_frac, scope, pruned_neurons) if ffn_groups else {}
        for key, chosen in new_heads.items():
            for h in sorted(chosen - pruned_heads.get(key, set())):
                for unit in att_groups[key]:
                    _apply(_zero_ops_attention(unit, h), locator)
        for key, chosen in new_neurons.items():
            for j in sorted(chosen - pruned_neurons.get(key, set())):
                for unit in ffn_groups[key]:
                    _apply(_zero_ops_ffn(unit, j), locator)
        pruned_heads, pruned_neurons = new_heads, new_neurons
        step_reports.append(
            {
                "heads": h_frac,
                "neurons": n_frac,
                "heads_pruned": sum(len(c) for c in pruned_heads.values()),
                "neurons_pruned": sum(len(c) for c in pruned_neurons.values()),
            }
        )
    total_heads = sum(units[0].num_heads for units in att_groups.values())
    total_neurons = sum(units[0].width for units in ffn_groups.values())
    return {
        "score": score,
        "scope": scope,
        "schedule": step_reports,
        "attention_blocks": len(att_units),
        "ffn_blocks": len(ffn),
        "heads_total": total_heads,
        "heads_pruned": sum(len(c) for c in pruned_heads.values()),
        "neurons_total": total_neurons,
        "neurons_pruned": sum(len(c) for c in pruned_neurons.values()),
        "per_layer": [
            {
                "block": units[0].name,
                "uses": len(units),
                "heads": units[0].num_heads,
                "pruned_heads": sorted(int(h) for h in pruned_heads.get(key, ())),
            }
            for key, units in att_groups.items()
        ]
        + [
            {
                "block": units[0].name,
                "uses": len(units),
                "neurons": units[0].width,
                "pruned_neurons": len(pruned_neurons.get(key, ())),
            }
            for key, units in ffn_groups.items()
        ],
    }


def zero_heads(model: ir.Model, heads: Mapping[int, Sequence[int]]) -> int:
    """Zero the given heads of the given attention blocks (index in graph order) in place; returns heads zeroed."""
    copy = normalized_copy(model)
    units = attention_units(copy)
    locator = _Locator(model)
    count = 0
    for index, hs in heads.items():
        if not 0 <= index < len(units):
            raise BadInputError(f"attention block {index} does not exist ({len(units)} found)")
        for h in hs:
            _apply(_zero_ops_attention(units[index], int(h)), locator)
            count += 1
    return count


def magnitude_prune(model: ir.Model, sparsity: float, *, min_size: int = 1024) -> dict[str, Any]:
    """Unstructured magnitude pruning in place: zero the smallest-|w| ``sparsity`` fraction of every
    constant 2-D float MatMul/Gemm weight (per tensor). Dense kernels do not get smaller or
    faster from this; the report says how sparse the weights are."""
    if not 0 <= sparsity < 1:
        raise BadInputError(f"sparsity must be in [0, 1), got {sparsity}")
    weights: dict[int, ir.Value] = {}
    for graph in model.graphs():
        for node in graph:
            if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
                for inp in node.inputs[:2]:
                    data = _const(inp)
                    if data is not None and data.ndim == 2 and data.dtype.kind == "f" and data.size >= min_size:
                        weights[id(inp)] = inp
    total = zeros_before = zeros_after = changed = 0
    for value in weights.values():
        array = value.const_value.numpy()
        total += array.size
        zeros_before += int(array.size - np.count_nonzero(array))
        k = int(math.floor(sparsity * array.size))
        if k > 0:
            threshold = np.partition(np.abs(array).reshape(-1), k - 1)[k - 1]
            mask = np.abs(array) <= threshold
            # Ties at the threshold: keep exactly k zeros (the first ones in order).
            if mask.sum() > k:
                flat = mask.reshape(-1)
                extra = np.flatnonzero(flat & (np.abs(array).reshape(-1) == threshold))
                flat[extra[: int(mask.sum() - k)]] = False
                mask = flat.reshape(array.shape)
            pruned = np.where(mask, np.zeros((), array.dtype), array)
            if not np.array_equal(pruned, array):
                _set_tensor(value, pruned)
                changed += 1
            array = pruned
        zeros_after += int(array.size - np.count_nonzero(array))
    return {
        "tensors": len(weights),
        "tensors_changed": changed,
        "parameters": total,
        "sparsity_before": zeros_before / total if total else 0.0,
        "sparsity_after": zeros_after / total if total else 0.0,
        "note": "unstructured: weights are zeroed, dense kernels keep their size and speed",
    }
