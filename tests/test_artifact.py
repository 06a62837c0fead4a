"""Artifacts: files, manifest, atomic writes, external data, and loading back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

import tfgraph
from tfgraph.deploy import artifact as artifact_mod
from tfgraph.ir import load as ir_load
from tests._checks import assert_matches_source
from tests.conftest import make_mlp


def test_manifest_contents(mlp_path, tmp_path):
    out = tmp_path / "out"
    tfgraph.compile(mlp_path, "cpu-fp32", output=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tfgraph_version"] == tfgraph.__version__
    assert manifest["input"]["sha256"] == hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    assert manifest["target"] == "cpu-fp32"
    assert manifest["files"] == ["model.onnx"]
    assert [p["name"] for p in manifest["passes"]] == [p.name for p in tfgraph.get_target("cpu-fp32").passes]
    for record in manifest["passes"]:
        assert {"time_s", "modified", "nodes_before", "nodes_after", "params_before", "params_after"} <= set(record)
    assert_matches_source(out, mlp_path, shapes={"batch": 3, "sequence": 7})
    assert manifest["verification"]["outputs"]["y"]["max_abs"] <= 1e-4
    assert manifest["providers"] == [{"name": "CPUExecutionProvider", "options": {}}]
    assert manifest["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert manifest["summary"]["nodes_after"] < manifest["summary"]["nodes_before"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_load_returns_session_with_profile_options(mlp_path, tmp_path):
    import onnxruntime as ort

    tfgraph.compile(mlp_path, "cpu-fp32", output=tmp_path / "out")
    session = tfgraph.load(tmp_path / "out")
    assert isinstance(session, ort.InferenceSession)
    assert session.get_providers() == ["CPUExecutionProvider"]
    y = session.run(None, {"x": np.ones((1, 3, 16), np.float32)})[0]
    assert y.shape == (1, 3, 16) and np.isfinite(y).all()


def test_load_refuses_non_artifact(tmp_path):
    with pytest.raises(tfgraph.BadInputError, match="not a tfgraph artifact"):
        tfgraph.load(tmp_path)


def test_failed_write_leaves_nothing(mlp_path, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod, "save", boom)
    with pytest.raises(OSError):
        tfgraph.compile(mlp_path, "cpu-fp32", output=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_failed_forced_write_keeps_previous(mlp_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tfgraph.compile(mlp_path, "cpu-fp32", output=out)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(artifact_mod, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        tfgraph.compile(mlp_path, "cpu-fp32", output=out, force=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out"]


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(make_mlp(), src / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    loaded = ir_load(src / "m.onnx")
    assert [f.name for f in loaded.external_files] == ["m.weights"]
    assert "m.weights" in loaded.input_hashes()["external_data"]

    out = tmp_path / "out"
    # A threshold of 0 bytes takes the large-model path: weights in model.onnx.data beside the graph.
    art = tfgraph.compile(src / "m.onnx", "cpu-fp32", output=out, external_data_threshold=0)
    assert art.manifest["files"] == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_size > 0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer if len(t.dims) > 0 and np.prod(t.dims) > 256)
    # The artifact stands on its own: moving it keeps the relative location valid.
    moved = tmp_path / "moved"
    out.rename(moved)
    session = tfgraph.load(moved)
    x = np.ones((2, 4, 16), np.float32)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(src / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_user_inputs_npz(mlp_path, tmp_path):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(3).standard_normal((4, 7, 16)).astype(np.float32))
    art = tfgraph.compile(mlp_path, "cpu-fp32", inputs=feeds)
    assert art.manifest["verification"]["inputs"]["x"]["shape"] == [4, 7, 16]
    assert art.manifest["verification"]["inputs_source"] == "user"


def test_shapes_option_sets_symbolic_dims(mlp_path):
    art = tfgraph.compile(mlp_path, "cpu-fp32", shapes={"sequence": 33})
    assert art.manifest["verification"]["inputs"]["x"]["shape"] == [2, 33, 16]
    art = tfgraph.compile(mlp_path, "cpu-fp32", shapes={"x": (5, 3, 16)})
    assert art.manifest["verification"]["inputs"]["x"]["shape"] == [5, 3, 16]
