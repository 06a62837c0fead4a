"""Triton repository export: every config.pbtxt parses with Triton's ModelConfig schema; the ensemble chains."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from _pipeline_models import model_path

pytest.importorskip("tritonclient")

from google.protobuf import text_format  # noqa: E402

from tfgraph import ir as tir  # noqa: E402
from tfgraph.errors import BadInputError  # noqa: E402
from tfgraph.compiler.stages import partition_artifact  # noqa: E402
from tfgraph.deploy.triton import export_triton, model_config_pb2, validate_repository  # noqa: E402
from tfgraph.compiler.verify import generate_inputs  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    src = model_path(tmp_path_factory, "gpt-small", True)
    dst = tmp_path_factory.mktemp("triton") / "gpt-k3"
    partition_artifact(src, 3, dst, shapes={"sequence": 32})
    return src, dst


def _run_ensemble(repo, name, feeds):
    """Execute the ensemble the way Triton schedules it: steps in order, tensors through input/output maps."""
    pb = model_config_pb2()
    config = pb.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
    tensors = dict(feeds)
    for step in config.ensemble_scheduling.step:
        session = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        outs = list(step.output_map)
        results = session.run(outs, {key: tensors[value] for key, value in step.input_map.items()})
        for key, value in zip(outs, results):
            tensors[step.output_map[key]] = value
    return {o.name: tensors[o.name] for o in config.output}


def test_export_validates_and_chains(pipeline, tmp_path):
    src, dst = pipeline
    repo = tmp_path / "repo"
    info = export_triton(dst, repo, name="gpt")
    assert info["models"] == ["gpt_stage0", "gpt_stage1", "gpt_stage2", "gpt"] and info["ensemble"] == "gpt"
    configs = validate_repository(repo)
    assert set(configs) == set(info["models"])
    pb = model_config_pb2()
    for name in info["models"]:
        # Parsed again here straight from the file with Triton's schema (unknown fields would fail).
        config = pb.ModelConfig()
        text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
        assert config.name == name
        if name == "gpt":
            assert config.platform == "ensemble" and len(config.ensemble_scheduling.step) == 3
            assert (repo / name / "1").is_dir()
        else:
            assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
            assert (repo / name / "1" / "model.onnx").is_file()
            assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    model = tir.load(src / "model.onnx").model
    feeds = generate_inputs(model, {"batch": 2, "sequence": 16}, seed=2)
    whole = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds)))
    got = _run_ensemble(repo, "gpt", feeds)
    for k in ref:
        assert np.max(np.abs(got[k] - ref[k])) <= 1e-5 * np.max(np.abs(ref[k]))


def test_single_model_and_cli(pipeline, tmp_path, cli):
    src, dst = pipeline
    r = cli("export-triton", src, "-o", tmp_path / "single", "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["ensemble"] is None and info["validated_configs"] == 1
    assert cli("export-triton", dst, "-o", tmp_path / "single").code == 2  # exists
    assert cli("export-triton", tmp_path / "nothing", "-o", tmp_path / "x").code == 2


def test_validation_catches_broken_configs(pipeline, tmp_path):
    _, dst = pipeline
    repo = tmp_path / "repo"
    export_triton(dst, repo, name="gpt")
    stage = repo / "gpt_stage1" / "config.pbtxt"
    original = stage.read_text()
    stage.write_text(original + "\nnot_a_field: 3\n")
    with pytest.raises(BadInputError, match="not a valid Triton model config"):
        validate_repository(repo)
    stage.write_text(original.replace("TYPE_FP32", "TYPE_FLOAT32", 1))
    with pytest.raises(BadInputError, match="not a valid Triton model config"):
        validate_repository(repo)
    stage.write_text(original)
    ensemble = repo / "gpt" / "config.pbtxt"
    text = ensemble.read_text()
    pb = model_config_pb2()
    config = pb.ModelConfig()
    text_format.Parse(text, config)
    steps = list(config.ensemble_scheduling.step)
    del config.ensemble_scheduling.step[:]
    config.ensemble_scheduling.step.extend([steps[1], steps[0], steps[2]])  # out of order: reads before produced
    ensemble.write_text(text_format.MessageToString(config))
    with pytest.raises(BadInputError, match="before it is produced"):
        validate_repository(repo)


# --- GPU artifacts (issue 17) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory):
    """A small model compiled (without verification) for a CPU, a CUDA and two TensorRT targets, and one
    whose batch dimension is fixed."""
    import onnx
    import tfgraph
    from tests.conftest import make_mlp

    root = tmp_path_factory.mktemp("triton-gpu")
    onnx.save(make_mlp(), root / "mlp.onnx")
    fixed = make_mlp()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(fixed, root / "fixed.onnx")
    for target in ("cpu-fp32", "cuda-fp16", "tensorrt-fp16", "tensorrt-int8"):
        tfgraph.compile(root / "mlp.onnx", target=target, output=root / target, verify=False)
    tfgraph.compile(root / "fixed.onnx", target="cuda-fp16", output=root / "fixed", verify=False)
    return root


def _config(repo, name):
    pb = model_config_pb2()
    config = pb.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
    return config


@pytest.mark.parametrize("target, kind, precision", [("cpu-fp32", "KIND_CPU", None), ("cuda-fp16", "KIND_GPU", None),
                                                     ("tensorrt-fp16", "KIND_GPU", "FP16"),
                                                     ("tensorrt-int8", "KIND_GPU", "INT8")])
def test_gpu_artifacts_get_gpu_instances_and_batching(gpu_artifacts, tmp_path, target, kind, precision):
    pb = model_config_pb2()
    info = export_triton(gpu_artifacts / target, tmp_path / "repo", name="m")
    assert (info["instance_kind"], info["max_batch_size"], info["batch_axis"]) == (kind, 8, "batch")
    validate_repository(tmp_path / "repo")  # Triton's schema, and dims + batch axis = the ONNX rank
    config = _config(tmp_path / "repo", "m")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.Kind.Value(kind)
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert [list(t.dims) for t in [*config.input, *config.output]] == [[-1, 16], [-1, 16]]  # batch axis left out
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if precision is None:
        assert not accelerators
    else:
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert dict(accelerators[0].parameters) == {"precision_mode": precision, "trt_engine_cache_enable": "1",
                                                    "trt_timing_cache_enable": "1"}
        assert 'name: "tensorrt"' in (tmp_path / "repo" / "m" / "config.pbtxt").read_text()


def test_export_triton_overrides(gpu_artifacts, tmp_path, cli):
    pb = model_config_pb2()
    r = cli("export-triton", gpu_artifacts / "tensorrt-fp16", "-o", tmp_path / "a", "--name", "m",
            "--instance-kind", "cpu", "--max-batch-size", "0", "--json")
    assert r.code == 0, r.err
    config = _config(tmp_path / "a", "m")
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU and config.max_batch_size == 0
    assert not config.HasField("dynamic_batching") and not config.HasField("optimization")
    assert list(config.input[0].dims) == [-1, -1, 16]
    r = cli("export-triton", gpu_artifacts / "cpu-fp32", "-o", tmp_path / "b", "--name", "m",
            "--instance-kind", "gpu", "--max-batch-size", "32", "--json")
    assert r.code == 0, r.err
    assert (json.loads(r.out)["instance_kind"], _config(tmp_path / "b", "m").max_batch_size) == ("KIND_GPU", 32)
    # A fixed batch dimension: no batching by default, and asking for it is refused.
    r = cli("export-triton", gpu_artifacts / "fixed", "-o", tmp_path / "c", "--json")
    assert r.code == 0 and json.loads(r.out)["max_batch_size"] == 0
    r = cli("export-triton", gpu_artifacts / "fixed", "-o", tmp_path / "d", "--max-batch-size", "4")
    assert r.code == 2 and "batch" in r.err and not (tmp_path / "d").exists()


def test_validation_catches_batch_dims_mismatch(gpu_artifacts, tmp_path):
    export_triton(gpu_artifacts / "cuda-fp16", tmp_path / "repo", name="m")
    path = tmp_path / "repo" / "m" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 0"))
    with pytest.raises(BadInputError, match="max_batch_size 0, but rank 3"):
        validate_repository(tmp_path / "repo")
