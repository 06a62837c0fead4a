"""Executors: local threads and Ray actors return what the whole model returns."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnxruntime as ort
import pytest
from _pipeline_models import model_path

import tfgraph
from tfgraph import ir as tir
from tfgraph.errors import BadInputError
from tfgraph.compiler.stages import partition_artifact
from tfgraph.compiler.verify import generate_inputs


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    out = {}
    for name, k in (("bert-small", 3), ("gpt-small", 2)):
        src = model_path(tmp_path_factory, name, True)
        dst = tmp_path_factory.mktemp("pipe") / f"{name}-k{k}"
        partition_artifact(src, k, dst, shapes={"sequence": 32})
        model = tir.load(src / "model.onnx").model
        feeds = generate_inputs(model, {"batch": 6, "sequence": 20}, seed=3)
        session = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"])
        ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        out[name] = (src, dst, feeds, ref)
    return out


def _close(ref, got, rel=1e-5):
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype
        assert np.max(np.abs(got[k] - ref[k])) <= rel * np.max(np.abs(ref[k])), k


@pytest.mark.parametrize("name", ["bert-small", "gpt-small"])
def test_local_executor_equals_whole_model(pipelines, name):
    src, dst, feeds, ref = pipelines[name]
    with tfgraph.PipelineExecutor(dst) as ex:
        assert len(ex.specs) == (3 if name == "bert-small" else 2)
        one = ex.run(feeds)
        _close(ref, one)
        for m in (2, 4, 6, 10):  # more micro-batches than rows: clamped to the batch
            _close(ref, ex.run(feeds, micro_batches=m))
            assert ex.stats["micro_batches"] == min(m, 6)
        # Repeated and alternating calls on the same executor stay in order.
        again = ex.run(feeds, micro_batches=3)
        _close(one, again, rel=1e-6)
    # A single-model artifact is a one-stage pipeline.
    with tfgraph.PipelineExecutor(src, micro_batches=3) as ex:
        assert len(ex.specs) == 1
        _close(ref, ex.run(feeds))


def test_executor_errors(pipelines):
    _, dst, feeds, _ = pipelines["bert-small"]
    with tfgraph.PipelineExecutor(dst) as ex:
        with pytest.raises(BadInputError, match="missing"):
            ex.run({"input_ids": feeds["input_ids"]})
        bad = dict(feeds, input_ids=feeds["input_ids"].astype(np.float32))
        with pytest.raises(Exception):
            ex.run(bad)  # onnxruntime's error reaches the caller, the threads survive
        ex.run(feeds)
    with pytest.raises(BadInputError):
        tfgraph.PipelineExecutor(dst, executor="spark")
    with pytest.raises(BadInputError):
        tfgraph.PipelineExecutor(dst / "nowhere")


def test_run_cli(pipelines, tmp_path, cli):
    _, dst, feeds, ref = pipelines["gpt-small"]
    np.savez(tmp_path / "feeds.npz", **feeds)
    r = cli("run", dst, "--inputs", tmp_path / "feeds.npz", "--micro-batches", "3", "-o", tmp_path / "out.npz", "--json")
    assert r.code == 0, r.err
    with np.load(tmp_path / "out.npz") as data:
        _close(ref, {k: data[k] for k in data.files})
    np.savez(tmp_path / "bad.npz", input_ids=feeds["input_ids"].astype(np.float32))
    bad = cli("run", dst, "--inputs", tmp_path / "bad.npz")
    assert bad.code == 2 and "dtype" in bad.err
    assert cli("run", dst, "--inputs", tmp_path / "missing.npz").code == 2


def test_ray_executor_two_nodes_on_loopback(pipelines, cli, tmp_path):
    """Two Ray nodes (ray.cluster_utils.Cluster) on 127.0.0.1, one stage actor on each by custom resources;
    the Ray executor returns what the whole model and the local executor return."""
    temp = tempfile.mkdtemp(prefix="tfgraph-ray-test-")
    os.makedirs(os.path.join(temp, "ray"))  # Ray records the cluster address under RAY_TMPDIR/ray
    # Ray reads these when it is imported: set them first (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it on loopback).
    env = {"RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"stage0": 1}, "include_dashboard": False, "temp_dir": temp})
        cluster.add_node(num_cpus=1, resources={"stage1": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert cluster.address.startswith("127.0.0.1:")
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        src, dst, feeds, ref = pipelines["gpt-small"]
        with tfgraph.PipelineExecutor(dst, executor="ray", resources=[{"stage0": 1}, {"stage1": 1}], max_in_flight=2,
                                      timeout_s=120) as ex, tfgraph.PipelineExecutor(dst) as local:
            assert len(set(ex.actor_nodes())) == 2  # one stage per node
            for m in (1, 3):
                got = ex.run(feeds, micro_batches=m)
                _close(ref, got)
                _close(local.run(feeds, micro_batches=m), got, rel=1e-6)
        # The CLI's ray executor joins the running instance.
        np.savez(tmp_path / "feeds.npz", **feeds)
        r = cli("run", dst, "--inputs", tmp_path / "feeds.npz", "--executor", "ray", "--micro-batches", "2", "-o", tmp_path / "o.npz")
        assert r.code == 0, r.err
        with np.load(tmp_path / "o.npz") as data:
            _close(ref, {k: data[k] for k in data.files})
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
