"""Hostile input (issue 15): huge graphs, lying external-data headers, runtimes writing outside the output.

* Graph size: a chain of n ``Add`` nodes compiles in time about linear in n (it took ~10 ms a
  node: every rule pass tried each of its ~500 commuted rule variants at every node, twice).
* External data: ``offset``/``length`` must describe exactly the bytes the tensor needs, inside
  the file (onnx_ir ignored ``length`` and read whatever lay at ``offset``).
* Side effects: a compile writes nothing outside its output (onnxruntime's and OpenVINO's
  telemetry wrote into ``$HOME`` and ``$TMPDIR``), and a runtime failure is tfgraph's one line on
  stderr, without onnxruntime's coloured log lines before it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_mlp
from tfgraph.cli.main import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tfgraph: error: "), lines[0]
    return lines[0]


# --- A. graph size (item 18) --------------------------------------------------------------------

def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The synthetic chains the scaling benchmark compiles (x → n Adds → y: ``const`` adds a distinct small
# initializer each step, ``input`` adds the graph input again; neither can be folded away).
chain_model = _benchmark_module("bench_compile_scaling").chain_model


def _pipeline_seconds(n: int, kind: str) -> float:
    """Sum of the cpu-fp32 passes' times (as the manifest records them) on an n-node chain."""
    import onnx_ir as ir

    from tfgraph.compiler.passmanager import PassManager
    from tfgraph.targets import get_target

    model = ir.serde.deserialize_model(chain_model(n, kind))
    manager = PassManager(get_target("cpu-fp32").passes)
    manager.run(model)
    return sum(r.time_s for r in manager.records)


@pytest.mark.parametrize("kind", ["const", "input"])
def test_rule_passes_try_few_rules_per_node(kind, monkeypatch):
    """The rule passes try a handful of rules per node, not every commuted variant of every rule
    (LayerNorm alone is 240 variants rooted at Add)."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    from tfgraph.passes.registry import create_pass

    attempts = 0
    original = pattern.RewriteRule.try_rewrite

    def counting(self, *args, **kwargs):
        nonlocal attempts
        attempts += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pattern.RewriteRule, "try_rewrite", counting)
    n = 300
    model = ir.serde.deserialize_model(chain_model(n, kind))
    reports = {}
    for name in ("simplify-ops", "simplify-reshapes", "fuse-attention", "fuse-normalization", "fuse-ort-operators"):
        p = create_pass(name)
        p(model)
        reports[name] = p.report
    assert attempts / n < 5, f"{attempts / n:.0f} rule attempts a node"
    # The near misses are still reported (a LayerNorm's final Add matched, then not its Mul).
    assert reports["fuse-normalization"]["layer-norm"]["near_miss"]["matched_nodes"] == 1


@pytest.mark.parametrize("kind", ["const", "input"])
def test_pass_time_grows_about_linearly(kind):
    _pipeline_seconds(50, kind)  # imports and one-time setup out of the way
    small = _pipeline_seconds(400, kind)
    start = time.perf_counter()
    large = _pipeline_seconds(4000, kind)
    assert time.perf_counter() - start < 30, "4000 Adds should compile in seconds"
    # Linear is 10x, n·log n ~14x, quadratic 100x.
    assert large / small < 25, (small, large)


# --- B. external data extents (item 8) ----------------------------------------------------------

WEIGHT = np.arange(250 * 256, dtype=np.float32).reshape(250, 256) / 1000
NEEDED = WEIGHT.nbytes  # 256,000


def _external_model(folder: pathlib.Path, *, offset: int | None, length: int | None, file_bytes: bytes) -> pathlib.Path:
    (folder / "w.bin").write_bytes(file_bytes)
    weight = numpy_helper.from_array(WEIGHT, "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = [("location", "w.bin")]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 250])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


DATA = WEIGHT.tobytes()

EXTENT_CASES = {
    # name: (offset, length, file contents, fragments of the message)
    "length-too-short": (0, 4, DATA, ["length 4 bytes", f"need {NEEDED} bytes"]),
    "length-too-long": (0, 1_000_000_000, DATA, ["length 1000000000 bytes", f"need {NEEDED} bytes"]),
    "offset-past-end": (NEEDED + 4096, NEEDED, DATA, [f"offset {NEEDED + 4096}", "past the end", f"needs {NEEDED} bytes"]),
    "length-beyond-file": (64, NEEDED, DATA, [f"length {NEEDED} bytes at offset 64", "past the end of the file"]),
    "no-length-file-too-short": (None, None, DATA[:1000], ["declares no length", f"needs {NEEDED} bytes", "(1000 bytes)"]),
    "negative-offset": (-8, NEEDED, DATA, ["offset '-8'"]),
}


@pytest.mark.parametrize("case", list(EXTENT_CASES))
def test_external_data_extent_refused(case, tmp_path, capsys):
    offset, length, contents, fragments = EXTENT_CASES[case]
    path = _external_model(tmp_path, offset=offset, length=length, file_bytes=contents)
    out = tmp_path / "out"
    code = main(["compile", str(path), "-o", str(out), "--no-verify"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2, line
    for fragment in ["'W'", "'w.bin'", *fragments]:
        assert fragment in line, line
    assert not out.exists()


@pytest.mark.parametrize("offset,length", [(0, NEEDED), (0, None), (64, NEEDED), (64, None)])
def test_external_data_valid_extent_loads_exactly_its_bytes(offset, length, tmp_path, capsys):
    # Junk before and after the tensor's bytes: reading outside the extent would show in the weights.
    junk = np.full(64 // 4, np.nan, np.float32).tobytes()
    contents = (junk if offset else b"") + DATA + junk
    path = _external_model(tmp_path, offset=offset, length=length, file_bytes=contents)
    out = tmp_path / "out"
    code = main(["compile", str(path), "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    compiled = onnx.load(str(out / "model.onnx"))
    (weight,) = [t for t in compiled.graph.initializer if t.name == "W"]
    np.testing.assert_array_equal(numpy_helper.to_array(weight), WEIGHT)


# --- C. nothing outside the output, one line on stderr (item 17) -------------------------------

def _openvino_or_skip(target: str) -> None:
    if target.startswith("openvino") and importlib.util.find_spec("openvino") is None:
        pytest.skip("the 'openvino' package is not installed")


@pytest.mark.parametrize("target", ["cpu-fp32", "openvino-fp32"])
def test_compile_writes_nothing_outside_output(target, tmp_path):
    _openvino_or_skip(target)
    home, tmp, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for folder in (home, tmp, work):
        folder.mkdir()
    model = work / "mlp.onnx"
    onnx.save(make_mlp(), model)
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tfgraph", "compile", str(model), "-t", target, "-o", str(work / "out"), "--quiet"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["mlp.onnx", "out"]
    left = [str(p.relative_to(tmp_path)) for folder in (home, tmp) for p in folder.rglob("*")]
    assert left == [], left


def _fails_at_run_time() -> onnx.ModelProto:
    """Valid, loads, and fails inside a kernel: x[batch, 4] + z[sequence, 4] with batch 2, sequence 16."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "runfail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("target", ["cpu-fp32", "openvino-fp32"])
def test_runtime_failure_is_one_line_on_stderr(target, tmp_path, capfd):
    """onnxruntime's logger writes to file descriptor 2 itself: capfd sees what a terminal would."""
    _openvino_or_skip(target)
    path = tmp_path / "runfail.onnx"
    onnx.save(_fails_at_run_time(), path)
    out = tmp_path / "out"
    code = main(["compile", str(path), "-t", target, "-o", str(out)])
    captured = capfd.readouterr()
    line = _one_line(captured.err)
    assert code == 2, line
    assert "does not run on onnxruntime" in line and "[E:onnxruntime" not in captured.err
    assert not out.exists()
