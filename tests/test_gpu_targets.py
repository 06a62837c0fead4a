"""CUDA and TensorRT profiles: compiles verified on CPU (same graph) where the GPU EPs are absent, op
coverage against the checked-in CUDA/TensorRT tables, a deliberately unsupported op caught by it; the
same tests pass on a CUDA host (verification and placement then come from the CUDA EP). Artifacts for an
accelerator absent here are refused by ``tfgraph.load`` unless ``fallback="cpu"`` (every target), and the
compile summary says in one line near its top where it ran instead."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tfgraph
from tests._checks import assert_matches_source
from tfgraph.passes import create_pass
from tfgraph.passes.weight_only_quant import dequantize_blocks, quantize_blocks

from _gpu import kept_for_unknown_type, table_fallbacks

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


def _runs_here(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


CUDA_HERE = _runs_here("CUDAExecutionProvider")
TENSORRT_HERE = _runs_here("TensorrtExecutionProvider")


@pytest.fixture(scope="module")
def exported(onnx_export):
    """The tiny BERT- and GPT-style built-ins, exported once per test session (conftest's onnx_export)."""
    return {"bert-small": onnx_export("bert-small", "torchscript"), "gpt-small": onnx_export("gpt-small", "dynamo")}


@pytest.mark.parametrize("name", ["bert-small", "gpt-small"])
def test_cuda_fp16(exported, name):
    artifact = tfgraph.compile(exported[name], target="cuda-fp16")
    manifest = artifact.manifest
    assert_matches_source(artifact, exported[name])  # fp16 graph vs the fp32 export, within the profile's tolerance
    place = manifest["placement"]
    if CUDA_HERE:  # verified on the CUDA EP; placement from the real session (shape arithmetic on the CPU on purpose)
        assert manifest["verification"]["session"]["providers"][0] == "CUDAExecutionProvider"
        assert place["source"] == "onnxruntime session" and place["nodes"].get("CUDAExecutionProvider")
    else:
        assert manifest["verification"]["providers_unavailable"]["CUDAExecutionProvider"]
        assert manifest["verification"]["ran_on_instead"] == ("CUDA EP not available here: verified the same graph "
                                                              "on the CPU EP; placement from the CUDA operator table")
        # Every node is in the CUDA EP's published kernel table, types included (fp16 GQA, Attention…).
        assert place["source"].startswith("op table cuda") and place["fallback_count"] == 0, place["fallback"]
    assert not table_fallbacks(artifact) and not kept_for_unknown_type(manifest)
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
    assert not table_fallbacks(artifact) and not kept_for_unknown_type(manifest)
    assert_matches_source(artifact, exported["bert-small"])
    ops = _ops(artifact.model)
    # 2 layers × (Q, K, V, output, FFN in, FFN out) projections.
    assert ops["com.microsoft.MatMulNBits"] == 12 and ops["ai.onnx.MatMul"] == 0
    acc = next(iter(manifest["precision"]["accuracy_vs_fp32"].values()))
    assert acc["cosine"] >= 0.999
    nbits = next(r for r in manifest["passes"] if r["name"] == "quantize-weights-nbits")
    assert nbits["report"]["quantized"] == 12 and nbits["report"]["max_relative_weight_error"] < 0.01


def test_cuda_int4_weights_in_4bit_blocks(exported):
    """cuda-int4: cuda-int8's graph with 4-bit blocks; every projection a MatMulNBits the CUDA table has."""
    artifact = tfgraph.compile(exported["gpt-small"], target="cuda-int4")
    assert not table_fallbacks(artifact) and not kept_for_unknown_type(artifact.manifest)
    assert_matches_source(artifact, exported["gpt-small"])
    nbits = [n for n in artifact.model.graph if n.op_type == "MatMulNBits"]
    assert nbits and {n.attributes.get_int("bits") for n in nbits} == {4}
    assert {n.attributes.get_int("block_size") for n in nbits} == {32}
    int8 = tfgraph.compile(exported["gpt-small"], target="cuda-int8")
    packed = {a: sum(v.const_value.nbytes for v in m.model.graph.initializers.values()
                     if v.const_value is not None and v.const_value.dtype.name == "UINT8")
              for a, m in (("int4", artifact), ("int8", int8))}
    assert packed["int4"] == pytest.approx(packed["int8"] / 2, rel=0.01)  # half the weight bytes of cuda-int8


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
    assert_matches_source(artifact, exported["gpt-small"])
    if not TENSORRT_HERE:
        assert manifest["placement"]["source"].startswith("op table tensorrt")
    assert not table_fallbacks(artifact), manifest["placement"]["fallback"]
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


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT runs here: placement comes from the session, not the table")
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


# --- honest about where it ran -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    """A small model compiled for cuda-fp16 and written (verified on the CPU EP where CUDA is absent)."""
    from tests.conftest import make_mlp

    folder = tmp_path_factory.mktemp("cuda-artifact")
    onnx.save(make_mlp(), folder / "mlp.onnx")
    tfgraph.compile(folder / "mlp.onnx", target="cuda-fp16", output=folder / "out")
    return folder


@pytest.mark.skipif(CUDA_HERE, reason="the CUDA EP runs here: the artifact loads on it")
def test_load_refuses_gpu_artifact_without_its_provider(cuda_artifact):
    from tfgraph.deploy.availability import CpuFallbackWarning

    with pytest.raises(tfgraph.ProviderUnavailableError) as info:
        tfgraph.load(cuda_artifact / "out")
    message = str(info.value)
    assert "cuda-fp16 artifact" in message and "CUDA EP" in message and "cannot run here" in message
    assert "pip install onnxruntime-gpu" in message and "fallback='cpu'" in message
    assert isinstance(info.value, tfgraph.TfgraphError) and set(info.value.missing) == {"CUDAExecutionProvider"}
    with pytest.warns(CpuFallbackWarning, match="CUDA EP not available here.*running on the CPU EP"):
        session = tfgraph.load(cuda_artifact / "out", fallback="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
    y = session.run(None, {"x": np.ones((1, 3, 16), np.float32)})[0]
    assert y.shape == (1, 3, 16) and np.isfinite(y).all()
    with pytest.raises(tfgraph.BadInputError, match="fallback='gpu'"):
        tfgraph.load(cuda_artifact / "out", fallback="gpu")


def test_load_rule_is_the_same_for_every_target(monkeypatch):
    """With every accelerator EP absent: each non-CPU target is refused, naming its EPs and how to install them,
    and opens on the CPU with a warning when asked; CPU targets open on the CPU as always."""
    from tfgraph.deploy import runtime
    from tfgraph.deploy.availability import CpuFallbackWarning, session_providers

    monkeypatch.setattr(runtime, "unavailable_reason",
                        lambda p: None if p.name == runtime.CPU else f"{p.name} is absent (test)")
    hints = {"CUDAExecutionProvider": "pip install onnxruntime-gpu", "TensorrtExecutionProvider": "tensorrt",
             "OpenVINOExecutionProvider": "pip install 'tfgraph[openvino]'", "QNNExecutionProvider": "pip install 'tfgraph[qnn]'"}
    seen = set()
    for target in tfgraph.list_targets():
        name, providers = target.name, target.providers
        accelerators = [p.name for p in providers if p.name != runtime.CPU]
        if not accelerators:
            assert [p.name for p in session_providers(providers)] == [runtime.CPU], name
            continue
        with pytest.raises(tfgraph.ProviderUnavailableError) as info:
            session_providers(providers, artifact=f"{name} artifact")
        assert set(info.value.missing) == set(accelerators), name
        for ep in accelerators:
            assert hints[ep] in str(info.value), (name, str(info.value))
            seen.add(ep)
        with pytest.warns(CpuFallbackWarning):
            assert [p.name for p in session_providers(providers, fallback="cpu")] == [runtime.CPU]
    assert seen == set(hints)  # CUDA, TensorRT, OpenVINO and QNN targets all went through the rule


@pytest.mark.skipif(CUDA_HERE, reason="the CUDA EP runs here: nothing to say")
def test_compile_summary_says_where_it_ran(cli, cuda_artifact, tmp_path):
    result = cli("compile", cuda_artifact / "mlp.onnx", "-t", "cuda-fp16", "-o", tmp_path / "v")
    assert result.code == 0, result.err
    line = "CUDA EP not available here: verified the same graph on the CPU EP; placement from the CUDA operator table"
    assert result.out.splitlines()[0] == line  # the summary's first line, said once
    assert result.out.count("not available here") == 1 and "not verified on" not in result.out
    result = cli("compile", cuda_artifact / "mlp.onnx", "-t", "tensorrt-fp16", "-o", tmp_path / "n", "--no-verify", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["verification"]["ran_on_instead"] == (
        "TensorRT EP and CUDA EP not available here: outputs not verified (--no-verify); "
        "placement from the TensorRT operator table")
    assert json.loads((cuda_artifact / "out" / "manifest.json").read_text())["verification"]["ran_on_instead"]
    cpu = cli("compile", cuda_artifact / "mlp.onnx", "-o", tmp_path / "cpu", "--json")
    assert "ran_on_instead" not in json.loads(cpu.out)["verification"]


def test_final_verification_also_against_the_input_model(mlp_path):
    """convert-float16 re-baselines the per-pass checks; the manifest still says how far the compiled
    graph is from the input model (not only from itself)."""
    import numpy as np
    import onnxruntime as ort

    artifact = tfgraph.compile(mlp_path, "cuda-fp16")
    ver = artifact.manifest["verification"]
    (name, change), = ver["vs_input"].items()
    assert ver["outputs"][name]["max_abs"] < change["max_abs"]  # fp16 rounding is visible only against the input
    from tfgraph.compiler.verify import generate_inputs

    feeds = generate_inputs(artifact.model, None, seed=0)
    want = ort.InferenceSession(str(mlp_path)).run(None, feeds)[0]
    import onnx_ir as ir

    got = ort.InferenceSession(ir.to_proto(artifact.model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert abs(float(np.abs(want - got).max()) - change["max_abs"]) < 1e-6
