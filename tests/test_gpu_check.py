"""benchmarks/gpu_check.py, the GPU conformance run: what runs without a GPU (arguments, the model list,
the plan, the criteria and the report) is tested here; without the CUDA EP it stops at once, saying why."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_fails_fast_without_cuda(gpu_check, capsys, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu_check.main([]) == gpu_check.EXIT_NO_CUDA == 2
    err = capsys.readouterr().err
    assert "gpu_check: cannot run" in err and "no CUDAExecutionProvider" in err and "onnxruntime-gpu" in err


def test_arguments_and_plan(gpu_check, capsys):
    args = gpu_check.parse_args([])
    assert args.models == ["bert-base", "gpt2", "llama"] and args.exporters == ["torchscript", "dynamo"]
    assert args.targets == ["cuda-fp16", "cuda-int8"]
    entries = gpu_check.plan(args)
    assert [(e["model"], e["exporter"]) for e in entries] == [
        (m, x) for m in ("bert-base", "gpt2", "llama") for x in ("torchscript", "dynamo")]
    bert, gpt2 = entries[0], entries[2]
    assert bert["shapes"] == ["1x128", "8x128", "32x512"] and not bert["decoder"]
    assert gpt2["shapes"] == ["1x128", "8x128", "1x1024"] and gpt2["decoder"]  # the longest b1 prefill
    assert bert["baselines"] == ["raw-fp32", "ort-fp16", "torch-sdpa-fp16"]
    quick = gpu_check.parse_args(["--quick", "--no-torch"])
    assert gpu_check.plan(quick) == [{"model": "bert-base", "exporter": "torchscript", "targets": ["cuda-fp16", "cuda-int8"],
                                      "shapes": ["8x128"], "decoder": False, "baselines": ["raw-fp32", "ort-fp16"]}]
    assert gpu_check.main(["--list", "--models", "llama", "--exporters", "dynamo"]) == 0  # runs without a GPU
    assert json.loads(capsys.readouterr().out)["model"] == "llama"
    for bad in (["--shapes", "8by128"], ["--targets", "cuda-fp64"], ["--models", "t5"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_model_list_builds_from_configs(gpu_check):
    transformers = pytest.importorskip("transformers")
    for name, spec in gpu_check.MODELS.items():
        config = getattr(transformers, spec.config)(**spec.kwargs)
        assert hasattr(transformers, spec.model_class), name
        assert spec.decoder == (name != "bert-base")
    bert = transformers.BertConfig(**gpu_check.MODELS["bert-base"].kwargs)
    assert (bert.num_hidden_layers, bert.hidden_size, bert.num_attention_heads) == (12, 768, 12)
    llama = transformers.LlamaConfig(**gpu_check.MODELS["llama"].kwargs)
    assert llama.num_attention_heads // llama.num_key_value_heads == 4
    assert config is not None


def _rows():
    rows = []
    for shape, ours, base in (("b8 s128", 0.85, 1.0), ("b32 s512", 7.5, 7.74)):
        rows.append({"model": "bert-base", "exporter": "torchscript", "shape": shape, "variant": "tfgraph-cuda-fp16",
                     "median_ms": ours, "ratio_vs_ort_fp16": ours / base, "within_tolerance": True,
                     "accuracy": {"max_abs": 1e-3, "cosine": 0.99999, "finite": True}})
        rows.append({"model": "bert-base", "exporter": "torchscript", "shape": shape, "variant": "ort-fp16",
                     "median_ms": base, "ratio_vs_ort_fp16": 1.0, "accuracy": {"max_abs": 2e-3, "cosine": 0.9999}})
    for variant, ms in (("tfgraph-cuda-fp16", 2.0), ("tfgraph-cuda-int8", 1.8)):
        rows.append({"model": "gpt2", "exporter": "dynamo", "shape": "b1 s1024", "variant": variant, "median_ms": ms,
                     "accuracy": {"max_abs": 0.01, "cosine": 0.999}})
    rows.append({"model": "gpt2", "exporter": "dynamo", "shape": "b1 s128", "variant": "torch-sdpa-fp16", "error": "OOM"})
    return rows


def test_criteria_and_report(gpu_check, tmp_path):
    compiles = [{"model": "gpt2", "exporter": "dynamo", "target": "cuda-fp16", "seconds": 30.0, "bytes": 250 * 2**20,
                 "nodes": {"CUDAExecutionProvider": 400, "CPUExecutionProvider": 12}, "cpu_nodes": 12, "cpu_non_shape": "none",
                 "verified": True},
                {"model": "gpt2", "exporter": "dynamo", "target": "cuda-int8", "seconds": 31.0, "bytes": 130 * 2**20,
                 "nodes": {"CUDAExecutionProvider": 420}, "cpu_nodes": 0, "cpu_non_shape": "none", "verified": True},
                {"model": "llama", "exporter": "dynamo", "target": "cuda-int8", "error": "boom"}]
    found = {c["criterion"]: c for c in gpu_check.criteria(_rows(), compiles)}
    assert found["cuda-fp16 BERT-base b8 s128 <= 0.9x ort-fp16 (best exporter)"]["passed"] is True
    assert found["cuda-fp16 BERT-base b32 s512 <= 0.9x ort-fp16 (best exporter)"]["passed"] is False  # 0.97
    latency = found["cuda-int8 gpt2 b1 s1024 (longest b1 prefill) <= 0.8x cuda-fp16 latency"]
    assert latency["value"] == pytest.approx(0.9) and latency["passed"] is False
    assert found["cuda-int8 gpt2 weights <= 0.55x cuda-fp16"]["value"] == pytest.approx(0.52)
    assert "cuda-int8 llama weights <= 0.55x cuda-fp16" not in found  # llama measured nothing
    result = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "versions": {"onnxruntime": "1.31.1", "torch": "2.11"},
              "settings": {"rounds": 30, "warmup": 5}, "compiles": compiles, "rows": _rows(),
              "criteria": list(found.values()), "self_test": [{"target": "cuda-fp16", "exit": 0, "summary": "2 passed"}]}
    out = gpu_check.report_path(result["device"], None)
    assert out.name == "gpu_nvidia_h100_80gb_hbm3.md" and out.parent.name == "results"
    written = gpu_check.write_report(result, tmp_path / "gpu_h100.md")
    text = written.read_text()
    assert text.startswith("# CUDA profiles on NVIDIA H100 80GB HBM3")
    assert "| gpt2 | dynamo | cuda-fp16 | 30 s | CUDA 400, CPU 12 | 12 (none) | 250.0 | True |" in text
    assert "| llama | dynamo | cuda-int8 | error: boom |" in text
    assert "| bert-base | torchscript | b8 s128 | tfgraph-cuda-fp16 | 0.850 | 0.85 | 1.00e-03 | 0.999990 | True |" in text
    assert "| gpt2 | dynamo | b1 s128 | torch-sdpa-fp16 | error: OOM |" in text
    assert "| cuda-fp16 BERT-base b32 s512 <= 0.9x ort-fp16 (best exporter) | 0.97 | NO |" in text
    assert "- cuda-fp16: exit 0, 2 passed" in text
    assert json.loads(written.with_suffix(".json").read_text())["device"] == result["device"]
