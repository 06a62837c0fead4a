"""The phases of a compile, in order, over one :class:`Compilation` state.

``plan`` (before any work: options, target runtime, output folder, the pass pipeline) →
``load`` (resolve/export the model, input passes, decoder set-up, input shapes) →
``reference`` (verification inputs, the input model's outputs, run twice) →
``rewrite`` (the target's pipeline through the pass manager with its instruments) →
``precision`` (accuracy against fp32, the max-drop budget) →
``final_check`` (the compiled model under the target's own session) →
``assess`` (attention, approximation, placement, strict checks) →
``package`` (manifest and artifact). :func:`tfgraph.compile` runs :data:`PHASES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph import analysis
from tfgraph.deploy import runtime
from tfgraph import ir as tir
from tfgraph._version import __version__
from tfgraph.deploy.artifact import MANIFEST_SCHEMA_VERSION, Artifact, check_output_dir
from tfgraph.deploy.availability import ran_instead
from tfgraph.compiler.decoder import prepare as prepare_decoder
from tfgraph.errors import BadInputError, StrictError, VerificationError, first_line
from tfgraph.compiler.hf_files import deployment_files
from tfgraph.compiler.input_checks import (check_deterministic, check_input_shapes, check_target_runtime, pin_input_shapes,
                                  shapes_text)
from tfgraph.compiler.instruments import CheckerInstrument, NumericDiffInstrument, count_nodes
from tfgraph.compiler.compile_report import CompileClock
from tfgraph.compiler.options import CompileOptions
from tfgraph.compiler.pass_context import standard_context
from tfgraph.compiler.placement import placement
from tfgraph.passes.registry import PassSpec
from tfgraph.compiler.passmanager import PassManager
from tfgraph.compiler.precision_phase import finish_precision, prepare_precision
from tfgraph.compiler.rebaseline import RebaselineInstrument
from tfgraph.compiler.sources import APPROXIMATION_PASS, resolve_model, tokenizer_dir, versions, with_window_approximation
from tfgraph.targets import Provider, Target
from tfgraph.compiler.verify import (UNOPTIMIZED, check_feeds, compare, generate_inputs, load_inputs,
                                     padded_positions, resolve_shapes, run, unoptimized, within_kernel_numerics)


@dataclasses.dataclass
class Compilation:
    """Everything a compile knows, filled phase by phase."""

    profile: Target
    options: CompileOptions
    stack: contextlib.ExitStack
    out_path: pathlib.Path | None = None
    pipeline: list = dataclasses.field(default_factory=list)
    input_passes: list = dataclasses.field(default_factory=list)
    model: ir.Model | None = None
    source: dict = dataclasses.field(default_factory=dict)
    shapes: Mapping[str, Any] | None = None
    input_records: list = dataclasses.field(default_factory=list)
    generation: Any = None
    before: dict = dataclasses.field(default_factory=dict)
    feeds: dict | None = None
    reference: dict | None = None
    dense_reference: dict | None = None
    instruments: list = dataclasses.field(default_factory=list)
    numeric: NumericDiffInstrument | None = None
    manager: PassManager | None = None
    precision_state: dict | None = None
    precision_report: dict | None = None
    final: dict | None = None
    verification: dict = dataclasses.field(default_factory=lambda: {"passed": None, "skipped": True})
    warnings: list = dataclasses.field(default_factory=list)
    report: dict = dataclasses.field(default_factory=dict)
    clock: CompileClock = dataclasses.field(default_factory=CompileClock)

    def progress(self, stage: str, done: int = 0, total: int = 1) -> None:
        if self.options.progress:
            self.options.progress(stage, done, total)


def plan(profile: Target, options: CompileOptions, output, stack: contextlib.ExitStack) -> Compilation:
    """What can be refused before any work: the target's runtime, the output folder, the passes."""
    check_target_runtime(profile)
    c = Compilation(profile, options, stack, shapes=options.shapes)
    c.out_path = check_output_dir(output, force=options.force) if output is not None else None
    c.pipeline = list(profile.passes)
    if options.approximate_attention is not None:
        c.pipeline = with_window_approximation(c.pipeline, options.approximate_attention, profile.name)
    for item in options.extra_passes:
        if isinstance(item, str):
            item = PassSpec.parse(item)
        if isinstance(item, PassSpec):
            created = item.create()  # fail early on unknown names or bad options
            if getattr(created, "applies_to_input", False):
                c.input_passes.append(item)  # e.g. eval-mode: makes the input what verification compares against
                continue
        c.pipeline.append(item)
    return c


def load(c: Compilation, model) -> None:
    """The input model (exported first where needed), its input passes, and the shapes to run it at."""
    o = c.options
    c.model, c.source = resolve_model(model, c.stack, exporter=o.exporter, export_batch=o.export_batch,
                                      export_seq=o.export_seq, attention=o.attention, progress=o.progress, task=o.task)
    if c.input_passes:
        manager = PassManager(c.input_passes, instruments=[CheckerInstrument()])
        c.model = manager.run(c.model).model
        c.input_records = [r.to_json() for r in manager.records]
    c.generation = prepare_decoder(c.model, o.task, c.shapes, c.source, seed=o.seed, verify=o.verify)
    if c.generation is not None:
        c.shapes = c.generation.shapes
    if o.inputs is None:  # generated inputs: their shapes are checked before anything is allocated
        check_input_shapes(c.model, c.shapes, c.source)
    elif c.shapes:
        resolve_shapes(c.model, c.shapes)  # names and consistency, even where arrays are given
    if c.profile.static_shapes:
        pin_input_shapes(c.model, c.shapes, c.profile.name, o.inputs if isinstance(o.inputs, Mapping) else None)
    c.before = {"attention": analysis.attention_blocks(c.model), "nodes": count_nodes(c.model),
                "params": tir.parameter_count(c.model), "bytes": tir.model_bytes(c.model)}


def reference(c: Compilation) -> None:
    """Verification inputs and the input model's outputs on them (two runs must agree)."""
    o = c.options
    c.instruments = [CheckerInstrument()]
    if o.verify:
        if o.inputs is None:
            c.feeds = generate_inputs(c.model, c.shapes, seed=o.seed)
        elif isinstance(o.inputs, (str, os.PathLike)):
            c.feeds = load_inputs(o.inputs, c.model)
        else:
            c.feeds = check_feeds(o.inputs, c.model)
        c.progress("reference run")
        try:
            c.reference = run(c.model, c.feeds, options=UNOPTIMIZED)
            again = run(c.model, c.feeds, options=UNOPTIMIZED)
        except Exception as e:
            raise BadInputError(f"the input model does not run on onnxruntime CPU at "
                                f"{shapes_text(c.feeds)}: {first_line(e)}") from None
        check_deterministic(c.model, c.reference, again)
        tol = c.profile.tolerance
        c.numeric = NumericDiffInstrument(c.feeds, c.reference, atol=tol.atol, rtol=tol.rtol)
        # Pruning passes change the outputs on purpose: later passes are verified against the pruned model.
        c.instruments += [RebaselineInstrument(c.numeric, c.feeds), c.numeric]
    c.instruments.extend(o.instruments)
    if c.generation is not None:
        c.instruments.append(c.generation.tolerance(c.profile.tolerance.atol, c.profile.tolerance.rtol))
    c.dense_reference = c.reference  # before any pass that changes the outputs on purpose


def rewrite(c: Compilation) -> None:
    """The target's pipeline (precision passes bound to the calibration set) under the instruments."""
    o = c.options
    c.precision_state = prepare_precision(c.pipeline, c.profile, c.model, c.source, o.calibration, o.tokenizer,
                                          o.max_drop, o.inputs, c.feeds, c.shapes, o.seed, o.progress)
    pipeline = c.precision_state["pipeline"] if c.precision_state is not None else c.pipeline
    calibration = c.precision_state["calibration"] if c.precision_state is not None else None
    context = standard_context(calibration=calibration, progress=o.progress)
    c.manager = PassManager(pipeline, instruments=c.instruments, context=context, clock=c.clock,
                            progress=lambda done, total, name: c.progress(f"pass {name}", done, total))
    c.model = c.manager.run(c.model).model
    if o.verify:
        c.reference = c.numeric.reference


def precision(c: Compilation) -> None:
    """Accuracy against fp32 and the max-drop budget (reduced-precision targets only)."""
    if c.precision_state is not None:
        c.precision_report = finish_precision(c.precision_state, c.model, c.profile, c.options.max_drop, c.options.progress)
        if c.precision_report["max_drop"] and c.precision_report["max_drop"]["reverted"] and c.options.verify:
            c.reference = run(c.model, c.feeds, options=UNOPTIMIZED)
    left = analysis.stored_duplicates(c.model)
    if left:
        raise VerificationError(
            f"the compiled model stores {len(left)} initializer(s) more than once "
            f"({', '.join('/'.join(g.names[:3]) for g in left[:3])}): a pass left duplicates behind "
            "(add dedup-initializers to the target)"
        )


def final_check(c: Compilation) -> None:
    """The compiled model under the target's own session (or its standalone runtime) against the reference."""
    profile, feeds = c.profile, c.feeds
    if c.options.verify:
        c.progress("final verification")
        providers, unavailable = runtime.usable(profile.providers)
        providers = providers or [Provider(runtime.CPU)]
        standalone = runtime.standalone_runtime(profile)
        ran_on = [p.name for p in providers] if standalone is None else [standalone.NAME]
        try:
            if standalone is not None:  # the EP's own runtime, used directly (its EP cannot run here)
                c.final = standalone.run(c.model, feeds, profile)
            else:
                c.final = runtime.run(c.model, feeds, providers, options=profile.session_options)
        except Exception as e:
            raise VerificationError(
                f"the compiled model does not run with the target's session ({', '.join(ran_on)}): {first_line(e)}"
            ) from None
        tol = profile.tolerance
        diffs = compare(c.reference, c.final, atol=tol.atol, rtol=tol.rtol, padded=padded_positions(feeds))
        kernels = None
        if not all(d.ok for d in diffs) and standalone is None:
            kernels = _same_kernels(c, feeds, providers, tol)
            if kernels is not None:
                diffs = kernels["diffs"]
        c.verification = {
            "passed": all(d.ok for d in diffs),
            "skipped": False,
            "atol": tol.atol,
            "rtol": tol.rtol,
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
            "inputs_source": "generated" if c.options.inputs is None else "user",
            # Positions where the mask input is 0 carry no defined value (see verify.compare).
            "padded_positions_excluded": _count(padded_positions(feeds)),
            "outputs": {d.name: d.to_json() for d in diffs},
            "session": {"providers": ran_on, "options": dict(profile.session_options)},
            # Providers of the profile that cannot run here: verified on the others (the same graph).
            "providers_unavailable": unavailable,
        }
        if kernels is not None:
            c.verification["kernel_numerics"] = kernels["report"]
        if not c.verification["passed"]:
            worst = max((d for d in diffs if not d.ok), key=lambda d: d.max_abs)
            raise VerificationError(
                f"the compiled model diverges under the target's session ({', '.join(ran_on)}, "
                f"{dict(profile.session_options)}): output '{worst.name}' max abs error {worst.max_abs:.3g}",
                report=c.verification,
            )
        if any("output_change" in r.extra for r in c.manager.records):  # a pass changed the outputs on purpose
            # The checks above follow the model as those passes left it; this is the end-to-end change
            # against the input model, reported (the precision section judges it against the budget).
            against_input = compare(c.dense_reference, c.final, atol=tol.atol, rtol=tol.rtol,
                                    padded=padded_positions(feeds))
            c.verification["vs_input"] = {d.name: {"max_abs": d.max_abs, "max_rel": d.max_rel,
                                                   "within_tolerance": d.ok} for d in against_input}
        if c.generation is not None and standalone is None:
            c.generation.final_check(c.model, providers, profile.session_options)
    instead = ran_instead(profile, verified=c.options.verify)  # the target's EPs missing here: said in one line
    if instead:
        c.verification["ran_on_instead"] = instead


def assess(c: Compilation) -> None:
    """Attention fused, the approximation's cost, placement, opset: warnings, or errors with ``strict``."""
    o, profile = c.options, c.profile
    after = analysis.attention_blocks(c.model)
    before = c.before["attention"]
    attention = {"found": before["unfused"] + before["fused"], "fused": after["fused"], "unfused": after["unfused"],
                 "fused_ops": after["fused_ops"]}
    approximation = None
    if o.approximate_attention is not None:
        record = next(r for r in c.manager.records if r.name == APPROXIMATION_PASS)
        from tfgraph.compiler.precision import accuracy

        change = accuracy(c.dense_reference, c.final)
        approximation = {"attention": o.approximate_attention, "options": dict(record.options),
                         "blocks": record.extra.get("rules", {}), "output_change_vs_dense": change,
                         "inputs_source": "generated" if o.inputs is None else "user"}
        c.warnings.append(
            f"APPROXIMATION: attention restricted to {o.approximate_attention}; outputs changed vs the dense model: "
            + ", ".join(f"{k} cosine {v['cosine']:.6f} (worst row {v['row_cosine_min']:.6f}), max abs {v['max_abs']:.3g}"
                        for k, v in change.items())
            + ("" if o.inputs is not None else " (on generated inputs: pass --inputs with real data for a meaningful figure)")
        )
    if c.precision_report is not None:
        c.warnings.extend(c.precision_report.pop("warnings"))
    c.progress("placement")
    place = placement(c.model, profile)
    if not o.verify:
        place.unverified = _load_check(c.model, profile)
    if place.unexpected:
        ops = sorted({runtime.op_name(n) for n in place.unexpected})
        c.warnings.append(f"{len(place.unexpected)} node(s) fall back to CPU on {profile.name} ({place.source}): "
                          f"{', '.join(ops[:8])}")
        if o.strict:
            raise StrictError(f"--strict: {c.warnings[-1]}")
    opset = c.model.opset_imports.get("", None)
    if opset is not None and not profile.opset[0] <= opset <= profile.opset[1]:
        raise VerificationError(f"the compiled model imports ai.onnx opset {opset}, outside {profile.name}'s range "
                                f"{profile.opset[0]}..{profile.opset[1]}")
    if attention["unfused"]:
        c.warnings.append(f"partial attention fusion: {attention['unfused']} of {attention['found']} attention blocks "
                          "left unfused (see the fuse-attention near miss in the manifest)")
        if o.strict:
            raise StrictError(f"--strict: {c.warnings[-1]}")
    c.report = {"attention": attention, "approximation": approximation, "placement": place.to_json()}


def _same_kernels(c: Compilation, feeds: Mapping[str, np.ndarray], providers, tol) -> dict | None:
    """When the target's session diverges from the reference: whether the deployed kernels themselves
    compute differently (verification sessions share their weights and do not prepack, so e.g.
    MatMulNBits computes in float there and with int8 activations, accuracy level 4, when deployed) or
    onnxruntime's graph optimizations broke the model. The model runs again with the target's providers
    and prepacked kernels but no graph optimization; if the optimized run matches that one and that one
    stays within the kernels' numerics of the reference (:func:`~tfgraph.compiler.verify.within_kernel_numerics`),
    the difference is reported (the precision section measures it against fp32) and the check passes on
    that comparison, else None (the divergence stands)."""
    try:
        same = runtime.run(c.model, feeds, providers, options=unoptimized(c.profile.session_options))
    except Exception:  # noqa: BLE001 - the original divergence is reported instead
        return None
    padded = padded_positions(feeds)
    against_optimized = compare(same, c.final, atol=tol.atol, rtol=tol.rtol, padded=padded)
    against_reference = compare(c.reference, same, atol=tol.atol, rtol=tol.rtol, padded=padded)
    if not all(d.ok for d in against_optimized) or not within_kernel_numerics(against_reference):
        return None  # a broken optimization, or too far from the reference to be another arithmetic's rounding
    return {"diffs": against_optimized, "report": {
        "note": "the deployed kernels (prepacked, no graph optimization) differ from the verification "
                "sessions' float kernels; the optimized graph matches them",
        "vs_reference": {d.name: {"max_abs": d.max_abs, "max_rel": d.max_rel, "relative_rms": d.relative_rms}
                         for d in against_reference}}}


def package(c: Compilation) -> Artifact:
    """The manifest and the artifact (written when an output was given)."""
    scratch = pathlib.Path(c.stack.enter_context(tempfile.TemporaryDirectory(prefix="tfgraph-files-")))
    files, tokenizer_section, notes = deployment_files(tokenizer_dir(c.source), c.model, scratch)
    files.update(c.generation.files(c.model) if c.generation is not None else {})  # genai_config.json
    profile, model, before = c.profile, c.model, c.before
    manifest: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "tfgraph_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": c.source,
        "target": profile.name,
        "profile": profile.to_json(),
        "options": {**c.options.to_json(c.source.get("kind")),
                    "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in (c.shapes or {}).items()}},
        "input_passes": c.input_records,
        "passes": [r.to_json() for r in c.manager.records],
        "verification": c.verification,
        "attention": c.report["attention"],
        "approximation": c.report["approximation"],
        "precision": c.precision_report,
        "placement": c.report["placement"],
        "runtime_precision": _runtime_precision(profile),
        "tokenizer": tokenizer_section,
        "generation": c.generation.report(model) if c.generation is not None else None,
        "warnings": c.warnings,
        "notes": notes,
        "providers": [p.to_json() for p in profile.providers],
        "session_options": dict(profile.session_options),
        "summary": {"nodes_before": before["nodes"], "nodes_after": count_nodes(model), "params_before": before["params"],
                    "params_after": tir.parameter_count(model), "bytes_before": before["bytes"],
                    "bytes_after": tir.model_bytes(model)},
        "weights": analysis.weights_report(model, before["bytes"]),
        "versions": versions(),
        # What the compile cost, per step and per target phase (the package step itself not included).
        "compile": c.clock.report(numeric_checks=c.numeric.checks if c.numeric is not None else 0),
    }
    artifact = Artifact(model, manifest, files=files)
    if c.out_path is not None:
        c.progress("write artifact")
        artifact.save(c.out_path, force=c.options.force, external_data_threshold=c.options.external_data_threshold)
        c.progress("write artifact", 1, 1)
    return artifact


# The driver runs these in order between plan() (refusals before any work) and package().
PHASES = (reference, rewrite, precision, final_check, assess)


def _count(mask: np.ndarray | None) -> int:
    return 0 if mask is None else int(np.count_nonzero(mask))


def _runtime_precision(profile: Target) -> dict | None:
    """The precision the target's runtime really computes in, where it can differ from the request
    (the standalone-runtime module of the target's EP answers; None where it has no such probe)."""
    if profile.standalone_runtime is None:
        return None
    probe = getattr(importlib.import_module(profile.standalone_runtime), "runtime_precision", None)
    return probe(profile) if probe is not None else None


def _load_check(model_ir: ir.Model, profile: Target) -> str:
    """Without verification, still make sure the artifact loads where the target's providers run
    here; the placement is then what onnxruntime assigned, but the outputs were never checked."""
    providers, missing = runtime.usable(profile.providers)
    if missing and not [p for p in providers if p.name != runtime.CPU] and profile.providers[0].name != runtime.CPU:
        return (f"placement unverified (--no-verify, and {', '.join(missing)} cannot run here): "
                "the artifact was not loaded")
    try:
        runtime.session(model_ir, providers or [Provider(runtime.CPU)], options=profile.session_options)
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        raise VerificationError(f"the compiled model does not load on onnxruntime "
                                f"({', '.join(p.name for p in providers) or runtime.CPU}): {first_line(e)}") from None
    return "outputs unverified (--no-verify): the artifact loads, but its numbers were not compared with the input model"
