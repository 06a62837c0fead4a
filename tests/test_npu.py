"""NPU-style targets (npu-a16w8, npu-a8w8) on the real QNN execution provider (onnxruntime-qnn's HTP
backend, a simulator on x86-64 Linux), and the static-shape specialization they need.

Tiny BERT- and GPT-style models (2 layers, hidden 64) at batch 1, sequence 16: the HTP simulator
takes about a second per such compile-and-run.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_ir as ir

from tfgraph.errors import BadInputError

SEQ = 16
# Cosine to fp32 on these tiny random-weight models (measured 0.99985 and up on both schemes).
MIN_COSINE = {"npu-a16w8": 0.999, "npu-a8w8": 0.998}


def _qnn_usable():
    from tfgraph.deploy import runtime
    from tfgraph.targets import get_target

    _, missing = runtime.usable(get_target("npu-a16w8").providers)
    return "; ".join(missing.values()) or None


# --- specialize-shapes ---------------------------------------------------------------------


def _dynamic_model() -> onnx.ModelProto:
    """x[batch, sequence, 8] with the shape chains exporters write: Shape -> Gather -> Concat ->
    Reshape (with 0/-1), a ConstantOfShape mask, a Range over the sequence, Size, Expand."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Unsqueeze", ["t", "ax0"], ["t1"]),
        helper.make_node("Concat", ["b1", "t1", "two", "minus1"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["h", "split_shape"], ["h4"]),  # (b, t, 2, 4)
        helper.make_node("Reshape", ["h4", "keep_merge"], ["h3"]),  # [0, 0, -1]
        helper.make_node("Shape", ["h3"], ["s3"], start=1, end=2),
        helper.make_node("ConstantOfShape", ["s3"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Range", ["zero_s", "t", "one_s"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pos_f", "ones"], ["pos_w"]),
        helper.make_node("Unsqueeze", ["pos_w", "ax1"], ["pos_col"]),  # (t, 1)
        helper.make_node("Size", ["h3"], ["n"]),
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pos_col", "n_f"], ["pos_scaled"]),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Expand", ["pos_scaled", "sx"], ["pos_full"]),
        helper.make_node("Add", ["h3", "pos_full"], ["y"]),
    ]
    inits = [w, i64("zero", 0), i64("one", 1), i64("ax0", [0]), i64("ax1", [1]), i64("two", [2]), i64("minus1", [-1]),
             i64("keep_merge", [0, 0, -1]), i64("zero_s", 0), i64("one_s", 1)]
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(model, feeds):
    from tfgraph.compiler.verify import UNOPTIMIZED, run

    return run(model, feeds, options=UNOPTIMIZED)


def test_specialize_shapes_folds_every_shape_computation():
    from tfgraph.passes import create_pass

    proto = _dynamic_model()
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    expected = _run(ir.serde.deserialize_model(proto), {"x": x})["y"]
    model = ir.serde.deserialize_model(proto)
    p = create_pass("specialize-shapes", shapes={"x": (2, 5, 8)})
    assert p(model).modified
    ops = [n.op_type for n in model.graph]
    assert not {"Shape", "Size", "ConstantOfShape", "Range", "Gather", "Concat"} & set(ops), ops
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert len(reshapes) == 2
    for node in reshapes:  # constant targets, no 0 (copy) or -1 (infer)
        shape = node.inputs[1].const_value.numpy()
        assert (shape > 0).all() and list(shape) == list(node.outputs[0].shape)
    assert [list(v.shape) for v in model.graph.outputs] == [[2, 5, 8]]
    assert all(all(isinstance(d, int) for d in v.shape) for n in model.graph for v in n.outputs)
    assert p.report["dynamic_left"] == [] and p.report["unknown_shapes"] == 0
    np.testing.assert_allclose(_run(model, {"x": x})["y"], expected, rtol=1e-6, atol=1e-6)
    # Idempotent, and honest about it.
    assert not create_pass("specialize-shapes")(model).modified


def test_specialize_shapes_binds_named_dims_and_names_what_is_missing():
    from tfgraph.passes import create_pass
    from tfgraph.passes.static_shapes import pin_input_shapes

    model = ir.serde.deserialize_model(_dynamic_model())
    with pytest.raises(BadInputError, match=r"\bx\b.*batch.*sequence"):
        create_pass("specialize-shapes")(model)
    # symbol sizes, as --shape sequence=5 gives them
    with pytest.raises(BadInputError, match=r"\bx\b.*batch"):
        create_pass("specialize-shapes", shapes={"sequence": 5})(model)
    assert pin_input_shapes(model.graph, {"batch": 1, "sequence": 4})
    assert list(model.graph.inputs[0].shape) == [1, 4, 8]
    with pytest.raises(BadInputError, match="rank 3"):
        pin_input_shapes(model.graph, {"x": (1, 4)})


# --- NPU targets on the QNN EP ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("torch", reason="exports need the 'export' extra (torch)")
    from _pipeline_models import model_path

    from tfgraph.compiler.export import export

    paths = {name: model_path(tmp_path_factory, name, fused=False) for name in ("bert-small", "gpt-small")}
    # TorchScript's erf GELU: QNN's GELU fusion needs the opset-21 graph (upgrade-opset), else Erf falls back.
    paths["bert-small-torchscript"] = export("bert-small", tmp_path_factory.mktemp("npu-ts") / "bert.onnx",
                                             exporter="torchscript")
    return paths


def _shapes(path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: (1, SEQ) for i in model.graph.input}


@pytest.mark.parametrize(("name", "target"), [
    ("bert-small", "npu-a16w8"), ("bert-small", "npu-a8w8"), ("gpt-small", "npu-a16w8"), ("gpt-small", "npu-a8w8"),
    ("bert-small-torchscript", "npu-a8w8"),
])
def test_npu_target_runs_on_qnn(exported, tmp_path, name, target):
    why = _qnn_usable()
    if why:
        pytest.skip(f"QNN EP not usable here: {why}")
    import tfgraph
    from tfgraph.compiler import precision
    from tfgraph.deploy import runtime
    from tfgraph.ir import load
    from tfgraph.targets import get_target
    from tfgraph.compiler.verify import generate_inputs

    profile = get_target(target)
    out = tmp_path / "out"
    artifact = tfgraph.compile(str(exported[name]), target, output=out, shapes=_shapes(exported[name]))
    manifest = json.loads((out / "manifest.json").read_text())
    # Verified on the QNN EP itself, within the profile's tolerance.
    verification = manifest["verification"]
    assert verification["passed"] is True
    assert verification["session"]["providers"] == ["QNNExecutionProvider"]
    # Placement from the real session: every node on QNN, no CPU fallback at all.
    placement = manifest["placement"]
    assert placement["source"] == "onnxruntime session"
    assert placement["fallback_count"] == 0 and placement["unexpected_fallback"] == 0, placement
    assert set(placement["nodes"]) == {"QNNExecutionProvider"}
    # Standard ops only, static: no contrib/neutral domains, no shape reads, constant Reshape targets.
    model = load(out / "model.onnx").model
    assert {n.domain for n in model.graph} <= {""}
    assert not [n for n in model.graph if n.op_type in ("Shape", "Size")]
    for node in (n for n in model.graph if n.op_type == "Reshape"):
        shape = ir.convenience.get_const_tensor(node.inputs[1])
        assert shape is not None and (shape.numpy() > 0).all(), node
    assert [list(v.shape) for v in model.graph.inputs] == [[1, SEQ]] * len(model.graph.inputs)
    lo, hi = profile.opset
    assert lo <= model.opset_imports[""] <= hi
    kinds = {str(n.inputs[0].dtype) for n in model.graph if n.op_type == "DequantizeLinear"}
    assert kinds == ({"UINT16", "UINT8"} if target == "npu-a16w8" else {"UINT8"}), kinds
    # The artifact, loaded as a service would, on other inputs: within tolerance of the fp32 model.
    source = load(exported[name]).model
    feeds = generate_inputs(source, {"batch": 1, "sequence": SEQ}, seed=7)
    expected = _run(source, feeds)
    session = tfgraph.load(out)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds)))
    report = precision.accuracy(expected, got)
    for output, acc in report.items():
        assert acc["cosine"] >= MIN_COSINE[target], (output, acc)
        assert acc["max_abs"] <= profile.tolerance.atol + profile.tolerance.rtol * np.abs(expected[output]).max()
    from tfgraph.compiler.placement import placement

    assert placement(model, profile).fallback == []
    assert artifact.manifest["precision"]["precision"] == profile.precision


def test_npu_target_without_shapes_exits_2_naming_the_input(cli, exported, tmp_path):
    out = tmp_path / "out"
    # No shape at all: every input is named.
    result = cli("compile", exported["bert-small"], "--target", "npu-a16w8", "-o", out)
    assert result.code == 2, result.err
    message = result.err.strip()
    assert len(message.splitlines()) == 1 and "static shapes" in message, message
    assert all(name in message for name in ("input_ids", "attention_mask", "token_type_ids")), message
    assert not out.exists()
    # The batch given, the sequence still unknown: the input and its dimension are named.
    result = cli("compile", exported["gpt-small"], "--target", "npu-a8w8", "-o", out, "--shape", "batch=1")
    assert result.code == 2, result.err
    assert "input_ids" in result.err and "sequence" in result.err, result.err
    assert not out.exists()
