"""``tfgraph.compile``: model in, verified artifact out."""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from tfgraph import ir as tir
from tfgraph._version import __version__
from tfgraph.artifact import MANIFEST_SCHEMA_VERSION, Artifact, check_output_dir
from tfgraph.availability import ran_instead
from tfgraph.decoder import prepare as prepare_decoder
from tfgraph import analysis, runtime
from tfgraph.errors import BadInputError, StrictError, VerificationError, first_line
from tfgraph.hf_files import deployment_files
from tfgraph.input_checks import check_deterministic, check_input_shapes, check_target_runtime, shapes_text
from tfgraph.instruments import CheckerInstrument, Instrument, NumericDiffInstrument, count_nodes
from tfgraph.passes.registry import PassSpec
from tfgraph.passmanager import PassManager
from tfgraph.prune import RebaselineInstrument
from tfgraph.targets import Provider, Target, get_target
from tfgraph.verify import (UNOPTIMIZED, check_feeds, compare, generate_inputs, load_inputs, padded_positions,
                            resolve_shapes, run)

Progress = Callable[[str, int, int], None]


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "tfgraph": __version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def resolve_model(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    stack: contextlib.ExitStack,
    *,
    exporter: str = "dynamo",
    export_batch: int = 2,
    export_seq: int = 16,
    attention: str | None = None,
    progress: Progress | None = None,
    task: str | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Turn what the user gave into an onnx_ir model plus a description of its source for the manifest."""
    if isinstance(model, ir.Model):
        return model, {"source": "onnx_ir.Model", "sha256": None}
    if isinstance(model, onnx.ModelProto):
        import hashlib

        data = model.SerializeToString()
        return ir.serde.deserialize_model(model), {"source": "onnx.ModelProto", "sha256": hashlib.sha256(data).hexdigest()}
    path = pathlib.Path(model)
    from tfgraph import models as builtin

    looks_like_file = path.suffix == ".onnx" or path.exists() or os.sep in str(model)
    if path.is_dir() and builtin.is_hf_dir(path):
        source = {"source": str(path), "kind": "huggingface"}
    elif path.is_dir() and (path / "manifest.json").is_file() and (path / "model.onnx").is_file():
        loaded = tir.load(path / "model.onnx")  # a tfgraph artifact: its model
        return loaded.model, {**loaded.input_hashes(), "artifact": str(path)}
    elif path.is_dir():
        found = sorted(p.name for p in path.iterdir())[:6]
        raise BadInputError(
            f"{path}: is a directory but not a model: no config.json with weights (model.safetensors / pytorch_model.bin) "
            f"for a Hugging Face checkpoint, and no model.onnx + manifest.json of a tfgraph artifact "
            f"({'it holds ' + ', '.join(found) if found else 'it is empty'}); give an .onnx file or such a folder"
        )
    elif looks_like_file:
        loaded = tir.load(path)
        return loaded.model, loaded.input_hashes()
    elif str(model) in builtin.list_models():
        source = {"source": str(model), "kind": "builtin"}
    else:
        raise BadInputError(
            f"'{model}' is neither a model file nor a built-in model; built-in models: {', '.join(builtin.list_models())}"
        )
    from tfgraph.export import export

    tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tfgraph-export-")))
    if progress:
        progress(f"export {model} ({exporter})", 0, 1)
    onnx_path = export(
        str(model), tmp / "model.onnx", exporter=exporter, batch=export_batch, seq=export_seq, attention=attention,
        task=task,
    )
    if progress:
        progress(f"export {model} ({exporter})", 1, 1)
    loaded = tir.load(onnx_path)
    source.update({"exporter": exporter, "attention": attention, "export_shape": {"batch": export_batch, "sequence": export_seq}})
    source.update({"sha256": loaded.input_hashes()["sha256"]})
    return loaded.model, source


APPROXIMATION_PASS = "approximate-attention-window"


def _with_window_approximation(pipeline: list, spec: str, target_name: str) -> list:
    """Insert the (opt-in) attention window approximation right after mask classification."""
    from tfgraph.passes.attention_window_approximation import parse_window_spec

    options = parse_window_spec(spec)
    names = [item.name if isinstance(item, PassSpec) else getattr(item, "pass_name", "") for item in pipeline]
    anchor = "classify-attention-masks"
    if anchor not in names:
        raise BadInputError(
            f"--attention {spec}: target '{target_name}' does not fuse and classify attention, so it cannot window it"
        )
    at = names.index(anchor) + 1
    return pipeline[:at] + [PassSpec(APPROXIMATION_PASS, options)] + pipeline[at:]


def _tokenizer_dir(source: Mapping[str, Any]) -> str | None:
    if source.get("kind") == "huggingface":
        return source["source"]
    if source.get("kind") == "builtin" and source.get("source") == "minilm":
        from tfgraph.models import minilm_path

        return str(minilm_path())
    return None


def _prepare_precision(pipeline, profile, model_ir, source, calibration, tokenizer, max_drop, inputs, feeds, shapes, seed,
                       progress) -> dict | None:
    """Bind the calibration set to the passes that use it, and run the fp32 model on it (the
    accuracy reference) before the pipeline changes the model."""
    import warnings as _warnings

    from tfgraph import calibration as cal
    from tfgraph.passes.registry import get_pass_class

    uses = [i for i, item in enumerate(pipeline)
            if isinstance(item, PassSpec) and getattr(get_pass_class(item.name), "uses_calibration", False)]
    if not uses and profile.quantization is None and max_drop is None:
        return None
    notes = []
    if calibration is None and inputs is not None and feeds is not None:
        calib = cal.CalibrationSet([dict(feeds)], "verification inputs")
    elif calibration is None:
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            calib = cal.load_calibration(None, model_ir, shapes=shapes, seed=seed)
        notes += [str(w.message) for w in caught]
    else:
        # A pinned graph (static-shape target) takes only its own batch and sequence sizes.
        calib = cal.load_calibration(calibration, model_ir, tokenizer=tokenizer or _tokenizer_dir(source),
                                     static=profile.static_shapes)
    if progress:
        progress("fp32 reference on calibration inputs", 0, 1)
    fp32 = [run(model_ir, batch, options=UNOPTIMIZED) for batch in calib.batches]
    pipeline = list(pipeline)
    bound = []
    for i in uses:
        spec = pipeline[i]
        instance = get_pass_class(spec.name)(**dict(spec.options), calibration=calib, progress=progress)
        pipeline[i] = _BoundSpec(spec.name, spec.options)
        object.__setattr__(pipeline[i], "instance", instance)
        bound.append(instance)
    return {"pipeline": pipeline, "calibration": calib, "fp32": fp32, "passes": bound, "notes": notes}


class _BoundSpec(PassSpec):
    """A PassSpec whose pass was created ahead (bound to the calibration set): the manifest keeps
    its name and options."""

    def create(self):
        return self.instance


def _finish_precision(state, model_ir, profile, max_drop, progress) -> dict:
    from tfgraph import precision

    calib = state["calibration"]
    providers = runtime.usable(profile.providers)[0] or [Provider(runtime.CPU)]

    def evaluate(model):
        outs = [runtime.run(model, batch, providers, options=profile.session_options) for batch in calib.batches]
        return precision.accuracy(state["fp32"], outs)

    records: dict = {}
    passes = []
    for instance in state["passes"]:
        records.update(getattr(instance, "quantized", {}))
        report = dict(getattr(instance, "report", {}) or {})
        passes.append({"pass": getattr(instance, "pass_name", type(instance).__name__), **report})
    budget_value = max_drop if max_drop is not None else (1.0 - profile.min_cosine if profile.min_cosine is not None else None)
    budget_report = None
    if budget_value is not None and records:
        half = bool(profile.quantization is not None and profile.quantization.revert_weights_float16)
        budget_report = precision.budget(model_ir, records, evaluate, budget_value, weights_float16=half,
                                         progress=progress)
    acc = evaluate(model_ir)
    warnings = list(state["notes"])
    if budget_report is not None and not budget_report["met"]:
        warnings.append(f"accuracy budget not met: 1 - cosine = {1 - budget_report['final_score']:.4g} > max drop "
                        f"{budget_value:.4g} after reverting {len(budget_report['reverted'])} node(s)")
    if budget_report is not None and budget_report["reverted"]:
        warnings.append(f"max-drop {budget_value:.4g}: reverted {len(budget_report['reverted'])} quantized node(s) to float: "
                        + ", ".join(budget_report["reverted"]))
    if any(not r["finite"] for r in acc.values()):
        raise VerificationError("the reduced-precision model produces NaN/Inf on the calibration inputs",
                                report={"accuracy_vs_fp32": acc})
    return {
        "precision": profile.precision,
        "quantization": profile.quantization.to_json() if profile.quantization is not None else None,
        "calibration": calib.to_json(),
        "passes": passes,
        "accuracy_vs_fp32": acc,
        "score": precision.score(acc),
        "score_definition": "mean sentence-embedding cosine of (batch, dim) outputs if any, else the worst flattened cosine",
        "max_drop": budget_report,
        "warnings": warnings,
    }


def _count(mask: np.ndarray | None) -> int:
    return 0 if mask is None else int(np.count_nonzero(mask))


def pin_input_shapes(model: ir.Model, shapes: Mapping[str, Any] | None, target: str,
                     feeds: Mapping[str, np.ndarray] | None = None) -> None:
    """Fix every graph input's shape for a static-shape target, from ``shapes`` (whole shapes by input
    name, ``{"input_ids": (1, 128)}``, or sizes of symbolic dimensions, ``{"sequence": 128}``) or the
    given input arrays; fails naming each input left with a dynamic dimension."""
    from tfgraph.passes.static_shapes import pin_input_shapes as pin

    shapes = dict(shapes or {})
    if feeds is not None:  # given input arrays fix the shapes of inputs --shape does not name
        shapes = {**{k: tuple(np.shape(v)) for k, v in feeds.items()}, **shapes}
    pin(model.graph, shapes)
    missing = []
    for value in model.graph.inputs:
        if value.shape is None:
            missing.append(f"'{value.name}' (rank unknown)")
            continue
        unknown = [str(getattr(d, "value", None) or f"axis {i}") for i, d in enumerate(value.shape) if not isinstance(d, int)]
        if unknown:
            missing.append(f"'{value.name}' ({', '.join(unknown)})")
    if missing:
        example = missing[0].split("'")[1]
        raise BadInputError(
            f"target '{target}' needs static shapes: input {', '.join(missing)} has dynamic dimensions; "
            f"give them with --shape (e.g. --shape {example}=1x128)"
        )


def _runtime_precision(profile: Target) -> dict | None:
    """The precision the target's runtime really computes in, where it can differ from the request
    (the standalone-runtime module of the target's EP answers; None where it has no such probe)."""
    if profile.standalone_runtime is None:
        return None
    import importlib

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


def compile(  # noqa: A001 - the product's verb
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    target: str | Target = "cpu-fp32",
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    verify: bool = True,
    strict: bool = False,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Any] | None = None,
    seed: int = 0,
    extra_passes: Sequence[str | PassSpec | ir.passes.PassBase] = (),
    instruments: Sequence[Instrument] = (),
    exporter: str = "dynamo",
    export_batch: int = 2,
    export_seq: int = 16,
    attention: str | None = None,
    approximate_attention: str | None = None,
    external_data_threshold: int = tir.DEFAULT_EXTERNAL_DATA_THRESHOLD,
    progress: Progress | None = None,
    calibration: Any = None,
    tokenizer: str | os.PathLike | None = None,
    max_drop: float | None = None,
    task: str | None = None,
) -> Artifact:
    """Compile ``model`` for ``target`` and return the :class:`Artifact` (written to ``output`` if given).

    ``model`` is an ``.onnx`` path, a built-in model name (exported first with
    ``exporter``; ``attention`` picks eager or SDPA attention for Hugging Face models;
    ``approximate_attention="window=N[,global=G]"`` restricts attention to a local window —
    an approximation, reported with its output change against the dense model), a local Hugging Face folder, or an in-memory ``onnx_ir.Model`` /
    ``onnx.ModelProto``. With ``verify`` (the default) every pass is checked
    numerically against the input model on ``inputs`` (an ``.npz`` path or a dict of
    arrays) or on inputs generated from the graph's signature at ``shapes``; the first
    pass that breaks the outputs raises :class:`VerificationError`. ``extra_passes``
    run after the target's pipeline (registered names, ``name:key=value`` strings,
    :class:`PassSpec` or pass instances). With ``strict``, attention blocks left
    unfused raise :class:`StrictError` (exit 1) instead of a warning in the manifest.

    Reduced precision (targets with a ``quantization`` scheme, passes that use calibration, or
    ``max_drop``): ``calibration`` is an ``.npz`` of feeds, a ``.txt`` of sentences (tokenized with
    ``tokenizer``, by default the model's own folder for Hugging Face / built-in models), a dict of
    arrays, or None (the verification inputs if given, else generated inputs, with a warning). The
    manifest's ``precision`` section reports the output change against the fp32 input model on the
    calibration inputs (max abs, cosine, sentence-embedding cosine), and ``max_drop`` (default:
    ``1 - target.min_cosine``) reverts the most harmful quantized nodes to float until
    ``1 - cosine <= max_drop``.

    ``task="text-generation"``: a causal LM with its KV cache (exported with one from a Hugging Face
    folder; an ``.onnx`` must have one), verified on a prompt and decode steps (:mod:`tfgraph.decoder`);
    the manifest's ``generation`` section is what :func:`tfgraph.load_generator` reads.
    """
    profile = get_target(target)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise BadInputError(f"--seed {seed}: a seed is an integer from 0 to {2**32 - 1}")
    check_target_runtime(profile)
    out_path = check_output_dir(output, force=force) if output is not None else None
    pipeline: list[PassSpec | ir.passes.PassBase] = list(profile.passes)
    if approximate_attention is not None:
        if not verify:
            raise BadInputError("an attention approximation needs verification on: it measures the output change")
        pipeline = _with_window_approximation(pipeline, approximate_attention, profile.name)
    input_passes: list = []
    for item in extra_passes:
        if isinstance(item, str):
            item = PassSpec.parse(item)
        if isinstance(item, PassSpec):
            created = item.create()  # fail early on unknown names or bad options
            if getattr(created, "applies_to_input", False):
                input_passes.append(item)  # e.g. eval-mode: makes the input model what verification compares against
                continue
        pipeline.append(item)

    with contextlib.ExitStack() as stack:
        model_ir, source = resolve_model(
            model,
            stack,
            exporter=exporter,
            export_batch=export_batch,
            export_seq=export_seq,
            attention=attention,
            progress=progress,
            task=task,
        )
        input_records = []
        if input_passes:
            input_manager = PassManager(input_passes, instruments=[CheckerInstrument()])
            model_ir = input_manager.run(model_ir).model
            input_records = [r.to_json() for r in input_manager.records]
        generation = prepare_decoder(model_ir, task, shapes, source, seed=seed, verify=verify)  # KV-cache decoders
        if generation is not None:
            shapes = generation.shapes
        if inputs is None:  # generated inputs: their shapes are checked before anything is allocated
            check_input_shapes(model_ir, shapes, source)
        elif shapes:
            resolve_shapes(model_ir, shapes)  # names and consistency, even where arrays are given
        if profile.static_shapes:
            pin_input_shapes(model_ir, shapes, profile.name, inputs if isinstance(inputs, Mapping) else None)
        attention_before = analysis.attention_blocks(model_ir)
        nodes_before = count_nodes(model_ir)
        params_before = tir.parameter_count(model_ir)
        bytes_before = tir.model_bytes(model_ir)

        feeds: dict[str, np.ndarray] | None = None
        reference: dict[str, np.ndarray] | None = None
        all_instruments: list[Instrument] = [CheckerInstrument()]
        if verify:
            if inputs is None:
                feeds = generate_inputs(model_ir, shapes, seed=seed)
            elif isinstance(inputs, (str, os.PathLike)):
                feeds = load_inputs(inputs, model_ir)
            else:
                feeds = check_feeds(inputs, model_ir)
            if progress:
                progress("reference run", 0, 1)
            try:
                reference = run(model_ir, feeds, options=UNOPTIMIZED)
                again = run(model_ir, feeds, options=UNOPTIMIZED)
            except Exception as e:
                raise BadInputError(f"the input model does not run on onnxruntime CPU at "
                                    f"{shapes_text(feeds)}: {first_line(e)}") from None
            check_deterministic(model_ir, reference, again)
            numeric = NumericDiffInstrument(feeds, reference, atol=profile.tolerance.atol, rtol=profile.tolerance.rtol)
            # Pruning passes change the outputs on purpose: later passes are verified against the pruned model.
            all_instruments += [RebaselineInstrument(numeric, feeds), numeric]
        all_instruments.extend(instruments)
        if generation is not None:
            all_instruments.append(generation.tolerance(profile.tolerance.atol, profile.tolerance.rtol))

        def pass_progress(done: int, total: int, name: str) -> None:
            if progress:
                progress(f"pass {name}", done, total)

        dense_reference = reference  # before any pass that changes the outputs on purpose
        precision_state = _prepare_precision(
            pipeline, profile, model_ir, source, calibration, tokenizer, max_drop, inputs, feeds, shapes, seed, progress
        )
        if precision_state is not None:
            pipeline = precision_state["pipeline"]
        manager = PassManager(pipeline, instruments=all_instruments, progress=pass_progress)
        model_ir = manager.run(model_ir).model
        if verify:
            reference = numeric.reference
        precision_report = None
        if precision_state is not None:
            precision_report = _finish_precision(precision_state, model_ir, profile, max_drop, progress)
            if precision_report["max_drop"] and precision_report["max_drop"]["reverted"] and verify:
                reference = run(model_ir, feeds, options=UNOPTIMIZED)
        left = analysis.stored_duplicates(model_ir)
        if left:
            raise VerificationError(
                f"the compiled model stores {len(left)} initializer(s) more than once "
                f"({', '.join('/'.join(g.names[:3]) for g in left[:3])}): a pass left duplicates behind "
                "(add dedup-initializers to the target)"
            )

        verification: dict[str, Any] = {"passed": None, "skipped": True}
        if verify:
            assert feeds is not None and reference is not None
            if progress:
                progress("final verification", 0, 1)
            providers, unavailable = runtime.usable(profile.providers)
            providers = providers or [Provider(runtime.CPU)]
            standalone = runtime.standalone_runtime(profile)
            ran_on = [p.name for p in providers] if standalone is None else [standalone.NAME]
            try:
                if standalone is not None:  # the EP's own runtime, used directly (its EP cannot run here)
                    final = standalone.run(model_ir, feeds, profile)
                else:
                    final = runtime.run(model_ir, feeds, providers, options=profile.session_options)
            except Exception as e:
                message = first_line(e)
                raise VerificationError(
                    f"the compiled model does not run with the target's session ({', '.join(ran_on)}): {message}"
                ) from None
            diffs = compare(
                reference, final, atol=profile.tolerance.atol, rtol=profile.tolerance.rtol, padded=padded_positions(feeds)
            )
            verification = {
                "passed": all(d.ok for d in diffs),
                "skipped": False,
                "atol": profile.tolerance.atol,
                "rtol": profile.tolerance.rtol,
                "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
                "inputs_source": "generated" if inputs is None else "user",
                # Positions where the mask input is 0 carry no defined value (see verify.compare).
                "padded_positions_excluded": _count(padded_positions(feeds)),
                "outputs": {d.name: d.to_json() for d in diffs},
                "session": {"providers": ran_on, "options": dict(profile.session_options)},
                # Providers of the profile that cannot run here: verified on the others (the same graph).
                "providers_unavailable": unavailable,
            }
            if not verification["passed"]:
                worst = max((d for d in diffs if not d.ok), key=lambda d: d.max_abs)
                raise VerificationError(
                    f"the compiled model diverges under the target's session ({', '.join(ran_on)}, "
                    f"{dict(profile.session_options)}): output '{worst.name}' max abs error {worst.max_abs:.3g}",
                    report=verification,
                )
            if generation is not None and standalone is None:
                generation.final_check(model_ir, providers, profile.session_options)

        ran_on_instead = ran_instead(profile, verified=verify)  # the target's EPs missing here: said in one line
        if ran_on_instead:
            verification["ran_on_instead"] = ran_on_instead
        attention_after = analysis.attention_blocks(model_ir)
        attention = {
            "found": attention_before["unfused"] + attention_before["fused"],
            "fused": attention_after["fused"],
            "unfused": attention_after["unfused"],
            "fused_ops": attention_after["fused_ops"],
        }
        warnings = []
        approximation = None
        if approximate_attention is not None:
            record = next(r for r in manager.records if r.name == APPROXIMATION_PASS)
            from tfgraph.precision import accuracy

            change = accuracy(dense_reference, final)
            approximation = {
                "attention": approximate_attention,
                "options": dict(record.options),
                "blocks": record.extra.get("rules", {}),
                "output_change_vs_dense": change,
                "inputs_source": "generated" if inputs is None else "user",
            }
            warnings.append(
                f"APPROXIMATION: attention restricted to {approximate_attention}; outputs changed vs the dense model: "
                + ", ".join(f"{k} cosine {c['cosine']:.6f} (worst row {c['row_cosine_min']:.6f}), max abs {c['max_abs']:.3g}"
                            for k, c in change.items())
                + ("" if inputs is not None else " (on generated inputs: pass --inputs with real data for a meaningful figure)")
            )
        if precision_report is not None:
            warnings.extend(precision_report.pop("warnings"))
        if progress:
            progress("placement", 0, 1)
        place = runtime.placement(model_ir, profile)
        if not verify:
            place.unverified = _load_check(model_ir, profile)
        if place.unexpected:
            ops = sorted({runtime.op_name(n) for n in place.unexpected})
            warnings.append(
                f"{len(place.unexpected)} node(s) fall back to CPU on {profile.name} ({place.source}): {', '.join(ops[:8])}"
            )
            if strict:
                raise StrictError(f"--strict: {warnings[-1]}")
        opset = model_ir.opset_imports.get("", None)
        if opset is not None and not profile.opset[0] <= opset <= profile.opset[1]:
            raise VerificationError(
                f"the compiled model imports ai.onnx opset {opset}, outside {profile.name}'s range "
                f"{profile.opset[0]}..{profile.opset[1]}"
            )
        if attention["unfused"]:
            warnings.append(
                f"partial attention fusion: {attention['unfused']} of {attention['found']} attention blocks left unfused "
                "(see the fuse-attention near miss in the manifest)"
            )
            if strict:
                raise StrictError(f"--strict: {warnings[-1]}")

        scratch = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tfgraph-files-")))
        extra_files, tokenizer_section, notes = deployment_files(_tokenizer_dir(source), model_ir, scratch)
        manifest: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "tfgraph_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "input": source,
            "target": profile.name,
            "profile": profile.to_json(),
            "options": {
                "verify": verify,
                "strict": strict,
                "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in (shapes or {}).items()},
                "inputs": str(inputs) if isinstance(inputs, (str, os.PathLike)) else ("in-memory" if inputs is not None else None),
                "seed": seed,
                "extra_passes": [getattr(p, "name", None) or str(p) for p in extra_passes],
                "exporter": exporter if source.get("kind") else None,
            },
            "input_passes": input_records,
            "passes": [r.to_json() for r in manager.records],
            "verification": verification,
            "attention": attention,
            "approximation": approximation,
            "precision": precision_report,
            "placement": place.to_json(),
            "runtime_precision": _runtime_precision(profile),
            "tokenizer": tokenizer_section,
            "generation": generation.report(model_ir) if generation is not None else None,
            "warnings": warnings,
            "notes": notes,
            "providers": [p.to_json() for p in profile.providers],
            "session_options": dict(profile.session_options),
            "summary": {
                "nodes_before": nodes_before,
                "nodes_after": count_nodes(model_ir),
                "params_before": params_before,
                "params_after": tir.parameter_count(model_ir),
                "bytes_before": bytes_before,
                "bytes_after": tir.model_bytes(model_ir),
            },
            "weights": analysis.weights_report(model_ir, bytes_before),
            "versions": _versions(),
        }
        artifact = Artifact(model_ir, manifest, files=extra_files)
        if out_path is not None:
            if progress:
                progress("write artifact", 0, 1)
            artifact.save(out_path, force=force, external_data_threshold=external_data_threshold)
            if progress:
                progress("write artifact", 1, 1)
        return artifact
