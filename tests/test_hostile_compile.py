"""Careless and hostile compile input (issue 15): every case exits 0/1/2 (3 only for a plugin pass's
own bug, naming it), says why in one line, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import pathlib

import onnx
import pytest

from tests._small_models import static_input_model, transposed_dims_model


def _one_line(result, code: int, *fragments: str) -> str:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _nothing_beside(folder: pathlib.Path, *allowed: str) -> None:
    left = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    assert not left, left


# --- 1-3: the output folder --------------------------------------------------------------------------

def test_unwritable_output_parent_refused_before_any_pass(cli, mlp_path, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the check see what another user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == parent else real(p, mode, **kw))
    else:
        parent.chmod(0o555)
    from tfgraph.compiler import passmanager

    ran = []
    monkeypatch.setattr(passmanager.PassManager, "run", lambda self, model: ran.append(1))
    _one_line(cli("compile", mlp_path, "-o", parent / "out"), 2, "cannot write there", "permission denied")
    assert not ran and list(parent.iterdir()) == []


def test_read_only_file_system_refused():
    ro = next((p for p in ("/sys", "/proc/sys") if os.path.isdir(p) and os.statvfs(p).f_flag & os.ST_RDONLY), None)
    if ro is None:
        pytest.skip("no read-only file system mounted here")
    from tfgraph.deploy.artifact import check_output_dir
    from tfgraph.errors import BadInputError

    with pytest.raises(BadInputError, match="read-only"):
        check_output_dir(pathlib.Path(ro) / "tfgraph-out", force=False)


@pytest.mark.parametrize("output", [".", "sub/..", "..", "sub/../sub/../."])
def test_output_that_is_the_current_folder_or_an_ancestor(cli, mlp_path, tmp_path, monkeypatch, output):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    _one_line(cli("compile", mlp_path, "-o", output, "--force"), 2, "current folder or one of its ancestors")
    _nothing_beside(work, "sub")
    _nothing_beside(tmp_path, "work", "mlp.onnx")


def test_failed_replace_leaves_no_backup_folder(cli, mlp_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli("compile", mlp_path, "-o", out, "--quiet").code == 0
    import tfgraph.deploy.artifact as artifact

    real = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # moving the new artifact into place
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(artifact.os, "replace", failing_replace)
    result = cli("compile", mlp_path, "-o", out, "--force", "--quiet")
    assert result.code == 3  # an OS failure mid-write: internal, one line
    monkeypatch.undo()
    assert (out / "manifest.json").is_file()  # the previous artifact is back
    _nothing_beside(tmp_path, "out", "mlp.onnx")


def test_output_name_too_long(cli, mlp_path, tmp_path):
    _one_line(cli("compile", mlp_path, "-o", tmp_path / ("a" * 300)), 2, "300 bytes", "limit")
    _nothing_beside(tmp_path, "mlp.onnx")


# --- 4, 5, 9, 10: shapes and seeds -------------------------------------------------------------------

@pytest.mark.parametrize("shape, fragment", [
    ("x=100000x100000x16", "GiB"),
    ("batch=99999999999999999999999", "cannot be allocated"),
    ("x=1x16,x=2x8", "given twice"),
    ("batch=-2", "must not be negative"),
])
def test_impossible_shapes(cli, mlp_path, tmp_path, shape, fragment):
    _one_line(cli("compile", mlp_path, "-o", tmp_path / "out", "--shape", shape), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_declared_input_larger_than_memory(cli, tmp_path):
    path = tmp_path / "huge.onnx"
    onnx.save(static_input_model(2**40), path)
    _one_line(cli("compile", str(path), "-o", tmp_path / "out"), 2, "16.0 TiB", "free memory")


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e3"])
def test_bad_seed(cli, mlp_path, tmp_path, seed):
    result = cli("compile", mlp_path, "-o", tmp_path / "out", "--seed", seed)
    assert result.code == 2, result.err
    assert len(result.err.strip().splitlines()) <= 2  # argparse's usage line + the error, or our one line


@pytest.mark.parametrize("target", ["cpu-fp32", "npu-a8w8"])
def test_pinned_shapes_checked_against_shared_dimensions(cli, tmp_path, target):
    path = tmp_path / "t.onnx"
    onnx.save(transposed_dims_model(), path)
    # a[batch, sequence] = 1x16 says batch 1, sequence 16; b[sequence, batch] = 1x16 says the opposite.
    _one_line(cli("compile", path, "-t", target, "-o", tmp_path / "out", "--shape", "a=1x16,b=1x16"), 2,
              "need the same size")


# --- 6, 7, 11: passes and plugins --------------------------------------------------------------------

@pytest.mark.parametrize("spec, fragment", [
    ("prune-magnitude:sparsity=abc", "sparsity='abc' is not float"),
    ("prune-magnitude:sparsity=1.5", "sparsity must be in [0, 1)"),
    ("quantize-weights-nbits:bits=1", "bits must be 4 or 8"),
    ("cse:size_limit=true", "is not int"),
])
def test_pass_options_checked_before_the_first_pass(cli, mlp_path, tmp_path, monkeypatch, spec, fragment):
    from tfgraph.compiler import phases

    resolved = []
    monkeypatch.setattr(phases, "resolve_model", lambda *a, **k: resolved.append(1))
    _one_line(cli("compile", mlp_path, "-o", tmp_path / "out", "--pass", spec), 2, fragment)
    assert not resolved  # refused before the model was even loaded


def test_passes_lists_declared_options(cli):
    result = cli("passes", "--json")
    rows = {r["name"]: r for r in json.loads(result.out)}
    options = {o["name"]: o for o in rows["prune-magnitude"]["options"]}
    assert options["sparsity"]["type"] == "float" and options["sparsity"]["default"] == 0.5


@pytest.mark.parametrize("body, fragment", [
    ("raise ValueError('boom')", "raised ValueError: boom"),
    ("return None", "raised TypeError"),
    ("return 'a string'", "raised TypeError"),
])
def test_plugin_pass_failure_names_the_pass_and_position(cli, mlp_path, tmp_path, body, fragment):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "import tfgraph\n"
        "@tfgraph.register_pass('test-broken', replace=True)\n"
        "class Broken(tfgraph.Pass):\n"
        "    def call(self, model):\n"
        f"        {body}\n"
    )
    out = tmp_path / "out"
    line = _one_line(cli("compile", mlp_path, "-o", out, "--plugin", plugin, "--pass", "test-broken"), 3,
                     "pass 'test-broken' (#", fragment)
    assert "of " in line and not out.exists()


def test_plugin_that_exits_on_import(cli, mlp_path, tmp_path):
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(0)\n")
    out = tmp_path / "out"
    _one_line(cli("compile", mlp_path, "-o", out, "--plugin", plugin), 2, "called sys.exit(0)")
    assert not out.exists()


def test_pass_that_exits_is_a_pass_failure(cli, mlp_path, tmp_path):
    plugin = tmp_path / "exits_in_pass.py"
    plugin.write_text(
        "import sys, tfgraph\n"
        "@tfgraph.register_pass('test-exit', replace=True)\n"
        "class Exit(tfgraph.Pass):\n"
        "    def call(self, model):\n"
        "        sys.exit(0)\n"
    )
    out = tmp_path / "out"
    _one_line(cli("compile", mlp_path, "-o", out, "--plugin", plugin, "--pass", "test-exit"), 3, "test-exit", "sys.exit")
    assert not out.exists()
