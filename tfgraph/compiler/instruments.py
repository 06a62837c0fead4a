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
from tfgraph.ir import PROTOBUF_LIMIT, graphs, model_bytes, parameter_count, to_proto
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
        if model_bytes(model) >= PROTOBUF_LIMIT // 2:
            return  # checking needs a serialized proto; large models are checked once, on save
        proto = to_proto(model)
        try:
            onnx.checker.check_model(proto)
            if self.shape_inference:
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        except Exception as e:
            message = first_line(e)
            raise VerificationError(
                f"after pass '{record.name}' the model fails the ONNX checker: {message}", pass_name=record.name
            ) from None


class NumericDiffInstrument(Instrument):
    """Runs every intermediate model on onnxruntime CPU and compares its outputs with the input model's.

    The first pass after which an output leaves the tolerance is named in the error,
    with the output and the size of the divergence.
    """

    def __init__(self, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, atol: float, rtol: float):
        self.feeds = dict(feeds)
        self.reference = dict(reference)
        self.atol = atol
        self.rtol = rtol

    def after_pass(self, pass_, record, model):
        if not record.modified:
            return
        try:
            outputs = run(model, self.feeds, options=UNOPTIMIZED)
        except Exception as e:
            message = first_line(e)
            raise VerificationError(
                f"after pass '{record.name}' the model no longer runs on onnxruntime: {message}", pass_name=record.name
            ) from None
        diffs = compare(self.reference, outputs, atol=self.atol, rtol=self.rtol, padded=padded_positions(self.feeds))
        record.extra["verification"] = {d.name: d.to_json() for d in diffs}
        bad = [d for d in diffs if not d.ok]
        if bad:
            worst = max(bad, key=lambda d: d.max_abs)
            detail = f" ({worst.reason})" if worst.reason else ""
            raise VerificationError(
                f"outputs diverged after pass '{record.name}' (pass #{record.index + 1}): output '{worst.name}' "
                f"max abs error {worst.max_abs:.3g}, max rel error {worst.max_rel:.3g}{detail} "
                f"exceeds atol={self.atol:g} rtol={self.rtol:g}",
                pass_name=record.name,
                report={d.name: d.to_json() for d in diffs},
            )
