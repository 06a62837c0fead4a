"""The built wheel works on its own: fresh venv, `tfgraph --help`, one compile, from the installed package."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import onnx

from tests.conftest import make_mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT], cwd=tmp_path)
    wheels = list(dist.glob("tfgraph-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    # passes/, targets/, models/ ship inside the tfgraph package, never as generic top-level names.
    assert {n.split("/")[0] for n in names if not n.startswith("tfgraph-")} == {"tfgraph"}
    for sub in ("passes", "targets", "models"):
        assert f"tfgraph/{sub}/__init__.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", wheels[0]], cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    where = _run([py, "-c", "import tfgraph, tfgraph.passes, tfgraph.targets, tfgraph.models; print(tfgraph.__file__)"], cwd=work)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(venv)
    assert "usage: tfgraph" in _run([venv / "bin" / "tfgraph", "--help"], cwd=work).stdout
    onnx.save(make_mlp(), work / "mlp.onnx")
    result = _run([venv / "bin" / "tfgraph", "compile", "mlp.onnx", "-o", "out", "--json"], cwd=work)
    manifest = json.loads(result.stdout)
    assert manifest["target"] == "cpu-fp32"
    from tests._checks import assert_matches_source

    assert_matches_source(work / "out", work / "mlp.onnx")
    assert (work / "out" / "model.onnx").is_file()
    # Listing targets and models needs no torch (the wheel was installed without extras).
    assert "cpu-fp32" in _run([py, "-m", "tfgraph", "targets"], cwd=work).stdout
