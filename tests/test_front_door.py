"""The front door (issue 14): what a new user meets first — the README's quick start, typos, bad
models, permissions, missing extras, readable output, errors that say what to do, and an artifact a
deployment can use as it is."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

import tfgraph
from tests._small_models import attention_model, dropout_model, positions_model
from tests.conftest import make_mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _refused(result, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _save(model: onnx.ModelProto, path: pathlib.Path) -> pathlib.Path:
    onnx.save(model, path)
    return path


# --- 1. the quick start on a fresh clone ----------------------------------------------------------

def _quick_start_compile() -> str:
    """The compile command of the README's quick start, verbatim (after the install steps)."""
    block = re.search(r"## Quick start.*?```bash\n(.*?)\n```", README, re.S).group(1)
    command = block.split(" && ")[-1].strip()
    assert command.startswith("tfgraph compile minilm"), command
    return command


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """Run the quick start's compile verbatim in an empty folder (no build/ there)."""
    cwd = tmp_path_factory.mktemp("fresh-clone")
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", _quick_start_compile()], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    return cwd, proc


@pytest.mark.slow
def test_quick_start_verbatim_exits_0(quick_start):
    cwd, proc = quick_start
    assert proc.returncode == 0, proc.stderr
    out = cwd / "build" / "minilm"
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    # Readable when piped: no rule near-miss table by default, the tolerance beside the errors.
    assert "NO_MATCH" not in proc.stdout
    assert "|error| <=" in proc.stdout


def test_missing_parent_folders_are_created(cli, mlp_path, tmp_path):
    out = tmp_path / "build" / "deeper" / "model"
    result = cli("compile", mlp_path, "-o", out, "--quiet")
    assert result.code == 0, result.err
    assert (out / "manifest.json").is_file()
    art = tfgraph.compile(mlp_path, "cpu-fp32", output=tmp_path / "api-build" / "model")
    assert (art.path / "model.onnx").is_file()


def test_failed_compile_removes_the_parents_it_created(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "new" / "sub" / "out"
    _refused(cli("compile", bad, "-o", out))
    assert not (tmp_path / "new").exists()


# --- 2. typos and impossible shapes -----------------------------------------------------------------

@pytest.mark.parametrize("shape, fragments", [
    ("input_idz=4x64", ("'input_idz'", "inputs: input_ids", "dimensions: batch, sequence")),
    ("seqence=64", ("'seqence'", "dimensions: batch, sequence")),
])
def test_unknown_shape_names_list_the_valid_ones(cli, tmp_path, shape, fragments):
    path = _save(positions_model(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    _refused(cli("compile", path, "-o", out, "--shape", shape), *fragments)
    assert not out.exists()


def test_inputs_that_disagree_on_a_shared_dimension(cli, tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(_two_input_model(), path)
    out = tmp_path / "out"
    line = _refused(cli("compile", path, "-o", out, "--shape", "input_ids=2x16,attention_mask=2x8"), "'sequence'")
    assert "16" in line and "8" in line


def _two_input_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["a"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["attention_mask"], ["b"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_sequence_beyond_the_position_table(cli, tmp_path):
    path = _save(positions_model(positions=8), tmp_path / "m.onnx")
    out = tmp_path / "out"
    _refused(cli("compile", path, "-o", out, "--shape", "sequence=9"), "sequence 9", "8 positions", "sequence=8")
    assert cli("compile", path, "-o", out, "--shape", "sequence=8", "--quiet").code == 0


# --- 3. a model whose own outputs are random ------------------------------------------------------

def test_nondeterministic_input_is_refused_naming_the_op(cli, tmp_path):
    path = _save(dropout_model(training=True), tmp_path / "m.onnx")
    out = tmp_path / "out"
    _refused(cli("compile", path, "-o", out), "not deterministic", "train_dropout (Dropout)", "--pass eval-mode")
    assert not out.exists()


def test_eval_mode_pass_makes_it_compile(cli, tmp_path):
    path = _save(dropout_model(training=True), tmp_path / "m.onnx")
    out = tmp_path / "out"
    result = cli("compile", path, "-o", out, "--pass", "eval-mode", "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    assert [r["name"] for r in manifest["input_passes"]] == ["eval-mode"]
    assert manifest["input_passes"][0]["modified"] is True
    # Same numbers as the model exported in eval mode.
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    expected = ort.InferenceSession(dropout_model(training=False).SerializeToString()).run(None, {"x": x})[0]
    got = tfgraph.load(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_eval_mode_pass_unit():
    import onnx_ir as ir

    from tfgraph.passes.eval_mode import EvalModePass, random_nodes

    model = ir.serde.deserialize_model(dropout_model(training=True))
    assert [n.op_type for n in random_nodes(model)] == ["Dropout"]
    assert EvalModePass()(model).modified
    assert random_nodes(model) == [] and "Dropout" not in [n.op_type for n in model.graph]
    assert not EvalModePass()(model).modified  # nothing left: honest flag
    inference = ir.serde.deserialize_model(dropout_model(training=False))
    assert random_nodes(inference) == [] and not EvalModePass()(inference).modified


# --- 4. permissions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_artifact_permissions_follow_the_umask(cli, mlp_path, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert cli("compile", mlp_path, "-o", out, "--quiet").code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    assert (out / "manifest.json").stat().st_mode & 0o777 == file_mode


# --- 5. missing runtime extras, found before the first pass ------------------------------------------

@pytest.mark.parametrize("target, module, extra", [
    ("openvino-fp32", "onnxruntime_ep_openvino", "openvino"),
    ("npu-a8w8", "onnxruntime_qnn", "qnn"),
])
def test_missing_plugin_extra_is_named_before_any_pass(cli, mlp_path, tmp_path, monkeypatch, target, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    from tfgraph.compiler import passmanager

    ran = []
    monkeypatch.setattr(passmanager.PassManager, "run", lambda self, model: ran.append(1))
    out = tmp_path / "out"
    _refused(cli("compile", mlp_path, "-t", target, "-o", out, "--shape", "x=1x4x16"), f"pip install 'tfgraph[{extra}]'")
    assert not ran and not out.exists()


# --- 6. --no-verify ---------------------------------------------------------------------------------

def test_no_verify_says_what_was_not_checked(cli, mlp_path, tmp_path):
    out = tmp_path / "out"
    result = cli("compile", mlp_path, "-o", out, "--no-verify")
    assert result.code == 0, result.err
    assert "verification skipped" in result.out and "unverified" in result.out
    assert "outputs unverified" in json.loads((out / "manifest.json").read_text())["placement"]["unverified"]


def test_no_verify_still_refuses_an_artifact_that_does_not_load(cli, mlp_path, tmp_path):
    plugin = tmp_path / "unloadable.py"
    plugin.write_text(
        "import onnx_ir as ir, tfgraph\n"
        "@tfgraph.register_pass('test-unknown-op', replace=True)\n"
        "class P(tfgraph.Pass):\n"
        "    def call(self, model):\n"
        "        for node in model.graph:\n"
        "            if node.op_type == 'Relu':\n"
        "                node.domain = 'test.nowhere'\n"
        "        model.opset_imports['test.nowhere'] = 1\n"
        "        return tfgraph.PassResult(model, True)\n"
    )
    out = tmp_path / "out"
    result = cli("compile", mlp_path, "-o", out, "--no-verify", "--plugin", plugin, "--pass", "test-unknown-op")
    assert result.code == 1, result.err
    assert "does not load" in result.err and len(result.err.strip().splitlines()) == 1
    assert not out.exists()


# --- 7. output a person can read ----------------------------------------------------------------------

def test_near_misses_only_with_verbose(cli, mlp_path, tmp_path):
    quiet = cli("compile", mlp_path, "-o", tmp_path / "a")
    assert quiet.code == 0 and "NO_MATCH" not in quiet.out and "nearest miss" in quiet.out  # the hint
    verbose = cli("compile", mlp_path, "-o", tmp_path / "b", "-v")
    assert verbose.code == 0 and "NO_MATCH" in verbose.out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert any(e.get("near_miss") for r in manifest["passes"] for e in r.get("rules", {}).values())


def test_summary_names_the_tolerance_and_whole_pass_names(cli, mlp_path, tmp_path):
    result = cli("compile", mlp_path, "-o", tmp_path / "out")
    assert "|error| <= 0.0001 + 0.0001·|expected|" in result.out
    assert "classify-attention-masks" in result.out and "…" not in result.out


def test_piped_progress_prints_phase_lines(monkeypatch, capsys):
    from tfgraph.cli import main as cli_module

    clock = iter([0.0, 0.5, 3.0, 3.1, 3.2, 9.0, 9.1])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    progress = cli_module._Progress(enabled=True)
    progress("export x", 0, 1)          # t=0: quick commands print nothing
    progress("reference run", 0, 1)     # t=0.5: still quiet
    progress("pass fold-constants", 0, 3)  # t=3: a new phase → a line
    progress("pass cse", 1, 3)          # t=3.1: same phase, too soon
    progress("pass remove-dead", 2, 3)  # t=3.2
    progress("final verification", 0, 1)  # t=9: new phase
    progress("write artifact", 0, 1)    # t=9.1: new phase
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["tfgraph: pass 1/3: fold-constants", "tfgraph: final verification", "tfgraph: write artifact"]


def test_inspect_counts_fused_attention_flops(cli, tmp_path):
    fused = _save(attention_model(fused=True), tmp_path / "fused.onnx")
    plain = _save(attention_model(fused=False), tmp_path / "plain.onnx")
    flops = {}
    for name, path in (("fused", fused), ("plain", plain)):
        result = cli("inspect", path, "--json")
        assert result.code == 0, result.err
        flops[name] = json.loads(result.out)["flops"]["total"]
    batch, seq, hidden = 2, 5, 8
    assert flops["plain"] == 2 * 2 * batch * seq * seq * hidden  # QKᵀ and PV
    assert flops["fused"] == flops["plain"]


def test_native_banner_stays_off_stdout(cli, mlp_path, tmp_path):
    plugin = tmp_path / "banner.py"
    plugin.write_text(
        "import os, tfgraph\n"
        "@tfgraph.register_pass('test-banner', replace=True)\n"
        "class P(tfgraph.Pass):\n"
        "    def call(self, model):\n"
        "        os.write(1, b' # LIBNATIVE: a native library banner\\n')\n"
        "        return tfgraph.PassResult(model, False)\n"
    )
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "tfgraph", "compile", str(mlp_path), "-o", str(out), "--json",
                             "--plugin", str(plugin), "--pass", "test-banner"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "LIBNATIVE" not in result.stdout and "LIBNATIVE" in result.stderr
    assert json.loads(result.stdout)["target"] == "cpu-fp32"


@pytest.mark.parametrize("args, code", [
    (["compile", "nope.onnx", "-o", "OUT", "--json"], 2),
    (["compile", "--json"], 2),  # a usage error
])
def test_json_errors_are_json(cli, tmp_path, args, code):
    result = cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert result.code == code
    error = json.loads(result.out)
    assert error["exit_code"] == code and error["error"]


# --- 8. errors that say what to do ---------------------------------------------------------------------

def test_empty_folder_says_what_is_missing(cli, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _refused(cli("compile", folder, "-o", tmp_path / "out"), "config.json", "model.onnx", "empty")


def test_calibration_text_without_tokenizer_names_the_option(cli, mlp_path, tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("one sentence\n")
    _refused(cli("compile", mlp_path, "-t", "cpu-int8", "-o", tmp_path / "out", "--calibration", text), "--tokenizer")


def test_unknown_pass_mentions_plugin(cli, mlp_path, tmp_path):
    _refused(cli("compile", mlp_path, "-o", tmp_path / "out", "--pass", "my-pass"), "unknown pass 'my-pass'", "--plugin")


def test_inspect_an_artifact_folder(cli, mlp_path, tmp_path):
    out = tmp_path / "out"
    assert cli("compile", mlp_path, "-o", out, "--quiet").code == 0
    result = cli("inspect", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["source"]["artifact"] == str(out)
    assert report["nodes"] == json.loads((out / "manifest.json").read_text())["summary"]["nodes_after"]


# --- 9. what a deployment expects in the artifact ---------------------------------------------------------

@pytest.mark.slow
def test_artifact_carries_tokenizer_and_config(quick_start):
    cwd, proc = quick_start
    assert proc.returncode == 0, proc.stderr
    out = cwd / "build" / "minilm"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["embedding_output"] == "sentence_embedding"
    assert manifest["tokenizer"]["max_length"] == 512
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert {"tokenizer/tokenizer.json", "config.json"} <= set(manifest["files"])
    sentences = ["A man is playing a guitar.", "The new movie is awesome, and so is its soundtrack."]
    feeds = tfgraph.load_tokenizer(out).encode(sentences)
    ours = tfgraph.load(out).run(["sentence_embedding"], feeds)[0]
    from sentence_transformers import SentenceTransformer

    from tfgraph.models import minilm_path

    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(sentences)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.9999, cosine


# --- 11. README truth -------------------------------------------------------------------------------

def _cli_options() -> set[str]:
    import argparse

    from tfgraph.cli.main import build_parser

    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            found.update(o for o in action.option_strings if o.startswith("--"))

    walk(build_parser())
    return found


def _benchmark_options() -> set[str]:
    found: set[str] = set()
    for script in (ROOT / "benchmarks").glob("*.py"):
        found.update(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
    return found


def test_readme_options_exist_and_cli_options_are_documented():
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README))
    cli_options = _cli_options()
    unknown = mentioned - cli_options - _benchmark_options() - {"--upgrade"}
    assert not unknown, f"README mentions options nothing defines: {sorted(unknown)}"
    undocumented = cli_options - mentioned - {"--help"}
    assert not undocumented, f"CLI options the README does not mention: {sorted(undocumented)}"


def test_manifest_matches_its_schema(cli, mlp_path, tmp_path, validate_every_manifest):
    """The schema is real: a compiled manifest validates, and a broken one does not."""
    jsonschema = pytest.importorskip("jsonschema")
    from tfgraph.deploy.artifact import MANIFEST_SCHEMA, MANIFEST_SCHEMA_VERSION

    out = tmp_path / "out"
    assert cli("compile", mlp_path, "-o", out, "--quiet").code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == MANIFEST_SCHEMA_VERSION
    schema = json.loads(MANIFEST_SCHEMA.read_text())
    jsonschema.validate(manifest, schema)
    for broken in ({**manifest, "schema_version": 99}, {k: v for k, v in manifest.items() if k != "placement"},
                   {**manifest, "summary": {**manifest["summary"], "nodes_after": -1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    assert out / "manifest.json" in validate_every_manifest  # the session-wide check saw this artifact too


def test_inspect_prints_input_shapes(cli, mlp_path):
    """Symbolic shapes in brackets are data, not rich markup."""
    result = cli("inspect", mlp_path, "--no-flops")
    assert result.code == 0, result.err
    assert "x FLOAT[batch, sequence, 16]" in result.out


def test_no_against_input_line_when_nothing_changed_the_outputs(cli, mlp_path, tmp_path):
    result = cli("compile", mlp_path, "-o", tmp_path / "out")
    assert result.code == 0 and "against the input model" not in result.out
    assert "vs_input" not in json.loads((tmp_path / "out" / "manifest.json").read_text())["verification"]


def test_placement_label_says_whether_it_was_run(cli, mlp_path, tmp_path):
    """'expected placement, not run' only for an operator-table prediction (CUDA here), not for a real
    session or the EP's own runtime (OpenVINO's query_model)."""
    pytest.importorskip("openvino")
    predicted = cli("compile", mlp_path, "-t", "cuda-fp16", "-o", tmp_path / "cuda")
    assert predicted.code == 0 and "expected placement, not run (op table cuda" in predicted.out
    queried = cli("compile", mlp_path, "-t", "openvino-fp32", "-o", tmp_path / "ov")
    assert queried.code == 0 and "\nplacement (" in queried.out and "expected placement" not in queried.out
