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
from tfgraph.stages import partition_artifact  # noqa: E402
from tfgraph.triton import export_triton, model_config_pb2, validate_repository  # noqa: E402
from tfgraph.verify import generate_inputs  # noqa: E402


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
