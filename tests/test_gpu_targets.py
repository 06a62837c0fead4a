"""CUDA and TensorRT profiles without a GPU: compiles verified on CPU (same graph), op coverage
against the checked-in CUDA/TensorRT tables, and a deliberately unsupported op caught by it."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tfgraph
from tfgraph.passes import create_pass
from tfgraph.passes.weight_only_quant import dequantize_blocks, quantize_blocks

pytest.importorskip("torch", reason="exports need the 'export' extra (torch)")


def _ops(model) -> collections.Counter:
    return collections.Counter(f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.all_nodes())


def _float16_nodes(model, op_type: str) -> int:
    """Nodes of ``op_type`` whose float inputs (those with a known type) are all float16."""
    count = 0
    for n in model.graph.all_nodes():
        types = {v.dtype.name for v in n.inputs if v is not None and v.dtype is not None} & {"FLOAT", "FLOAT16"}
        count += n.op_type == op_type and types == {"FLOAT16"}
    return count


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny BERT- and GPT-style built-ins, exported once per exporter."""
    from tfgraph.export import export

    folder = tmp_path_factory.mktemp("gpu-targets")
    paths = {}
    for name, exporter in (("bert-small", "torchscript"), ("gpt-small", "dynamo")):
        paths[name] = folder / f"{name}-{exporter}.onnx"
        export(name, paths[name], exporter=exporter)
    return paths


@pytest.mark.parametrize("name", ["bert-small", "gpt-small"])
def test_cuda_fp16(exported, name):
    artifact = tfgraph.compile(exported[name], target="cuda-fp16")
    manifest = artifact.manifest
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["providers_unavailable"]["CUDAExecutionProvider"]
    # Every node is in the CUDA EP's published kernel table, types included (fp16 GQA, Attention…).
    place = manifest["placement"]
    assert place["source"].startswith("op table cuda") and place["fallback_count"] == 0, place["fallback"]
    ops = _ops(artifact.model)
    if name == "gpt-small":  # causal → GroupQueryAttention, whose CUDA kernel is fp16/bf16 only
        assert ops["com.microsoft.GroupQueryAttention"] == 2
        assert _float16_nodes(artifact.model, "GroupQueryAttention") == 2
    else:
        assert ops["com.microsoft.Attention"] == 2 and ops["com.microsoft.SkipLayerNormalization"] >= 4
        assert _float16_nodes(artifact.model, "Attention") == 2
    acc = next(iter(manifest["precision"]["accuracy_vs_fp32"].values()))
    assert acc["finite"] and acc["cosine"] >= 0.9999
    # IO stays fp32: the artifact is a drop-in replacement.
    assert all(v.dtype.name in ("FLOAT", "INT64") for v in [*artifact.model.graph.inputs, *artifact.model.graph.outputs])


def test_cuda_int8_weights_in_8bit_blocks(exported):
    artifact = tfgraph.compile(exported["bert-small"], target="cuda-int8")
    manifest = artifact.manifest
    assert manifest["verification"]["passed"] and manifest["placement"]["fallback_count"] == 0
    ops = _ops(artifact.model)
    # 2 layers × (Q, K, V, output, FFN in, FFN out) projections.
    assert ops["com.microsoft.MatMulNBits"] == 12 and ops["ai.onnx.MatMul"] == 0
    acc = next(iter(manifest["precision"]["accuracy_vs_fp32"].values()))
    assert acc["cosine"] >= 0.999
    nbits = next(r for r in manifest["passes"] if r["name"] == "quantize-weights-nbits")
    assert nbits["report"]["quantized"] == 12 and nbits["report"]["max_relative_weight_error"] < 0.01


@pytest.mark.parametrize("bits", [8, 4])
def test_block_quantization_matches_numpy(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 24)).astype(np.float32)  # K not a multiple of the block
    q, scale, zero = quantize_blocks(w, bits, 32)
    assert q.shape == (24, 3, 32 * bits // 8)
    approx = dequantize_blocks(q, scale, zero, 70, bits, 32)
    # Each element is within half a quantization step of its block.
    step = np.repeat(scale.reshape(24, 3), 32, axis=1)[:, :70].T
    assert np.all(np.abs(approx - w) <= step / 2 + 1e-6)


def test_matmulnbits_runs_like_the_dequantized_weight():
    """The pass's MatMulNBits on onnxruntime equals x @ the dequantized weight."""
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 96])],
                              [numpy_helper.from_array(w, "W")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = create_pass("quantize-weights-nbits", bits=8, block_size=32)(model)
    assert result.modified and [n.op_type for n in model.graph] == ["MatMulNBits"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    q, scale, zero = quantize_blocks(w, 8, 32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequantize_blocks(q, scale, zero, 64, 8, 32),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["tensorrt-fp16", "tensorrt-int8"])
def test_tensorrt_standard_onnx_only(exported, target):
    artifact = tfgraph.compile(exported["gpt-small"], target=target)
    manifest = artifact.manifest
    assert manifest["verification"]["passed"]
    assert manifest["placement"]["source"].startswith("op table tensorrt")
    assert manifest["placement"]["fallback_count"] == 0, manifest["placement"]["fallback"]
    domains = {n.domain for n in artifact.model.graph.all_nodes()}
    assert domains <= {"", "ai.onnx"}, domains
    assert not artifact.model.functions  # neutral ops inlined: TensorRT sees plain MatMul/Softmax
    assert manifest["attention"]["fused_ops"] == {"tfgraph::StandardAttention": 2}
    if target == "tensorrt-int8":  # explicit quantization: symmetric int8 Q/DQ on MatMul inputs
        ops = _ops(artifact.model)
        assert ops["ai.onnx.QuantizeLinear"] > 0 and ops["ai.onnx.DequantizeLinear"] > ops["ai.onnx.QuantizeLinear"]
        for node in artifact.model.graph.all_nodes():
            if node.op_type == "QuantizeLinear":
                zp = node.inputs[2].const_value.numpy()
                assert zp.dtype == np.int8 and not zp.any()


def _with_unsupported_op(path, tmp_path):
    """gpt-small with a `Det` (which TensorRT 10.1 lists as not supported) on a side input/output."""
    model = onnx.load(path)
    model.graph.input.append(helper.make_tensor_value_info("det_in", TensorProto.FLOAT, [3, 3]))
    model.graph.node.append(helper.make_node("Det", ["det_in"], ["det_out"]))
    model.graph.output.append(helper.make_tensor_value_info("det_out", TensorProto.FLOAT, []))
    out = tmp_path / "with-det.onnx"
    onnx.save(model, out)
    return out


def test_tensorrt_coverage_flags_unsupported_op(cli, exported, tmp_path):
    model = _with_unsupported_op(exported["gpt-small"], tmp_path)
    # Without --strict: compiled, with the fallback in the placement report and a warning.
    result = cli("compile", model, "--target", "tensorrt-fp16", "-o", tmp_path / "a", "--json", "--no-verify")
    assert result.code == 0, result.err
    place = json.loads(result.out)["placement"]
    assert place["fallback_ops"] == {"Det": 1} and place["unexpected_fallback"] == 1
    assert "not supported" in place["fallback"][0]["reason"]
    # With --strict: exit 1, the op named, nothing written.
    result = cli("compile", model, "--target", "tensorrt-fp16", "-o", tmp_path / "b", "--strict", "--no-verify")
    assert result.code == 1 and "Det" in result.err
    assert not (tmp_path / "b").exists()


def test_cpu_int8_summary_prints(cli, exported, tmp_path):
    """The CLI summary of a precision compile (the quantize pass reports a dict, not rule counts)."""
    result = cli("compile", exported["bert-small"], "--target", "cpu-int8", "-o", tmp_path / "q")
    assert result.code == 0, result.err
    assert "placement (onnxruntime session): CPUExecutionProvider" in result.out


def test_gpu_check_skips_cleanly_without_cuda(capsys):
    import importlib.util
    import pathlib

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA EP: gpu_check would run for real")
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert "skipped: onnxruntime" in capsys.readouterr().out
