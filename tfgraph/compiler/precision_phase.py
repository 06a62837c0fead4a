"""The precision phase of a compile: bind the calibration set to the passes that use it (before the
pipeline runs), then measure the reduced-precision model against fp32 and apply the accuracy budget."""

from __future__ import annotations

from tfgraph.deploy import runtime
from tfgraph.errors import VerificationError
from tfgraph.passes.registry import PassSpec
from tfgraph.compiler.sources import tokenizer_dir
from tfgraph.targets import Provider
from tfgraph.compiler.verify import UNOPTIMIZED, run


def prepare_precision(pipeline, profile, model_ir, source, calibration, tokenizer, max_drop, inputs, feeds, shapes, seed,
                       progress) -> dict | None:
    """Bind the calibration set to the passes that use it, and run the fp32 model on it (the
    accuracy reference) before the pipeline changes the model."""
    import warnings as _warnings

    from tfgraph.compiler import calibration as cal
    from tfgraph.passes.registry import get_pass_class

    def declares(item, flag):
        return isinstance(item, PassSpec) and getattr(get_pass_class(item.name), flag, False)

    # Passes that read the calibration set, and passes that can record how the max-drop loop rebuilds the
    # nodes they quantize at a higher precision (weight-only int4 → int8): told to when a budget applies.
    uses = [i for i, item in enumerate(pipeline) if declares(item, "uses_calibration") or declares(item, "keeps_fallbacks")]
    if not uses and profile.quantization is None and max_drop is None:
        return None
    budget_applies = max_drop is not None or profile.min_cosine is not None
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
        calib = cal.load_calibration(calibration, model_ir, tokenizer=tokenizer or tokenizer_dir(source),
                                     static=profile.static_shapes)
    if progress:
        progress("fp32 reference on calibration inputs", 0, 1)
    fp32 = [run(model_ir, batch, options=UNOPTIMIZED) for batch in calib.batches]
    pipeline = list(pipeline)
    bound = []
    for i in uses:
        spec = pipeline[i]
        extra = {"calibration": calib, "progress": progress} if declares(spec, "uses_calibration") else {}
        if declares(spec, "keeps_fallbacks"):
            extra["record_fallbacks"] = budget_applies
        instance = get_pass_class(spec.name)(**{**dict(spec.options), **extra})
        pipeline[i] = _BoundSpec(spec.name, spec.options, spec.phase)
        object.__setattr__(pipeline[i], "instance", instance)
        bound.append(instance)
    return {"pipeline": pipeline, "calibration": calib, "fp32": fp32, "passes": bound, "notes": notes}


class _BoundSpec(PassSpec):
    """A PassSpec whose pass was created ahead (bound to the calibration set): the manifest keeps
    its name and options."""

    def create(self):
        return self.instance


def finish_precision(state, model_ir, profile, max_drop, progress) -> dict:
    from tfgraph.compiler import precision

    calib = state["calibration"]
    providers = runtime.usable(profile.providers)[0] or [Provider(runtime.CPU)]

    def outputs(model):
        return [runtime.run(model, batch, providers, options=profile.session_options) for batch in calib.batches]

    def evaluate(model):
        return precision.accuracy(state["fp32"], outputs(model))

    def evaluate_configs(model, configs):
        """Accuracy for each set of extra feeds (the revert switches), one session for all."""
        sess = runtime.session(model, providers, options=profile.session_options)
        names = [o.name for o in sess.get_outputs()]
        return [precision.accuracy(state["fp32"], [dict(zip(names, sess.run(None, {**batch, **extra})))
                                                   for batch in calib.batches]) for extra in configs]

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
                                         progress=progress, evaluate_configs=evaluate_configs)
    final = outputs(model_ir)
    acc = precision.accuracy(state["fp32"], final)
    agreement = precision.next_token(state["fp32"], final, [batch.get("attention_mask") for batch in calib.batches])
    if agreement is not None and "logits" in acc:  # a causal LM: teacher-forced next-token agreement with fp32
        acc["logits"]["next_token"] = agreement
    warnings = list(state["notes"])
    if budget_report is not None and not budget_report["met"]:
        warnings.append(f"accuracy budget not met: 1 - cosine = {1 - budget_report['final_score']:.4g} > max drop "
                        f"{budget_value:.4g} after reverting {len(budget_report['reverted'])} node(s)")
    if budget_report is not None and budget_report["reverted"]:
        warnings.append(f"max-drop {budget_value:.4g}: reverted {len(budget_report['reverted'])} quantized node(s) "
                        f"(to {budget_report['reverted_weights']}): "
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
