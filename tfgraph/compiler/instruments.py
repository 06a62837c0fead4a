"""Pass instruments: code that runs around every pass of a :class:`~tfgraph.compiler.passmanager.PassManager`.

An instrument sees the model before the pipeline, before and after each pass, and
after the pipeline; it may write into the pass's :class:`PassRecord` and may raise to
stop the pipeline. Built in: timing, structural checks (ONNX checker + strict shape
inference + an honesty check of the ``modified`` flag), and a numeric diff of every
intermediate model against the input model on onnxruntime CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from tfgraph.errors import VerificationError, first_line
from tfgraph.ir import PROTOBUF_LIMIT, graphs, parameter_count, without_weights
from tfgraph.compiler.verify import UNOPTIMIZED, compare, padded_positions, run


@dataclasses.dataclass
class PassRecord:
    """What happened in one pass: filled by the manager and its instruments, written to the manifest."""

    index: int
    name: str
    options: dict[str, Any]
    phase: str = ""  # the target phase the pass ran in ("" for passes given on top of the target's)
    modified: bool = False
    time_s: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    check_s: float = 0.0  # time the instruments took around the pass (not in the manifest's pass record)
    # Set by the pass manager for instruments: the last pass of its phase; a fresh copy of the pass.
    phase_end: bool = dataclasses.field(default=True, repr=False, compare=False)
    remake: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            **({"phase": self.phase} if self.phase else {}),
            "options": self.options,
            "modified": self.modified,
            "time_s": round(self.time_s, 6),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }
        d.update(self.extra)
        return d


def count_nodes(model: ir.Model) -> int:
    return sum(len(graph) for graph in graphs(model))


class Instrument:
    """Base class: override the hooks you need."""

    def before_pipeline(self, model: ir.Model) -> None:
        pass

    def before_pass(self, pass_: ir.passes.PassBase, record: PassRecord, model: ir.Model) -> None:
        pass

    def after_pass(self, pass_: ir.passes.PassBase, record: PassRecord, model: ir.Model) -> None:
        pass

    def after_pipeline(self, model: ir.Model) -> None:
        pass


class TimingInstrument(Instrument):
    """Wall time of each pass (``time_s``) and node/parameter counts around it.

    The counts after a pass are the counts before the next one when the model is the same
    object (instruments do not change the model), so each is computed once per pass.
    """

    def __init__(self):
        self._after: tuple[ir.Model, int, int] | None = None

    def before_pipeline(self, model):
        self._after = None

    def before_pass(self, pass_, record, model):
        if self._after is not None and self._after[0] is model:
            record.nodes_before, record.params_before = self._after[1], self._after[2]
        else:
            record.nodes_before = count_nodes(model)
            record.params_before = parameter_count(model)
        self._start = time.perf_counter()

    def after_pass(self, pass_, record, model):
        record.time_s = time.perf_counter() - self._start
        record.nodes_after = count_nodes(model)
        record.params_after = parameter_count(model)
        self._after = (model, record.nodes_after, record.params_after)

    def after_pipeline(self, model):
        self._after = None


def _attr_key(name: str, attr: ir.Attr) -> str:
    if attr.type == ir.AttributeType.TENSOR:
        return f"{name}=T{attr.value.dtype}{attr.value.shape}"
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS, ir.AttributeType.TENSORS):
        return name  # subgraphs are walked by graphs(); tensor lists by count only
    return f"{name}={attr.value!r}"


def fingerprint(model: ir.Model) -> str:
    """A structural hash: nodes (op, domain, attributes, wiring), graph IO and initializer names/shapes.

    Compared only within one run (before and after a pass): the text hashed may change between
    versions. One string per item, hashed once, so a 100,000-node graph takes about a second.
    """
    ids: dict[int, int] = {}

    def vid(v: ir.Value | None) -> str:
        if v is None:
            return "-"
        key = id(v)
        number = ids.get(key)
        if number is None:
            number = ids[key] = len(ids)
        return str(number)

    parts: list[str] = []
    add = parts.append
    for graph in graphs(model):
        add("G")
        for v in graph.inputs:
            add(f"i{vid(v)}:{v.name}")
        for name in sorted(graph.initializers):  # order carries no meaning
            v = graph.initializers[name]
            t = v.const_value
            add(f"w{vid(v)}:{name}:" + ("None:None" if t is None else f"{tuple(t.shape)}:{t.dtype}"))
        for node in graph:
            attrs = ";".join([_attr_key(k, a) for k, a in node.attributes.items()]) if node.attributes else ""
            inputs = list(node.inputs)
            while inputs and inputs[-1] is None:  # trailing omitted optional inputs mean nothing
                inputs.pop()
            add(
                f"n{node.domain}:{node.op_type}:{','.join([vid(i) for i in inputs])}->"
                f"{','.join([vid(o) for o in node.outputs])}[{attrs}]"
            )
        for v in graph.outputs:
            add(f"o{vid(v)}:{v.name}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class CheckerInstrument(Instrument):
    """After each pass that modified the model: ONNX checker plus strict shape inference.

    Also holds passes to their word: a pass that reports ``modified=False`` but changed
    the graph's structure is an error (a dishonest flag breaks fixed-point loops and
    the manifest).
    """

    def __init__(self, *, shape_inference: bool = True, check_modified_flag: bool = True):
        self.shape_inference = shape_inference
        self.check_modified_flag = check_modified_flag
        self._after: tuple[ir.Model, str] | None = None

    def before_pipeline(self, model):
        self._after = None

    def before_pass(self, pass_, record, model):
        if self.check_modified_flag:
            # The fingerprint after the previous pass is the one before this pass when the model is
            # the same object: instruments do not change the model (one fingerprint per pass, not two).
            if self._after is not None and self._after[0] is model:
                self._before = self._after[1]
            else:
                self._before = fingerprint(model)
            self._after = None

    def after_pass(self, pass_, record, model):
        if self.check_modified_flag:
            after = fingerprint(model)
            if not record.modified and after != self._before:
                raise VerificationError(
                    f"pass '{record.name}' reported modified=False but changed the graph", pass_name=record.name
                )
            self._after = (model, after)
        if not record.modified:
            return
        try:
            # The graph without its large weights (typed inputs instead): nothing of them is copied.
            proto = without_weights(model)
            if proto.ByteSize() >= PROTOBUF_LIMIT // 2:
                return  # huge constants inside nodes: checked once, on save
            onnx.checker.check_model(proto)
            if self.shape_inference:
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        except Exception as e:
            message = first_line(e)
            raise VerificationError(
                f"after pass '{record.name}' the model fails the ONNX checker: {message}", pass_name=record.name
            ) from None


def preserves_numerics(pass_: ir.passes.PassBase) -> bool:
    """A pass that declares its rewrites exact (``preserves_numerics = True``) and does not change the
    outputs on purpose: checked structurally after it, numerically at the end of its phase."""
    return bool(getattr(pass_, "preserves_numerics", False)) and not getattr(pass_, "changes_outputs", False)


class NumericDiffInstrument(Instrument):
    """Runs intermediate models on onnxruntime CPU and compares their outputs with the input model's.

    After a pass that may change the numbers: at once. After a pass that declares it preserves them
    (:func:`preserves_numerics`), the check waits for the end of the phase (or the next pass that
    changes the outputs on purpose); when that check fails, the passes since the last numeric check
    are re-run one by one from a snapshot of the model taken then (``Model.clone``: weights shared),
    each checked, and the first that breaks the outputs is named. ``defer=False``: every modified pass
    checked at once (as before issue 20). ``checks`` counts the runs made.
    """

    def __init__(self, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, atol: float, rtol: float,
                 defer: bool = True):
        self.feeds = dict(feeds)
        self.reference = dict(reference)
        self.atol = atol
        self.rtol = rtol
        self.defer = defer
        self.checks = 0
        self._pending: list[PassRecord] = []  # modified by numerics-preserving passes, not yet run
        self._snapshot: ir.Model | None = None  # the model as last verified (taken before a deferred pass)

    def before_pipeline(self, model):
        self._pending, self._snapshot = [], None

    def before_pass(self, pass_, record, model):
        if not self.defer:
            return
        if self._pending and getattr(pass_, "changes_outputs", False):
            self._check(model, None)  # a pass that re-baselines starts from outputs known to be right
        if self._snapshot is None and preserves_numerics(pass_):
            self._snapshot = model.clone()

    def after_pass(self, pass_, record, model):
        if record.modified:
            if self.defer and preserves_numerics(pass_):
                self._pending.append(record)
                record.extra["verification_deferred"] = True
            else:
                self._check(model, record)
        if self._pending and record.phase_end:
            self._check(model, None)

    def after_pipeline(self, model):
        if self._pending:
            self._check(model, None)

    def _outputs(self, model: ir.Model) -> dict[str, np.ndarray]:
        self.checks += 1
        return run(model, self.feeds, options=UNOPTIMIZED)

    def _check(self, model: ir.Model, record: PassRecord | None) -> None:
        """Check the model now; ``record``: the pass just run (None: a check of deferred passes)."""
        suspects = self._pending + ([record] if record is not None else [])
        try:
            outputs = self._outputs(model)
        except Exception as e:  # noqa: BLE001 - reported with the pass
            if len(suspects) > 1:
                self._bisect(suspects)
            last = suspects[-1]
            raise VerificationError(
                f"after pass '{last.name}' the model no longer runs on onnxruntime: {first_line(e)}", pass_name=last.name
            ) from None
        diffs = compare(self.reference, outputs, atol=self.atol, rtol=self.rtol, padded=padded_positions(self.feeds))
        if all(d.ok for d in diffs):
            suspects[-1].extra["verification"] = {d.name: d.to_json() for d in diffs}
            self._pending, self._snapshot = [], None
            return
        if len(suspects) > 1:
            self._bisect(suspects)
        self._raise(suspects[-1], diffs)

    def _raise(self, record: PassRecord, diffs, how: str = "") -> None:
        bad = [d for d in diffs if not d.ok]
        worst = max(bad, key=lambda d: d.max_abs)
        detail = f" ({worst.reason})" if worst.reason else ""
        raise VerificationError(
            f"outputs diverged after pass '{record.name}' (pass #{record.index + 1}{how}): output '{worst.name}' "
            f"max abs error {worst.max_abs:.3g}, max rel error {worst.max_rel:.3g}{detail} "
            f"exceeds atol={self.atol:g} rtol={self.rtol:g}",
            pass_name=record.name,
            report={d.name: d.to_json() for d in diffs},
        )

    def _bisect(self, suspects: list[PassRecord]) -> None:
        """Re-run ``suspects`` one by one from the snapshot, checking each: raise naming the first that
        breaks the outputs (or, if none does on its own, the check that failed)."""
        model = self._snapshot
        names = ", ".join(r.name for r in suspects)
        how = (f", phase '{suspects[-1].phase or 'extra'}': found by re-running the {len(suspects)} passes since "
               f"the last numeric check one by one")
        for record in suspects:
            pass_ = record.remake() if record.remake is not None else None
            if pass_ is None:
                break
            try:
                result = pass_(model)
            except Exception:  # noqa: BLE001 - it ran the first time: the replay is not the same run
                break
            model = result.model
            if not result.modified:
                continue
            try:
                outputs = self._outputs(model)
            except Exception as e:  # noqa: BLE001 - reported with the pass
                raise VerificationError(
                    f"after pass '{record.name}' the model no longer runs on onnxruntime{how}: {first_line(e)}",
                    pass_name=record.name,
                ) from None
            diffs = compare(self.reference, outputs, atol=self.atol, rtol=self.rtol, padded=padded_positions(self.feeds))
            if not all(d.ok for d in diffs):
                self._raise(record, diffs, how)
        last = suspects[-1]
        raise VerificationError(
            f"outputs diverged at the end of phase '{last.phase or 'extra'}' after passes {names}; re-running them one by "
            "one did not reproduce it (a pass whose result depends on more than its input model?)",
            pass_name=last.name,
        )
