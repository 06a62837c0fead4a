"""The pass manager: runs passes in order, with instruments around each one."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from tfgraph.errors import PassFailedError, TfgraphError, first_line
from tfgraph.compiler.instruments import Instrument, PassRecord, TimingInstrument
from tfgraph.passes.context import PassContext, active
from tfgraph.passes.registry import PassSpec


def _name_of(pass_: ir.passes.PassBase) -> str:
    return getattr(pass_, "pass_name", None) or type(pass_).__name__


def _call(pass_: ir.passes.PassBase, model: ir.Model, name: str, index: int, total: int) -> ir.passes.PassResult:
    """Run one pass; an exception or a broken contract becomes an error that names the registered
    pass and its position (tfgraph's own errors pass through unchanged)."""
    where = f"pass '{name}' (#{index + 1} of {total})"
    try:
        result = pass_(model)
    except TfgraphError:
        raise
    except SystemExit as e:  # a pass must not end the process: an exit 0 with no artifact would be a lie
        raise PassFailedError(f"{where} called sys.exit({e.code})", pass_name=name, index=index) from None
    except Exception as e:  # noqa: BLE001 - reported with the pass that raised it
        raise PassFailedError(f"{where} raised {type(e).__name__}: {first_line(e)}", pass_name=name, index=index) from e
    if not isinstance(result, ir.passes.PassResult):
        raise PassFailedError(f"{where} returned {type(result).__name__}, not onnx_ir.passes.PassResult",
                              pass_name=name, index=index)
    return result


class PassManager:
    """Run a pipeline of passes over an onnx_ir model with instruments.

    ``passes`` are :class:`PassSpec` (registered name + options) or pass instances.
    The manager always times passes; other instruments (checker, numeric diff, your
    own) are given by the caller. After the run, :attr:`records` holds one
    :class:`PassRecord` per pass.
    """

    def __init__(
        self,
        passes: Sequence[PassSpec | ir.passes.PassBase],
        *,
        instruments: Sequence[Instrument] = (),
        progress: Callable[[int, int, str], None] | None = None,
        context: PassContext | None = None,
        clock=None,
    ):
        self.specs = list(passes)
        self.context = context  # what the passes need from outside the graph (None: the default context)
        self.clock = clock  # a compile_report.CompileClock: time and peak memory per phase (None: not measured)
        self.instruments = [TimingInstrument(), *instruments]
        self.progress = progress
        self.records: list[PassRecord] = []

    def _instantiate(self, item: PassSpec | ir.passes.PassBase) -> tuple[ir.passes.PassBase, str, dict, str]:
        if isinstance(item, PassSpec):
            return item.create(), item.name, dict(item.options), item.phase
        if isinstance(item, ir.passes.PassBase):
            return item, _name_of(item), {}, ""
        raise TypeError(f"not a pass or PassSpec: {item!r}")

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        with active(self.context) if self.context is not None else contextlib.nullcontext():
            return self._run(model)

    def _run(self, model: ir.Model) -> ir.passes.PassResult:
        self.records = []
        passes = [self._instantiate(item) for item in self.specs]
        for instrument in self.instruments:
            instrument.before_pipeline(model)
        any_modified = False
        timing, checks = self.instruments[0], self.instruments[1:]
        current = None  # the clock's entry of the phase running
        try:
            for index, (pass_, name, options, phase) in enumerate(passes):
                if self.clock is not None and (current is None or current["name"] != (phase or "extra")):
                    if current is not None:
                        self.clock.end_phase(current)
                    current = self.clock.begin_phase(phase or "extra")
                record = PassRecord(index=index, name=name, options=options, phase=phase)
                # What a check that fails at a phase boundary needs to re-run the pass on its own.
                record.phase_end = index + 1 == len(passes) or passes[index + 1][3] != phase
                record.remake = self._remake(self.specs[index], pass_)
                model, modified = self._one(index, len(passes), pass_, record, model, timing, checks)
                any_modified |= modified
                if current is not None:
                    current["passes"] += 1
                    current["modified"] += int(modified)
                    current["passes_s"] += record.time_s
                    current["checks_s"] += record.check_s
        finally:
            if current is not None:
                self.clock.end_phase(current)
        if self.progress:
            self.progress(len(passes), len(passes), "done")
        for instrument in self.instruments:
            instrument.after_pipeline(model)
        return ir.passes.PassResult(model, any_modified)

    def _remake(self, item, pass_):
        return item.create if isinstance(item, PassSpec) else (lambda: pass_)

    def _one(self, index, total, pass_, record, model, timing, checks):
        """One pass with its instruments: checks first, then the clock, before; the clock, then checks, after."""
        name = record.name
        if self.progress:
            self.progress(index, total, name)
        self.records.append(record)
        start = time.perf_counter()
        for instrument in checks:
            instrument.before_pass(pass_, record, model)
        record.check_s = time.perf_counter() - start
        timing.before_pass(pass_, record, model)
        result = _call(pass_, model, name, index, total)
        if not pass_.in_place:
            model = result.model
        record.modified = bool(result.modified)
        report = getattr(pass_, "report", None)
        if report and all(isinstance(v, dict) and "matches" in v for v in report.values()):
            record.extra["rules"] = report  # rule passes: per-rule match counts and near misses
        elif report:
            record.extra["report"] = report  # other passes' own accounts (e.g. what was quantized)
        # Timing first (it closes the clock), then the checks, in the order given.
        timing.after_pass(pass_, record, model)
        start = time.perf_counter()
        for instrument in checks:
            instrument.after_pass(pass_, record, model)
        record.check_s += time.perf_counter() - start
        return model, record.modified
