"""Running onnxscript rewrite rules as a pass, with per-rule match counts and near misses."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import _basics, pattern


def _near_miss(rules: Sequence[pattern.RewriteRule], model: ir.Model, commute: bool) -> dict | None:
    """The best partial match of ``rules`` in ``model`` (onnxscript's tracer; the model is not changed)."""
    tracer = _basics.MatchingTracer()
    pattern.RewriteRuleSet(list(rules), commute=commute).apply_to_model(model, tracer=tracer)
    best: _basics.MatchInfo | None = None
    for matches in tracer.best_matches_map.values():
        for info in matches:
            if best is None or info.score() > best.score():
                best = info
    if best is None or best.score() == 0:
        return None
    reason = best.match_result.reason or ""
    return {
        "status": best.status.name,
        "matched_nodes": len(best.match_result.nodes),
        "at": best.root_node.name or best.root_node.op_type,
        "reason": " ".join(str(reason).split())[:300],
    }


class RuleSetPass(ir.passes.InPlacePass):
    """Base class: apply named rewrite rules one after the other, count matches per rule.

    Subclasses define :meth:`named_rules`: ``(name, rule)`` pairs, where a name may also
    stand for a sequence of rules (variants of one fusion counted together). After a run, :attr:`report` maps each rule's
    name to ``{"matches": n}`` plus, for rules that matched nothing, the nearest
    near-miss (how far the pattern got and why it failed) when ``trace_misses`` is set.
    The pass manager copies :attr:`report` into the manifest. ``commute`` also tries
    commutative ops (Add, Mul) with their operands swapped.
    """

    commute = True

    def __init__(self, *, trace_misses: bool = True):
        super().__init__()
        self.trace_misses = trace_misses
        self.report: dict[str, dict] = {}

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule | Sequence[pattern.RewriteRule]]]:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = {}
        total = 0
        for name, rule in self.named_rules():
            rules = list(rule) if isinstance(rule, (list, tuple)) else [rule]
            count = pattern.RewriteRuleSet(rules, commute=self.commute).apply_to_model(model)
            entry: dict = {"matches": count}
            if count == 0 and self.trace_misses:
                miss = _near_miss(rules, model, self.commute)
                if miss is not None:
                    entry["near_miss"] = miss
            self.report[name] = entry
            total += count
        return ir.passes.PassResult(model, total > 0)
