"""OpenVINO targets: tiny BERT-style and GPT-style models compiled for each OpenVINO profile run on
the real OpenVINO runtime here, within tolerance of the fp32 input model, with no unexpected CPU
fallback, and openvino-int8 emits 8-bit Q/DQ only.

The runtime: the plugin EP (onnxruntime-ep-openvino) where it lists a device, else plain OpenVINO
(the plugin only claims Intel-vendor devices; targets/openvino.py has the evidence).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tfgraph
from tfgraph.deploy import runtime
from tfgraph.targets import get_target

ov = pytest.importorskip("openvino", reason="the OpenVINO checks need the 'openvino' package")
from tfgraph.targets import openvino as ovt  # noqa: E402

PROFILES = ("openvino-fp32", "openvino-bf16", "openvino-int8")
SHAPES = {"batch": 2, "sequence": 12}


def _ep_usable() -> bool:
    return runtime.unavailable_reason(get_target("openvino-fp32").providers[0]) is None


@pytest.fixture(scope="module")
def raw_models(tmp_path_factory):
    from tfgraph.compiler.export import export

    root = tmp_path_factory.mktemp("ov-models")
    paths = {}
    for name in ("bert-small", "gpt-small"):
        paths[name] = root / f"{name}.onnx"
        export(name, paths[name])
    return paths


def _compiled(raw_models, tmp_path_factory, name, profile, cache={}):  # noqa: B006 - module cache
    key = (name, profile)
    if key not in cache:
        out = tmp_path_factory.mktemp(f"{name}-{profile}") / "out"
        cache[key] = tfgraph.compile(raw_models[name], profile, output=out, shapes=SHAPES)
    return cache[key]


def _run(artifact, feeds, profile):
    target = get_target(profile)
    if _ep_usable():
        sess = runtime.session(str(artifact.path / "model.onnx"), target.providers, options=target.session_options)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    return ovt.run_openvino(artifact.path / "model.onnx", feeds, target)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_plugin_ep_devices_or_reason():
    """The plugin registers; where it lists no device, the reason is the vendor filter (this AMD host)."""
    pytest.importorskip("onnxruntime_ep_openvino", reason="the plugin package is not installed")
    why = runtime.unavailable_reason(get_target("openvino-fp32").providers[0])
    cpu = [d for d in ort.get_ep_devices() if d.ep_name == runtime.CPU]
    if why is None:
        return
    assert "lists no device" in why
    assert cpu and cpu[0].device.vendor_id != 0x8086, "an Intel CPU should have an OpenVINO EP device"


@pytest.mark.parametrize("name", ["bert-small", "gpt-small"])
@pytest.mark.parametrize("profile", PROFILES)
def test_runs_on_openvino_within_tolerance(raw_models, tmp_path_factory, name, profile):
    target = get_target(profile)
    artifact = _compiled(raw_models, tmp_path_factory, name, profile)
    manifest = artifact.manifest
    # Placement: from the EP's session or plain OpenVINO; no fallback beyond what the profile documents.
    placement = manifest["placement"]
    assert placement["unexpected_fallback"] == 0, placement
    if not _ep_usable():  # verified and placed by plain OpenVINO, the runtime the EP embeds
        assert manifest["verification"]["session"]["providers"] == [ovt.NAME]
        assert placement["source"].startswith("openvino ")
    # Attention fused and lowered to what the profile says (no window attributes, no tfgraph ops left).
    compiled = onnx.load(artifact.path / "model.onnx", load_external_data=False)
    domains = {n.domain for n in compiled.graph.node}
    assert "tfgraph" not in domains
    assert manifest["attention"]["unfused"] == 0
    assert manifest["attention"]["fused_ops"] == {"com.microsoft::Attention": 2}
    opset = next(o.version for o in compiled.opset_import if o.domain in ("", "ai.onnx"))
    assert target.opset[0] <= opset <= target.opset[1]
    # The real runtime against the fp32 input model, on non-padded positions.
    source = onnx.load(raw_models[name])
    from tfgraph.ir import load as ir_load
    from tfgraph.compiler.verify import generate_inputs, padded_positions

    feeds = generate_inputs(ir_load(raw_models[name]).model, {"batch": 3, "sequence": 9}, seed=7)
    reference = ort.InferenceSession(source.SerializeToString(), providers=[runtime.CPU])
    want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
    got = _run(artifact, feeds, profile)
    assert set(got) == set(want)
    keep = padded_positions(feeds)
    for out, expected in want.items():
        actual = got[out]
        assert np.all(np.isfinite(actual)), out
        if keep is not None and expected.shape[:2] == keep.shape:
            actual, expected = actual[~keep], expected[~keep]
        if target.quantization is None:
            np.testing.assert_allclose(actual, expected, atol=target.tolerance.atol, rtol=target.tolerance.rtol,
                                       err_msg=f"{profile} {name} {out}")
        else:
            assert _cosine(actual, expected) >= target.min_cosine, (profile, name, out)


def test_int8_emits_8bit_qdq_only(raw_models, tmp_path_factory):
    artifact = _compiled(raw_models, tmp_path_factory, "bert-small", "openvino-int8")
    model = onnx.load(artifact.path / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "openvino-int8 placed no Q/DQ"
    allowed = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}
    for node in qdq:
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "QuantizeLinear":
            assert zero_point in inits, node.name  # the integer type comes from the zero point
        if zero_point in inits:
            assert inits[zero_point].data_type in allowed, (node.name, inits[zero_point].data_type)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].data_type in allowed, node.name
    scheme = get_target("openvino-int8").quantization
    assert {scheme.activation_type, scheme.weight_type} <= {"uint8", "int8"}


def test_query_placement_reports_unconvertible_nodes(tmp_path):
    """A node OpenVINO's frontend cannot convert is a fallback in the placement report."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu"),
         helper.make_node("NoSuchOp", ["y"], ["z"], domain="example.custom", name="custom"),
         helper.make_node("Add", ["z", "y"], ["w"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = ovt.query_placement(str(path), get_target("openvino-fp32"))
    assert [n["name"] for n in report.fallback] == ["custom"]
    assert [n["name"] for n in report.unexpected] == ["custom"]


def test_bf16_request_on_this_cpu():
    """bf16 is OpenVINO's request; a CPU without bf16 compiles fp32 (reported, not an error). OpenVINO
    names the type ``bf16`` or ``bfloat16`` depending on its version: both count."""
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    config = ovt.openvino_config(get_target("openvino-bf16"))
    assert config == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert ovt.openvino_config(get_target("openvino-fp32")) == {"INFERENCE_PRECISION_HINT": "f32"}
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    compiled = ov.Core().compile_model(ov.Core().read_model(helper.make_model(graph).SerializeToString(), b""), "CPU", config)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    assert ("bf16" in precision or "bfloat16" in precision) == ("BF16" in caps), (precision, caps)
    # The compile reports what ran: the probe agrees with the CPU's capabilities.
    reported = ovt.runtime_precision(get_target("openvino-bf16"))
    assert reported["requested"] == "bf16"
    assert reported["used"] == ("bf16" if "BF16" in caps else "f32"), (reported, caps)
    assert ovt.runtime_precision(get_target("openvino-fp32"))["used"] == "f32"
