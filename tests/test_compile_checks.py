"""A cheaper verified compile (issue 20): numerics-preserving passes checked at the phase boundary and
bisected when that check fails, sessions that share the model's weights, weight-free protos for the
checker, and the compile's cost (time, peak memory per step and phase) in the manifest and summary."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import tfgraph
from tfgraph.compiler.instruments import CheckerInstrument, NumericDiffInstrument, preserves_numerics
from tfgraph.compiler.passmanager import PassManager
from tfgraph.compiler.verify import UNOPTIMIZED, generate_inputs, run
from tfgraph.deploy import runtime
from tfgraph.ir import hold_weights
from tfgraph.errors import BadInputError, VerificationError
from tfgraph.passes.registry import PassSpec, get_pass_class, register_pass
from tfgraph.targets import get_target

from tests.conftest import make_mlp


def _scale_w2(model: ir.Model, factor: float) -> None:
    value = model.graph.initializers["W2"]
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name="W2")


@register_pass("test-break-outputs", replace=True)
class BreakOutputs(ir.passes.InPlacePass):
    """Scales W2 by 2: changes the outputs, and says it may (checked at once)."""

    def call(self, model):
        _scale_w2(model, 2.0)
        return ir.passes.PassResult(model, True)


@register_pass("test-lying-exact", replace=True)
class LyingExact(ir.passes.InPlacePass):
    """Declares its rewrites exact, then scales W2: only the phase-boundary check can see it."""

    preserves_numerics = True

    def call(self, model):
        _scale_w2(model, 2.0)
        return ir.passes.PassResult(model, True)


def _planted(name: str, after: str = "cse"):
    """cpu-fp32 with pass ``name`` inserted after the first ``after`` of the normalize phase (mid-phase:
    remove-dead and others still follow it there)."""
    seen = []

    def change(spec):
        if spec.name == after and spec.phase == "normalize" and not seen:
            seen.append(spec)
            return (spec, PassSpec(name))
        return spec

    return get_target("cpu-fp32").map_passes(change, name=f"cpu-fp32+{name}")


def test_exact_passes_declare_it_and_the_others_do_not():
    for name in ("cse", "remove-dead", "eliminate-identity", "dedup-initializers", "infer-shapes", "lift-constants"):
        assert preserves_numerics(get_pass_class(name)()), name
    for name in ("fuse-attention", "fuse-normalization", "lower-attention"):
        assert not preserves_numerics(get_pass_class(name)()), name
    for name in ("quantize", "prune-magnitude"):  # changes_outputs wins over any declaration
        assert getattr(get_pass_class(name), "changes_outputs", False)


def test_breaking_pass_mid_phase_is_named(tmp_path):
    target = _planted("test-break-outputs")
    with pytest.raises(VerificationError) as info:
        tfgraph.compile(make_mlp(), target, output=tmp_path / "out")
    assert info.value.pass_name == "test-break-outputs"
    assert "outputs diverged after pass 'test-break-outputs'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_lying_exact_pass_is_caught_at_the_phase_boundary_and_bisected():
    target = _planted("test-lying-exact")
    normalize = [s.name for s in target.phases[0].passes]
    at = normalize.index("test-lying-exact")
    assert 0 < at < len(normalize) - 1  # mid-phase
    with pytest.raises(VerificationError) as info:
        tfgraph.compile(make_mlp(), target)
    message = str(info.value)
    assert info.value.pass_name == "test-lying-exact"
    assert "outputs diverged after pass 'test-lying-exact'" in message
    assert "phase 'normalize'" in message and "one by one" in message
    assert info.value.report["y"]["max_abs"] > 1e-2


def _pipeline_checks(defer: bool) -> tuple[int, int, ir.Model]:
    model = ir.serde.deserialize_model(make_mlp())
    feeds = generate_inputs(model, None)
    reference = run(model, feeds)
    numeric = NumericDiffInstrument(feeds, reference, atol=1e-4, rtol=1e-4, defer=defer)
    before = runtime.SESSIONS_BUILT
    manager = PassManager(get_target("cpu-fp32").passes, instruments=[CheckerInstrument(), numeric])
    result = manager.run(model)
    return numeric.checks, runtime.SESSIONS_BUILT - before, result.model


def test_deferred_checks_build_fewer_sessions_for_the_same_model():
    eager_checks, eager_sessions, eager_model = _pipeline_checks(defer=False)
    checks, sessions, model = _pipeline_checks(defer=True)
    assert checks < eager_checks and sessions < eager_sessions
    assert checks >= 1  # the phase boundary still ran the model
    feeds = generate_inputs(model, None)
    np.testing.assert_array_equal(run(model, feeds)["y"], run(eager_model, feeds)["y"])


def test_manifest_and_summary_report_compile_cost(cli, mlp_path, tmp_path):
    artifact = tfgraph.compile(mlp_path, "cpu-fp32")
    cost = artifact.manifest["compile"]
    assert [e["name"] for e in cost["steps"]] == ["load", "reference", "rewrite", "precision", "final_check", "assess"]
    assert [e["name"] for e in cost["phases"]] == [ph.name for ph in get_target("cpu-fp32").phases]
    for entry in cost["steps"] + cost["phases"]:
        assert entry["time_s"] >= 0 and entry["peak_rss_bytes"] > 10 * 2**20
    assert cost["peak_rss_bytes"] >= max(e["peak_rss_bytes"] for e in cost["steps"])
    assert sum(e["sessions"] for e in cost["phases"]) >= 1 and cost["numeric_checks"] >= 1
    assert sum(e["passes"] for e in cost["phases"]) == len(artifact.manifest["passes"])
    result = cli("compile", str(mlp_path), "-o", str(tmp_path / "out"))
    assert result.code == 0
    assert "peak RSS" in result.out and "phases: normalize" in result.out


def test_shared_weight_session_matches_a_serialized_one_and_owns_its_weights(monkeypatch):
    model = ir.serde.deserialize_model(make_mlp(hidden=64))
    hold_weights(model)  # as a loaded model holds them: numpy arrays, not protobuf
    feeds = generate_inputs(model, None)
    shared = runtime.session(model, [], options=UNOPTIMIZED)
    assert shared._tfgraph_shared_weights  # W1/W2 were given as OrtValues, not serialized
    monkeypatch.setattr(runtime, "SHARE_WEIGHTS", False)
    expected = run(model, feeds)
    del model
    gc.collect()
    got = shared.run(None, feeds)[0]  # the session keeps the weights it shares alive
    np.testing.assert_array_equal(got, expected["y"])


def test_shared_weight_session_of_a_model_with_external_data(tmp_path, monkeypatch):
    """Small initializers kept in the model's own .onnx.data file are inlined into the session's copy (they
    were left pointing at a data file beside the temporary model: onnxruntime refused the session)."""
    proto = make_mlp(hidden=64)
    path = tmp_path / "external.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="external.onnx.data",
              size_threshold=0)
    model = ir.load(path)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    feeds = generate_inputs(model, None)
    got = runtime.session(model, [], options=UNOPTIMIZED).run(None, feeds)[0]
    monkeypatch.setattr(runtime, "SHARE_WEIGHTS", False)
    np.testing.assert_array_equal(got, run(model, feeds)["y"])


def test_load_checks_weight_sizes_without_a_second_copy(tmp_path):
    proto = make_mlp(hidden=64)
    w1 = next(t for t in proto.graph.initializer if t.name == "W1")
    w1.raw_data = w1.raw_data[: len(w1.raw_data) // 2]
    path = tmp_path / "short.onnx"
    onnx.save(proto, path)
    with pytest.raises(BadInputError, match="W1"):
        tfgraph.compile(path, "cpu-fp32")


def test_calibration_sentences_tokenize_as_transformers_does_without_importing_it():
    transformers = pytest.importorskip("transformers")
    from tfgraph.compiler.calibration import _fast_tokenize
    from tfgraph.models import minilm_path
    from tfgraph.models.sentences import CALIBRATION, HELD_OUT

    sentences = list(CALIBRATION) + list(HELD_OUT) + ["word " * 600, "Ünïcödé ACCENTS, émigré café", ""]
    fast = _fast_tokenize(sentences, minilm_path())
    slow = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)(
        sentences, padding=True, truncation=True, return_tensors="np")
    assert fast is not None and fast["input_ids"].shape[1] == 512  # truncated to model_max_length
    for key in slow:
        np.testing.assert_array_equal(fast[key], slow[key])
