"""Running onnxscript rewrite rules as a pass, with per-rule match counts and near misses.

Rules are tried through a dispatcher (:class:`_RuleDispatch`) rather than handed to
onnxscript's ``RewriteRuleSet`` one by one. onnxscript tries every rule at every node;
with commutation a single fusion expands to hundreds of rules (LayerNorm: 240), so a
10,000-node chain of ``Add`` took ~10 ms a node (two sweeps: the rewrite, then the
near-miss trace) and the near-miss tracer kept one record per partial match (GBs).
The dispatcher tries only the rules whose pattern root is the node's operator, and
skips a rule at a node where a check of the node's direct inputs proves the match
fails before it binds anything below the root (their producers' operators). Both are
exact: a skipped attempt could not have matched, and in the near-miss trace it could
only have scored as much as the first attempt that rule already logged. The tracer
keeps the first best partial match of each rule, which is all :func:`_near_miss` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import _basics, _matcher, _pattern_ir, pattern

# Kinds of a pattern node's input, for the quick check at the root.
_NONE, _FREE, _NODE, _STOP = range(4)


class _BestTracer(_basics.MatchingTracer):
    """onnxscript's tracer, keeping only the first of each rule's best-scoring partial matches.

    The stock tracer keeps every partial match that ties the best score (one per node of a
    long chain); :func:`_near_miss` reads only the first of each rule's list.
    """

    def log(self, rule, container, node, match_result, status) -> None:
        info = _basics.MatchInfo(match_result, node, container, status)
        score = info.score()
        if score == 0:
            return
        best = self._best_matches_map.get(rule)
        if best and score <= best[0].score():
            return
        self._best_matches_map[rule] = [info]


class _RuleInfo:
    """One (commuted) rule, with what a node must look like for the rule's root to get past its inputs."""

    __slots__ = ("rule", "index", "root", "signature")

    def __init__(self, rule: pattern.RewriteRule, index: int):
        self.rule = rule
        self.index = index
        self.root: tuple[str, str] | None = None
        self.signature: tuple | None = None  # None: no quick check (always try the rule)
        try:
            if not isinstance(rule._matcher, _matcher.SimplePatternMatcher):
                return
            root = rule._target_pattern.output_node
        except (AttributeError, ValueError):  # another onnxscript: try the rule everywhere
            return
        if isinstance(root.op, _pattern_ir.StringConstantPattern) and isinstance(
            root.domain, _pattern_ir.StringConstantPattern
        ):
            self.root = (root.domain.value(), root.op.value())
        self.signature = (len(root.inputs), bool(root.allow_other_inputs), tuple(_input_kind(p) for p in root.inputs))


def _input_kind(value: _pattern_ir.ValuePattern | None) -> tuple:
    if value is None:
        return (_NONE,)
    if isinstance(value, _pattern_ir.NodeOutputPattern):
        producer = value.producer()
        op = None
        if isinstance(producer.op, _pattern_ir.StringConstantPattern) and isinstance(
            producer.domain, _pattern_ir.StringConstantPattern
        ):
            op = (producer.domain.value(), producer.op.value())
        return (_NODE, value.output_index, op)
    if isinstance(value, (_pattern_ir.BacktrackingOr, _pattern_ir.OpIdDispatchOr)):
        return (_STOP,)
    if isinstance(value, (_pattern_ir.Var, _pattern_ir.Constant, _pattern_ir.AnyValue)):
        return (_FREE,)  # binds no node; may fail, which the full match finds
    return (_STOP,)


def _fails_at_root(signature: tuple, node: ir.Node) -> bool:
    """True when matching a pattern root with ``signature`` at ``node`` is sure to fail before it
    binds any node but the root (onnxscript's ``_match_node``: inputs in order, a computed input
    must come from a producer of the pattern's operator and output index)."""
    count, allow_other, kinds = signature
    inputs = node.inputs
    if len(inputs) > count and not allow_other:
        return True
    for i, kind in enumerate(kinds):
        value = inputs[i] if i < len(inputs) else None
        tag = kind[0]
        if tag == _FREE:
            continue
        if tag == _NONE:
            if value is not None:
                return True
            continue
        if tag == _STOP:
            return False
        # _NODE: the producer's own match may bind nodes, so stop at the first one that fits.
        if value is None:
            return True
        producer = value.producer()
        if producer is None or value.index() != kind[1]:
            return True
        if kind[2] is not None and (producer.domain, producer.op_type) != kind[2]:
            return True
        return False
    return False


class _RuleDispatch:
    """A stand-in for a list of rules inside one ``RewriteRuleSet``: at each node it tries, in the
    rules' order, only those that can match there, and answers for the one that matched.

    onnxscript's loop reads ``name``, ``remove_nodes`` and ``as_function`` of the rule that
    returned a replacement; they are set from the matching rule before returning it.
    """

    def __init__(self, rules: Sequence[pattern.RewriteRule]):
        infos = [_RuleInfo(rule, i) for i, rule in enumerate(rules)]
        unrooted = [info for info in infos if info.root is None]
        roots = {info.root for info in infos if info.root is not None}
        self._buckets = {
            root: self._bucket(sorted([i for i in infos if i.root == root] + unrooted, key=lambda i: i.index))
            for root in roots
        }
        self._unrooted = self._bucket(unrooted)
        self.name = None
        self.as_function = False
        # RewriteRuleSet removes unused nodes at the end when any rule keeps the nodes it matched.
        self.remove_nodes = all(rule.remove_nodes for rule in rules)
        pre = [r.graph_pre_visitor for r in rules if getattr(r, "graph_pre_visitor", None)]
        post = [r.graph_post_visitor for r in rules if getattr(r, "graph_post_visitor", None)]
        self.graph_pre_visitor = (lambda: [f() for f in pre]) if pre else None
        self.graph_post_visitor = (lambda: [f() for f in post]) if post else None

    @staticmethod
    def _bucket(infos: list[_RuleInfo]) -> tuple[list[tuple], list[tuple[_RuleInfo, int]], bool]:
        """(distinct signatures, [(rule, index of its signature or -1)], whether every rule has one)."""
        signatures = list(dict.fromkeys(i.signature for i in infos if i.signature is not None))
        where = {s: k for k, s in enumerate(signatures)}
        entries = [(i, where[i.signature] if i.signature is not None else -1) for i in infos]
        return signatures, entries, all(k >= 0 for _, k in entries)

    def try_rewrite(self, model, graph_or_function, node, *, verbose=None, tracer=None):
        signatures, entries, all_checked = self._buckets.get((node.domain, node.op_type), self._unrooted)
        if not entries:
            return None
        failing = [_fails_at_root(s, node) for s in signatures] + [False]  # index -1: never
        if tracer is None:
            if all_checked and all(failing[:-1]):
                return None
            for info, k in entries:
                if failing[k]:
                    continue
                delta = info.rule.try_rewrite(model, graph_or_function, node, verbose=verbose)
                if delta is not None:
                    self.name = info.rule.name
                    self.as_function = info.rule.as_function
                    self.remove_nodes = info.rule.remove_nodes
                    return delta
            return None
        logged = tracer.best_matches_map
        for info, k in entries:
            # A sure failure at the root scores at most 1: it adds nothing once the rule has a score.
            if failing[k] and info.rule in logged:
                continue
            info.rule.try_rewrite(model, graph_or_function, node, verbose=verbose, tracer=tracer)
        return None


def _rule_set(rules: Sequence[pattern.RewriteRule], commute: bool) -> pattern.RewriteRuleSet:
    expanded = pattern.RewriteRuleSet(list(rules), commute=commute).rules
    return pattern.RewriteRuleSet([_RuleDispatch(expanded)], commute=False)


# Built rule sets per (pass class, its options): expanding the commuted variants copies every pattern
# graph (0.3-0.5 s a compile); a pass with the same options builds the same rules, so they are built once
# per process. Bounded: options seen are few (a profile's passes), a plugin may vary them.
_BUILT: dict[tuple, list] = {}
_BUILT_MAX = 256


def _options_key(pass_: object) -> tuple:
    skip = {"report", "trace_misses"}
    return (type(pass_), tuple(sorted((k, repr(v)) for k, v in vars(pass_).items() if k not in skip)))


def _near_miss(rule_set: pattern.RewriteRuleSet, model: ir.Model) -> dict | None:
    """The best partial match of ``rule_set`` in ``model`` (onnxscript's tracer; the model is not changed)."""
    tracer = _BestTracer()
    rule_set.apply_to_model(model, tracer=tracer)
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

    def _built(self) -> list[tuple[str, pattern.RewriteRuleSet]]:
        key = _options_key(self)
        built = _BUILT.get(key)
        if built is None:
            built = [(name, _rule_set(list(rule) if isinstance(rule, (list, tuple)) else [rule], self.commute))
                     for name, rule in self.named_rules()]
            if len(_BUILT) >= _BUILT_MAX:
                _BUILT.clear()
            _BUILT[key] = built
        return built

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = {}
        total = 0
        for name, rule_set in self._built():
            count = rule_set.apply_to_model(model)
            entry: dict = {"matches": count}
            if count == 0 and self.trace_misses:
                miss = _near_miss(rule_set, model)
                if miss is not None:
                    entry["near_miss"] = miss
            self.report[name] = entry
            total += count
        return ir.passes.PassResult(model, total > 0)
