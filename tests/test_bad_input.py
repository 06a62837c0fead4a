"""Every bad input: exit 2, a one-line message, and nothing written."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.conftest import make_mlp


def _assert_refused(result, out: pathlib.Path, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("tfgraph: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    # No temporary folder left beside the output either.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_file(cli, tmp_path):
    out = tmp_path / "out"
    _assert_refused(cli("compile", tmp_path / "nope.onnx", "-o", out), out, "no such file")


def test_directory(cli, tmp_path):
    (tmp_path / "adir").mkdir()
    out = tmp_path / "out"
    _assert_refused(cli("compile", tmp_path / "adir", "-o", out), out, "is a directory")


def test_garbage_bytes(cli, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    _assert_refused(cli("compile", bad, "-o", out), out, "garbage.onnx")


def test_empty_file(cli, tmp_path):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    _assert_refused(cli("compile", bad, "-o", out), out, "empty.onnx")


def test_truncated_protobuf(cli, tmp_path):
    data = make_mlp().SerializeToString()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    _assert_refused(cli("compile", bad, "-o", out), out, "truncated.onnx")


def test_opset_too_new(cli, tmp_path):
    model = make_mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    _assert_refused(cli("compile", path, "-o", out), out, f"opset {onnx.defs.onnx_opset_version() + 5}", "upgrade onnx")


def test_ir_version_too_new(cli, tmp_path):
    model = make_mlp()
    model.ir_version = onnx.IR_VERSION + 3
    path = tmp_path / "future_ir.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    _assert_refused(cli("compile", path, "-o", out), out, "IR version")


def test_checker_failure(cli, tmp_path):
    model = make_mlp()
    model.graph.node[1].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    _assert_refused(cli("compile", path, "-o", out), out, "fails the ONNX checker")


def _save_external(model: onnx.ModelProto, path: pathlib.Path) -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)


def test_missing_external_data(cli, tmp_path):
    path = tmp_path / "ext.onnx"
    _save_external(make_mlp(), path)
    (tmp_path / "weights.bin").unlink()
    out = tmp_path / "out"
    _assert_refused(cli("compile", path, "-o", out), out, "external data file 'weights.bin' is missing")


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_escaping(cli, tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    model = make_mlp()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "escape.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    _assert_refused(cli("compile", path, "-o", out), out, "escapes the model's folder")


def test_unknown_target_lists_valid(cli, mlp_path, tmp_path):
    out = tmp_path / "out"
    _assert_refused(cli("compile", mlp_path, "--target", "tpu-int3", "-o", out), out, "unknown target 'tpu-int3'", "cpu-fp32")


def test_output_exists_refused_unless_force(cli, mlp_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("compile", mlp_path, "-o", out)
    assert result.code == 2 and "output folder exists" in result.err and "--force" in result.err
    assert (out / "keep.txt").read_text() == "mine"
    result = cli("compile", mlp_path, "-o", out, "--force", "--quiet")
    assert result.code == 0, result.err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_unknown_builtin_model(cli, tmp_path):
    out = tmp_path / "out"
    _assert_refused(cli("compile", "no-such-model", "-o", out), out, "no-such-model", "bert-small", "minilm")


def test_bad_inputs_file(cli, mlp_path, tmp_path):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, wrong_name=np.zeros((1, 2, 16), np.float32))
    out = tmp_path / "out"
    _assert_refused(cli("compile", mlp_path, "-o", out, "--inputs", feeds), out, "missing ['x']")


def test_unknown_pass(cli, mlp_path, tmp_path):
    out = tmp_path / "out"
    _assert_refused(cli("compile", mlp_path, "-o", out, "--pass", "no-such-pass"), out, "unknown pass 'no-such-pass'")


def test_usage_error_exit_2(tmp_path):
    from tfgraph.cli.main import main

    assert main(["compile"]) == 2


def test_model_onnxruntime_cannot_load_names_the_problem_not_a_temporary_file(cli, tmp_path):
    """A model the ONNX checker takes but onnxruntime refuses to load (Add of float and double): one line
    naming the problem, without the temporary session file onnxruntime was given."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(np.ones((2, 4), np.float64), "c")])
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    out = tmp_path / "out"
    result = cli("compile", path, "-o", out)
    _assert_refused(result, out, "does not run on onnxruntime")
    assert "tfgraph-session" not in result.err and "Load model from" not in result.err


@pytest.mark.parametrize("setting, fragments", [
    ("gptq:act_order=true", ("runs no pass 'gptq'", "quantize-weights-nbits")),
    ("quantize-weights-nbits:symetric=true", ("unknown option(s) symetric", "symmetric")),
    ("quantize-weights-nbits:bits=3", ("bits must be 4 or 8",)),
    ("quantize-weights-nbits", ("expected PASS:KEY=VALUE",)),
])
def test_bad_pass_setting_refused_before_anything_runs(cli, mlp_path, tmp_path, setting, fragments):
    out = tmp_path / "out"
    _assert_refused(cli("compile", mlp_path, "-t", "cpu-int4", "-o", out, "--set", setting), out, *fragments)


def test_set_changes_the_targets_own_pass_options(cli, mlp_path, tmp_path):
    """--set reaches the target's pass (symmetric 4-bit: MatMulNBits without zero points) and the manifest
    records it with the pipeline that ran."""
    import json

    out = tmp_path / "out"
    result = cli("compile", mlp_path, "-t", "cpu-int4", "-o", out, "-q",
                 "--set", "quantize-weights-nbits:min_elements=1", "--set", "quantize-weights-nbits:symmetric=true")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["pass_options"] == {"quantize-weights-nbits": {"min_elements": 1, "symmetric": True}}
    nbits = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == 3 for n in nbits)
