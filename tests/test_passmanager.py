"""The pass manager, its instruments, and honest ``modified`` flags."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import tfgraph
from tfgraph.errors import VerificationError
from tfgraph.compiler.instruments import Instrument
from tfgraph.passes import PassSpec, available_passes, create_pass
from tfgraph.compiler.passmanager import PassManager
from tfgraph.targets import get_target
from tests.conftest import make_mlp


class ScaleWeightPass(tfgraph.Pass):
    """Deliberately wrong: multiplies the first initializer by ``factor``."""

    def __init__(self, *, factor: float = 1.5):
        super().__init__()
        self.factor = factor

    def call(self, model):
        value = next(iter(model.graph.initializers.values()))
        array = value.const_value.numpy() * np.float32(self.factor)
        value.const_value = ir.tensor(array, name=value.name)
        return ir.passes.PassResult(model, True)


class LiarPass(tfgraph.Pass):
    """Changes the graph (adds a node) but says it did not."""

    def call(self, model):
        model.graph.append(ir.node("Neg", [model.graph.inputs[0]]))
        return ir.passes.PassResult(model, False)


class DanglingPass(tfgraph.Pass):
    """Breaks the graph structure: removes a node whose output is still used."""

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(node, safe=False)
        return ir.passes.PassResult(model, True)


def test_cleanup_pipeline_changes_and_preserves_outputs(mlp_path, tmp_path):
    artifact = tfgraph.compile(mlp_path, "cpu-fp32", output=tmp_path / "out")
    records = {}
    for r in artifact.manifest["passes"]:
        records.setdefault(r["name"], r)  # the first run of each pass
    # Identity, the duplicate MatMul (CSE) and the dead Sigmoid are gone.
    ops = [n.op_type for n in artifact.model.graph]
    assert "Identity" not in ops and "Sigmoid" not in ops
    assert ops.count("MatMul") == 2
    assert records["cse"]["modified"] and records["cse"]["nodes_after"] < records["cse"]["nodes_before"]
    assert records["remove-dead"]["modified"]
    ver = artifact.manifest["verification"]
    assert ver["passed"] and ver["outputs"]["y"]["max_abs"] <= 1e-4
    # The artifact computes what the input computes, at a shape other than the verification shape.
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    actual = tfgraph.load(tmp_path / "out").run(None, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_second_run_reports_no_modification(mlp_path):
    first = tfgraph.compile(mlp_path, "cpu-fp32")
    second = tfgraph.compile(first.model, "cpu-fp32")
    assert any(r["modified"] for r in first.manifest["passes"])
    assert [r["modified"] for r in second.manifest["passes"]] == [False] * len(second.manifest["passes"])
    assert second.manifest["summary"]["nodes_before"] == second.manifest["summary"]["nodes_after"]


@pytest.mark.parametrize(
    "name", ["lift-constants", "fold-constants", "cse", "eliminate-identity", "dedup-initializers", "remove-dead"]
)
def test_each_pass_on_clean_graph_is_unmodified(name):
    clean = tfgraph.compile(make_mlp(), "cpu-fp32", verify=False).model
    assert create_pass(name)(clean).modified is False


def test_verification_names_the_breaking_pass(mlp_path, tmp_path):
    with pytest.raises(VerificationError) as info:
        tfgraph.compile(mlp_path, "cpu-fp32", extra_passes=[ScaleWeightPass(factor=1.5)], output=tmp_path / "out")
    message = str(info.value)
    assert "ScaleWeightPass" in message and "output 'y'" in message and "max abs error" in message
    assert info.value.pass_name == "ScaleWeightPass"
    assert info.value.report["y"]["max_abs"] > 1e-2
    assert not (tmp_path / "out").exists()


def test_small_change_within_tolerance_passes(mlp_path):
    artifact = tfgraph.compile(mlp_path, "cpu-fp32", extra_passes=[ScaleWeightPass(factor=1.0 + 1e-7)])
    from tests._checks import assert_matches_source

    errors = assert_matches_source(artifact, mlp_path)
    assert 0 < max(errors.values()) < 1e-4  # the tiny change is there, and within the tolerance


def test_no_verify_skips_numeric_check(mlp_path):
    artifact = tfgraph.compile(mlp_path, "cpu-fp32", verify=False, extra_passes=[ScaleWeightPass(factor=3.0)])
    assert artifact.manifest["verification"] == {"passed": None, "skipped": True}


def test_dishonest_modified_flag_is_caught(mlp_path):
    with pytest.raises(VerificationError, match="reported modified=False but changed the graph"):
        tfgraph.compile(mlp_path, "cpu-fp32", extra_passes=[LiarPass()], verify=False)


def test_checker_instrument_names_structural_breakage(mlp_path):
    with pytest.raises(VerificationError, match="after pass 'DanglingPass'"):
        tfgraph.compile(mlp_path, "cpu-fp32", extra_passes=[DanglingPass()], verify=False)


def test_verification_failure_exit_code_1(cli, mlp_path, tmp_path):
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(
        "import numpy as np, onnx_ir as ir, tfgraph\n"
        "@tfgraph.register_pass('test-scale-weight', replace=True)\n"
        "class P(tfgraph.Pass):\n"
        "    def call(self, model):\n"
        "        v = model.graph.initializers['W2']\n"
        "        v.const_value = ir.tensor(v.const_value.numpy() * np.float32(2), name='W2')\n"
        "        return tfgraph.PassResult(model, True)\n"
    )
    out = tmp_path / "out"
    result = cli("compile", mlp_path, "-o", out, "--plugin", plugin, "--pass", "test-scale-weight")
    assert result.code == 1
    assert result.err.strip().count("\n") == 0
    assert "verification failed" in result.err and "test-scale-weight" in result.err
    assert not out.exists()


def test_instruments_see_every_pass_in_order(mlp_path):
    seen = []

    class Recorder(Instrument):
        def before_pipeline(self, model):
            seen.append("start")

        def before_pass(self, pass_, record, model):
            seen.append(f"before:{record.name}")

        def after_pass(self, pass_, record, model):
            seen.append(f"after:{record.name}:{record.modified}")

        def after_pipeline(self, model):
            seen.append("end")

    model = ir.serde.deserialize_model(make_mlp())
    specs = [PassSpec("eliminate-identity"), PassSpec("eliminate-identity")]
    manager = PassManager(specs, instruments=[Recorder()])
    manager.run(model)
    assert seen == [
        "start",
        "before:eliminate-identity",
        "after:eliminate-identity:True",
        "before:eliminate-identity",
        "after:eliminate-identity:False",
        "end",
    ]
    assert manager.records[0].time_s > 0 and manager.records[0].nodes_after == manager.records[0].nodes_before - 1


def test_pass_spec_parse_and_options():
    spec = PassSpec.parse("fold-constants:input_size_limit=16,shape_inference=false")
    assert spec.name == "fold-constants"
    assert dict(spec.options) == {"input_size_limit": 16, "shape_inference": False}
    assert spec.create().input_size_limit == 16
    with pytest.raises(tfgraph.BadInputError, match="bad options for pass 'cse'"):
        PassSpec("cse", {"nonsense": 1}).create()


def test_targets_are_frozen_data():
    target = get_target("cpu-fp32")
    with pytest.raises(Exception):
        target.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        target.session_options["x"] = 1  # type: ignore[index]
    assert json.loads(json.dumps(target.to_json()))["phases"][0]["passes"][0]["name"] in available_passes()
    # The eleven profiles, registered by name.
    assert {t.name for t in tfgraph.list_targets()} >= {
        "cpu-fp32", "cpu-int8", "cuda-fp16", "cuda-int8", "tensorrt-fp16", "tensorrt-int8",
        "openvino-fp32", "openvino-bf16", "openvino-int8", "npu-a16w8", "npu-a8w8"}
    for registered in tfgraph.list_targets():  # every pass a registered target names exists
        assert all(spec.name in available_passes() for spec in registered.passes)


def test_targets_name_their_phases_and_the_manifest_records_them(tmp_path):
    """A profile is named phases of passes; the driver runs them in the profile's order and every pass
    record says which phase it ran in. Reordering phases is a profile change only."""
    from tfgraph.passes.registry import PassSpec
    from tfgraph.targets.profile import Phase, Target, phases

    cpu = get_target("cpu-int8")
    assert [ph.name for ph in cpu.phases] == ["normalize", "fuse", "lower", "precision", "finalize"]
    assert cpu.passes == tuple(s for ph in cpu.phases for s in ph.passes)
    assert {s.phase for s in cpu.phases[3].passes} == {"precision"}
    with pytest.raises(ValueError, match="repeat"):
        Target(name="x", description="", providers=cpu.providers, precision="fp32",
               phases=(Phase("a", ()), Phase("a", ())), tolerance=cpu.tolerance)
    base = get_target("cpu-fp32")
    # Two phases swapped: dedup/remove-dead first, then a cse-only phase (both harmless in any order).
    custom = Target(name="reordered", description="", providers=base.providers, precision="fp32",
                    phases=phases(tidy=(PassSpec("remove-dead"),), merge=(PassSpec("cse"), PassSpec("dedup-initializers"))),
                    tolerance=base.tolerance)
    swapped = dataclasses.replace(custom, name="swapped", phases=tuple(reversed(custom.phases)))
    model = make_mlp()
    for target, order in ((custom, ["tidy", "merge", "merge"]), (swapped, ["merge", "merge", "tidy"])):
        manifest = tfgraph.compile(model, target).manifest
        assert [r["phase"] for r in manifest["passes"]] == order
        assert [ph["name"] for ph in manifest["profile"]["phases"]] == list(dict.fromkeys(order))
    dropped = base.map_passes(lambda s: None if s.name == "pack-projections" else s, name="no-pack")
    assert "pack-projections" not in [s.name for s in dropped.passes]
    assert [ph.name for ph in dropped.phases] == [ph.name for ph in base.phases]
    # Passes given on top of the target's carry no phase.
    extra = tfgraph.compile(model, "cpu-fp32", extra_passes=["cse"]).manifest["passes"][-1]
    assert extra["name"] == "cse" and "phase" not in extra


def _transpose_model(*, tied: bool) -> ir.Model:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])]
    if tied:  # W is also used untransposed (a tied embedding / LM head)
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 300]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 300])],
        outputs,
        [numpy_helper.from_array(np.arange(90000, dtype=np.float32).reshape(300, 300), "W")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_fold_constants_never_duplicates_large_weights():
    """Large constants fold only where the folded result replaces its input (single consumer)."""
    tied = _transpose_model(tied=True)
    result = create_pass("fold-constants")(tied)
    assert [n.op_type for n in tied.graph] == ["Transpose", "MatMul", "MatMul"]
    assert result.modified is False
    # Raising the size limits does not make it copy the shared weight; only the shared-input limit does.
    assert not create_pass("fold-constants", input_size_limit=10**6, output_size_limit=10**6)(tied).modified
    assert create_pass("fold-constants", input_size_limit=10**6, output_size_limit=10**6, shared_input_limit=10**6)(tied).modified

    single = _transpose_model(tied=False)
    from tfgraph.ir import model_bytes

    before = model_bytes(single)
    assert create_pass("fold-constants")(single).modified
    create_pass("remove-dead")(single)
    assert [n.op_type for n in single.graph] == ["MatMul"]
    assert model_bytes(single) == before
    folded = next(iter(single.graph)).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(folded, np.arange(90000, dtype=np.float32).reshape(300, 300).T)


def test_dedup_initializers_rewires_users():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "A"), numpy_helper.from_array(w.copy(), "B"), numpy_helper.from_array(w + 1, "C")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    artifact = tfgraph.compile(model, "cpu-fp32")
    assert list(artifact.model.graph.initializers) == ["A"]
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "dedup-initializers")
    assert record["modified"] and record["params_after"] == record["params_before"] - 64 * 64


def test_compile_options_are_one_frozen_value(mlp_path):
    from tfgraph.compiler.options import CompileOptions

    options = CompileOptions(verify=False, seed=3)
    with pytest.raises(Exception):
        options.seed = 4  # type: ignore[misc]
    merged = CompileOptions.make(options, {"strict": True})
    assert (merged.verify, merged.seed, merged.strict) == (False, 3, True)
    with pytest.raises(TypeError, match="unknown option"):
        tfgraph.compile(mlp_path, "cpu-fp32", verfy=False)
    artifact = tfgraph.compile(mlp_path, "cpu-fp32", options, shapes={"sequence": 5})
    assert artifact.manifest["verification"]["skipped"] is True
    assert artifact.manifest["options"]["seed"] == 3 and artifact.manifest["options"]["shapes"] == {"sequence": 5}
