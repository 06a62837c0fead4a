"""Type-correct GPU lowering for every export (issue 17).

Every cuda-fp16 / cuda-int8 / tensorrt-fp16 / tensorrt-int8 compile of the test architectures has zero
unexpected CPU fallbacks (placement from the CUDA/TensorRT operator tables here) and no node kept in fp32
because an element type was unknown. Before: a dynamo export's GroupQueryAttention stopped onnxruntime's
symbolic inference (its present key/value untyped), everything after it stayed untyped and fp32 (GQA's
CUDA kernel is fp16-only: a CPU fallback), and the final RMSNorm's body left two CastLike (no CUDA kernel).

Exports come from conftest's session cache (shared with tests/test_hf_attention.py); each compile runs
without verification (on this machine it would rerun the same graph on the CPU EP: placement comes from
the op table). The default run covers every architecture once, both exporters on GPT-2 and Llama, eager
and SDPA on Llama; ``TFGRAPH_FULL_MATRIX=1`` runs every (architecture, exporter, attention) (``-m slow``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

import tfgraph
from tfgraph.passes import create_pass
from tfgraph.passes.element_types import unknown_types

from _gpu import kept_for_unknown_type, table_fallbacks

PROFILES = ("cuda-fp16", "cuda-int8", "tensorrt-fp16", "tensorrt-int8")
HF_ARCHITECTURES = ("bert", "albert", "gpt2", "llama", "mistral", "qwen2", "phi", "gpt_neo")
BUILTINS = ("bert-small", "gpt-small")
EXPORTERS = ("dynamo", "torchscript")
# Every architecture once; both exporters on GPT-2 and Llama; eager and SDPA on Llama. Most of these exports
# are made anyway by tests/test_hf_attention.py (bert, albert, gpt2, llama, mistral) in the same session.
DEFAULT = (
    ("bert", "torchscript", "sdpa"), ("albert", "dynamo", "eager"), ("gpt2", "dynamo", "sdpa"),
    ("gpt2", "torchscript", "eager"), ("llama", "dynamo", "sdpa"), ("llama", "torchscript", "sdpa"),
    ("llama", "dynamo", "eager"), ("mistral", "dynamo", "sdpa"), ("qwen2", "dynamo", "sdpa"),
    ("phi", "torchscript", "sdpa"), ("gpt_neo", "torchscript", "eager"),
)
FULL = os.environ.get("TFGRAPH_FULL_MATRIX") == "1"


def _cases():
    from tfgraph.models.hf_configs import HF_KINDS

    if not FULL:
        return [c for c in DEFAULT if c[0] in HF_KINDS]
    cases = [(kind, exporter, attention) for kind in HF_ARCHITECTURES if kind in HF_KINDS for exporter in EXPORTERS
             for attention in (("eager",) if kind == "gpt_neo" else ("eager", "sdpa"))]  # GPT-Neo: eager only
    return cases + [(name, exporter, None) for name in BUILTINS for exporter in EXPORTERS]


def _params():
    for kind, exporter, attention in _cases():
        for profile in PROFILES:
            yield pytest.param(kind, exporter, attention, profile, marks=pytest.mark.slow,
                               id=f"{kind}-{exporter}-{attention or 'builtin'}-{profile}")


@pytest.mark.parametrize("kind, exporter, attention, profile", list(_params()))
def test_no_unexpected_cpu_fallback(onnx_export, kind, exporter, attention, profile):
    pytest.importorskip("transformers", reason="needs the 'hf' extra")
    path = onnx_export(kind, exporter, attention)
    artifact = tfgraph.compile(path, target=profile, verify=False)
    manifest = artifact.manifest
    assert not table_fallbacks(artifact), manifest["placement"]["fallback"]
    assert not kept_for_unknown_type(manifest)
    if profile.startswith("cuda"):  # every value the fp16 conversion and the placement read has an element type
        assert not unknown_types(artifact.model)
        assert not any(n.op_type == "CastLike" for n in artifact.model.graph.all_nodes())


def test_llama_dynamo_cuda_fp16_verified(onnx_export):
    """The dynamo Llama through cuda-fp16 with verification: GQA in fp16, the final RMSNorm inlined with
    its CastLikes resolved, outputs within the fp16 tolerance of the fp32 export."""
    pytest.importorskip("transformers", reason="needs the 'hf' extra")
    artifact = tfgraph.compile(onnx_export("llama", "dynamo", "sdpa"), target="cuda-fp16")
    manifest = artifact.manifest
    assert not table_fallbacks(artifact)
    from tests._checks import assert_matches_source

    assert_matches_source(artifact, onnx_export("llama", "dynamo", "sdpa"))  # within fp16 tolerance of the fp32 export
    gqa = [n for n in artifact.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.inputs[0].dtype == ir.DataType.FLOAT16 for n in gqa)
    decomposed = next(r for r in manifest["passes"] if r["name"] == "decompose-unsupported")["report"]["decomposed"]
    assert decomposed == {"tfgraph.RMSNormalization (inlined)": 1, "CastLike": 2}
    assert not artifact.model.functions


# --- the pieces, on small graphs ---------------------------------------------------------------------------


def _gqa_model() -> ir.Model:
    """q/k/v → GroupQueryAttention (no past) → Add(bias): the stock symbolic engine stops at the GQA."""
    f32, i32 = ir.DataType.FLOAT, ir.DataType.INT32
    q, k, v = (ir.Value(name=n, type=ir.TensorType(f32), shape=ir.Shape(["batch", "sequence", 16])) for n in "qkv")
    seqlens = ir.Value(name="seqlens_k", type=ir.TensorType(i32), shape=ir.Shape(["batch", 1]))
    total = ir.Value(name="total", type=ir.TensorType(i32), shape=ir.Shape([1]))
    gqa = ir.node("GroupQueryAttention", [q, k, v, None, None, seqlens, total], domain="com.microsoft",
                  attributes={"num_heads": 2, "kv_num_heads": 2}, num_outputs=3)
    for value, name in zip(gqa.outputs, ("attn", "present_key", "present_value")):
        value.name = name
    bias = ir.Value(name="bias", const_value=ir.tensor(np.ones(16, np.float32), name="bias"))
    add = ir.node("Add", [gqa.outputs[0], bias])
    add.outputs[0].name = "y"
    graph = ir.Graph([q, k, v, seqlens, total], [add.outputs[0]], nodes=[gqa, add], initializers=[bias],
                     opset_imports={"": 18, "com.microsoft": 1})
    return ir.Model(graph, ir_version=9)


def test_infer_shapes_types_contrib_ops_and_what_follows():
    model = _gqa_model()
    create_pass("infer-shapes")(model)
    assert unknown_types(model) == []
    assert {v.name: v.dtype for v in model.graph.node(0).outputs} == {
        "attn": ir.DataType.FLOAT, "present_key": ir.DataType.FLOAT, "present_value": ir.DataType.FLOAT}
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT


def test_float16_keeps_schema_fixed_outputs_float():
    """SkipLayerNormalization's mean/inv_std_var are float by its schema, whatever the input type."""
    from tfgraph.passes.element_types import output_may_be

    node = ir.node("SkipLayerNormalization", [], domain="com.microsoft", num_outputs=4)
    assert [output_may_be(node, i, ir.DataType.FLOAT16, 1) for i in range(4)] == [True, False, False, True]
    norm = ir.node("LayerNormalization", [], num_outputs=3)
    assert [output_may_be(norm, i, ir.DataType.FLOAT16, 18) for i in range(3)] == [True, False, False]


def _castlike_model(constant: bool) -> ir.Model:
    like = ir.Value(name="like", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([2]))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    inputs = [like] if constant else [like, x]
    two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32), name="two"))
    cast = ir.node("CastLike", [two if constant else x, like])
    mul = ir.node("Mul", [like, cast.outputs[0]])
    mul.outputs[0].name = "y"
    graph = ir.Graph(inputs, [mul.outputs[0]], nodes=[cast, mul], initializers=[two] if constant else [],
                     opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


@pytest.mark.parametrize("constant", [True, False])
def test_castlike_resolved_for_cuda(constant):
    import onnxruntime as ort

    model = _castlike_model(constant)
    feeds = {"like": np.array([1.5, -2.0], np.float16), **({} if constant else {"x": np.array([3.0, 4.0], np.float32)})}
    before = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    create_pass("infer-shapes")(model)
    result = create_pass("decompose-unsupported", table="cuda")(model)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert "CastLike" not in ops and ("Constant" if constant else "Cast") in ops
    after = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    np.testing.assert_array_equal(before, after)


def test_neutral_function_with_ops_the_table_lacks_is_inlined():
    """tfgraph.RMSNormalization's body holds CastLike (no CUDA kernel): its calls are inlined, the CastLikes
    become constants, every value typed; outputs unchanged."""
    import onnxruntime as ort

    from tfgraph import ops

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 8]))
    scale = ir.Value(name="scale", const_value=ir.tensor(np.linspace(0.5, 1.5, 8).astype(np.float32), name="scale"))
    node = ir.node("RMSNormalization", [x, scale], domain=ops.DOMAIN, attributes={"epsilon": 1e-6})
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[scale], opset_imports={"": 18}), ir_version=9)
    ops.ensure_defined(model, "RMSNormalization")
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    before = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    decompose = create_pass("decompose-unsupported", table="cuda", inline_functions=True)
    assert decompose(model).modified
    assert decompose.report["decomposed"] == {"tfgraph.RMSNormalization (inlined)": 1, "CastLike": 2}
    assert not model.functions and ops.DOMAIN not in model.opset_imports
    assert unknown_types(model) == [] and "CastLike" not in [n.op_type for n in model.graph]
    after = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(before, after, rtol=1e-6, atol=1e-6)
