"""Operator-support tables: the checked-in CUDA and TensorRT tables, the installed runtime's
registry, and coverage over graphs with subgraphs and local functions."""

from __future__ import annotations

import json
import pathlib

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from tfgraph.errors import BadInputError
from tfgraph.targets.op_table import OpTable, load_table, normalize_type, op_counts, runtime_table, table_names

TABLES = pathlib.Path(__file__).resolve().parents[1] / "targets" / "op_tables"


@pytest.fixture(scope="module")
def cuda() -> OpTable:
    return load_table("cuda")


@pytest.fixture(scope="module")
def trt() -> OpTable:
    return load_table("tensorrt")


@pytest.fixture(scope="module")
def cpu() -> OpTable:
    return runtime_table("CPUExecutionProvider")


def test_tables_load_with_their_provenance(cuda, trt):
    assert table_names() == ["cuda", "tensorrt"]
    # Both tables cover the ONNX domain; CUDA's also onnxruntime's contrib ops (what the builder read,
    # checked against its sources in the builder tests below).
    assert {"", "com.microsoft"} <= set(op_counts(cuda)) and set(op_counts(trt)) == {""}
    for table, commit in ((cuda, "735e69a396afe7e1bdfbc6b38c1d43eeb68b8484"), (trt, "96e781103cfc4adf4a6bb557e94bac8e693f6f4c")):
        doc = json.loads((TABLES / f"{table.name}.json").read_text())
        assert doc["commit"] == commit and commit in table.source
        assert doc["retrieved"] and doc["version"] == table.version
        assert (TABLES / f"{table.name}.json").stat().st_size < 300_000
    assert cuda.provider == "CUDAExecutionProvider" and trt.provider == "TensorrtExecutionProvider"
    assert trt.version == "10.1" and trt.version_rule == "opset"
    with pytest.raises(BadInputError, match="available: cuda, tensorrt"):
        load_table("rocm")


def test_type_names_are_one_spelling(cuda):
    for spelling in ("float16", "FLOAT16", "tensor(float16)", ir.DataType.FLOAT16, ir.TensorType(ir.DataType.FLOAT16)):
        assert normalize_type(spelling) == "float16"
    assert (
        normalize_type("seq(tensor(int64))") == normalize_type(ir.SequenceType(ir.TensorType(ir.DataType.INT64))) == "seq(int64)"
    )
    assert normalize_type(None) is None
    every = {t for kernels in cuda.entries.values() for k in kernels for ts in k.types.values() for t in ts}
    assert {"float", "float16", "bfloat16", "int64", "bool", "seq(float)"} <= every
    assert not any(t.startswith("tensor(") or t != t.lower() for t in every)


def test_cuda_supports_the_transformer_ops(cuda):
    assert cuda.supports("", "MatMul", 17, ["float16", "float16"]) is None
    assert cuda.supports("ai.onnx", "LayerNormalization", 17, ["float16", "float16", "float16"]) is None
    # onnxruntime's own LayerNormalization (onnx domain, version 1) covers opsets before 17.
    assert cuda.supports("", "LayerNormalization", 16, ["float", "float", "float"]) is None
    assert cuda.supports("com.microsoft", "Attention", 1, ["float16", "float16", "float16", "int32"]) is None
    assert cuda.supports("com.microsoft", "MultiHeadAttention", 1, ["float16", "float16", "float16"]) is None
    assert cuda.supports("com.microsoft", "MultiHeadAttention", 1, ["bfloat16", "bfloat16", "bfloat16"]) is None
    assert cuda.supports("", "Constant", 17, []) is None  # an initializer once loaded, not a kernel


def test_cuda_flags_real_gaps(cuda):
    # MatMul has float kernels only on CUDA (the CPU provider has int32/int64 ones).
    reason = cuda.supports("", "MatMul", 17, ["int32", "int32"])
    assert reason == "MatMul (cuda kernel 13+): input 0 (A) is int32, T allows bfloat16, double, float, float16"
    # Optional inputs left out (None) are not checked; a mismatch on a later input is.
    assert "input 5 (attention_bias) is int8, T allows" in cuda.supports(
        "com.microsoft", "MultiHeadAttention", 1, ["float16", None, None, None, None, "int8"]
    )
    assert "is not in the cuda operator list" in cuda.supports("", "Det", 17, ["float"])
    assert "is not in the cuda operator list" in cuda.supports("", "NoSuchOp", 17, [])
    assert cuda.supports("com.example", "Thing", 1, []) == "cuda has no ops in domain 'com.example'"
    # onnxruntime's rule: an open-ended kernel serves only the schema version it starts at, so
    # Cast-25 (opset 25) has no CUDA kernel at this commit although "Cast 23+" is listed.
    assert cuda.supports("", "Cast", 23, ["float"]) is None
    assert (
        cuda.supports("", "Cast", 25, ["float"])
        == "Cast has cuda kernels for versions [6, 8], [9, 12], [13, 18], [19, 20], [21, 22], 23+, none for opset 25"
    )


def test_tensorrt_is_onnx_domain_only_with_an_opset_window(trt):
    assert trt.supports("", "MatMul", 17, ["float16", "float16"]) is None
    assert trt.supports("", "LayerNormalization", 17, ["bfloat16"]) is None
    assert trt.supports("com.microsoft", "Attention", 1, ["float16"]) == "tensorrt has no ops in domain 'com.microsoft'"
    assert trt.supports("", "Unique", 17, ["float"]) == "tensorrt 10.1 lists Unique as not supported"
    assert trt.supports("", "MatMul", 21, ["float"]) == "tensorrt 10.1 takes MatMul at opset [9, 20], the model imports opset 21"
    assert "input 0 (A) is int32" in trt.supports("", "MatMul", 17, ["int32", "int32"])
    # Types apply to the first (data) input only: Reshape's int64 shape and DequantizeLinear's
    # float scale are not held against the list.
    assert trt.supports("", "Reshape", 17, ["float16", "int64"]) is None
    assert trt.supports("", "DequantizeLinear", 19, ["int8", "float", "int8"]) is None
    assert "`axes` must be an initializer" in trt.notes[("", "Squeeze")]


def test_cpu_runtime_table_matches_the_installed_runtime(cpu):
    assert cpu.source == f"onnxruntime {ort.__version__} kernel registry"
    # Registry facts of onnxruntime 1.32's CPU provider: MultiHeadAttention has a float kernel only.
    mha = cpu.kernels("com.microsoft", "MultiHeadAttention")
    assert {t for k in mha for t in k.types["T"]} == {"float"}
    assert cpu.supports("com.microsoft", "MultiHeadAttention", 1, ["float"] * 3) is None
    assert "input 0 (query) is float16, T allows float" in cpu.supports("com.microsoft", "MultiHeadAttention", 1, ["float16"] * 3)
    assert cpu.supports("", "MatMul", 17, ["int32", "int32"]) is None
    with pytest.raises(BadInputError, match="registers no kernels for NoSuchExecutionProvider"):
        runtime_table("NoSuchExecutionProvider")


def _session_error(model: onnx.ModelProto) -> str | None:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except OrtNotImplemented as error:
        return str(error)
    return None


@pytest.mark.parametrize("opset", [21, 22])
def test_version_rule_agrees_with_a_real_session(cpu, opset):
    """GlobalLpPool-22 has no CPU kernel (only "2+"): the table and a real session agree."""
    graph = helper.make_graph(
        [helper.make_node("GlobalLpPool", ["x"], ["y"])],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    reason = cpu.supports("", "GlobalLpPool", opset, ["float"])
    error = _session_error(model)
    assert (reason is None) == (error is None)
    if opset == 22:
        assert "Could not find an implementation for GlobalLpPool(22)" in error
        assert reason == "GlobalLpPool has CPUExecutionProvider kernels for versions 2+, none for opset 22"


def _coverage_model() -> ir.Model:
    """Main graph: supported MatMul (float16), a Constant, a com.microsoft MultiHeadAttention, an
    If whose then-branch multiplies int32 matrices, and two calls to a local function whose body
    uses Mish (no CUDA kernel). An uncalled local function uses Det."""
    f16 = TensorProto.FLOAT16
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["t_out"], name="int_matmul")],
        "then_g",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.INT32, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["e_out"], name="keep")],
        "else_g",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.INT32, None)],
    )
    mish = helper.make_function(
        "local",
        "MishAct",
        ["x"],
        ["y"],
        [helper.make_node("Mish", ["x"], ["m"], name="mish"), helper.make_node("Relu", ["m"], ["y"], name="relu")],
        opset_imports=[helper.make_opsetid("", 18)],
    )
    unused = helper.make_function(
        "local",
        "Unused",
        ["x"],
        ["y"],
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        opset_imports=[helper.make_opsetid("", 18)],
    )
    nodes = [
        helper.make_node("MatMul", ["q", "w"], ["h"], name="proj"),
        helper.make_node("Constant", [], ["c"], name="const", value=helper.make_tensor("c", f16, [], [1.0])),
        helper.make_node("MultiHeadAttention", ["h", "h", "h"], ["att"], name="mha", domain="com.microsoft", num_heads=2),
        helper.make_node("MishAct", ["att"], ["act1"], name="call1", domain="local"),
        helper.make_node("MishAct", ["act1"], ["act2"], name="call2", domain="local"),
        helper.make_node("Add", ["act2", "c"], ["out"], name="add"),
        helper.make_node("If", ["cond"], ["branch"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "main",
        [
            helper.make_tensor_value_info("q", f16, [1, 4, 8]),
            helper.make_tensor_value_info("w", f16, [8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a", TensorProto.INT32, [2, 2]),
            helper.make_tensor_value_info("b", TensorProto.INT32, [2, 2]),
        ],
        [helper.make_tensor_value_info("out", f16, None), helper.make_tensor_value_info("branch", TensorProto.INT32, None)],
        value_info=[helper.make_tensor_value_info("h", f16, None), helper.make_tensor_value_info("att", f16, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("local", 1)],
        functions=[mish, unused],
        ir_version=10,
    )
    return ir.serde.deserialize_model(model)


def test_coverage_walks_subgraphs_and_local_functions(cuda):
    found = cuda.coverage(_coverage_model())
    assert [(u.node_name, u.op_type, u.domain, u.location) for u in found] == [
        ("mish", "Mish", "", "function local::MishAct"),  # once, though called twice
        ("int_matmul", "MatMul", "", "subgraph then_g"),
    ]
    assert "input 0 (A) is int32" in found[1].reason


def test_coverage_on_tensorrt_flags_the_contrib_op(trt):
    found = trt.coverage(_coverage_model())
    assert [(u.node_name, u.op_type, u.domain) for u in found] == [
        ("mha", "MultiHeadAttention", "com.microsoft"),
        ("int_matmul", "MatMul", ""),
    ]
    # Mish (opset 18) is in TensorRT's list, so the local function's body passes there.
    assert found[0].reason == "tensorrt has no ops in domain 'com.microsoft'"


# --- the builder, on excerpts of its sources in their own formats --------------------------------------

ORT_KERNELS_EXCERPT = """
<a name="cudaexecutionprovider"/>

## Operators implemented by CUDAExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Add|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|14+|**T** = tensor(double), tensor(float), tensor(float16)|
|||13|**T** = tensor(float)|
|Softmax|*in* input:**T**<br> *out* output:**T**|13+|**T** = tensor(float), tensor(float16)|
| |
|**Operator Domain:** *com.microsoft*||||
|GroupQueryAttention|*in* query:**T**|1+|**M** = tensor(int32)<br/> **T** = tensor(bfloat16), tensor(float16)|

<a name="dmlexecutionprovider"/>
|**Operator Domain:** *ai.onnx*||||
|Relu|*in* X:**T**|14+|**T** = tensor(float)|
"""

TRT_OPERATORS_EXCERPT = """
# Supported ONNX Operators

TensorRT 10.1 supports operators in the inclusive range of opset 9 to opset 20. Latest information about ONNX operators can be found here.

## Operator Support Matrix

| Operator | Supported | Supported Types | Restrictions |
|----------|-----------|-----------------|--------------|
| Abs | Y | FP32, FP16, BF16, INT32, INT64 | |
| Attention | N |
| Softmax | Y | FP32, FP16, BF16, | Only the last axis<br>is supported |
"""


def test_builder_reads_onnxruntime_kernel_tables():
    from tfgraph.targets.op_tables.build import parse_ort_kernels

    ops = parse_ort_kernels(ORT_KERNELS_EXCERPT, "CUDAExecutionProvider")
    assert set(ops) == {"", "com.microsoft"}  # the next provider's section is not read
    assert ops[""]["Add"] == [[14, None, {"T": ["double", "float", "float16"]}], [13, 13, {"T": ["float"]}]]
    assert ops[""]["Softmax"] == [[13, None, {"T": ["float", "float16"]}]]
    assert ops["com.microsoft"]["GroupQueryAttention"] == [[1, None, {"M": ["int32"], "T": ["bfloat16", "float16"]}]]
    with pytest.raises(ValueError, match="no section"):
        parse_ort_kernels(ORT_KERNELS_EXCERPT, "ROCMExecutionProvider")


def test_builder_reads_tensorrt_operator_matrix():
    from tfgraph.targets.op_tables.build import build_tensorrt, parse_trt_operators

    supported, unsupported, notes, opsets, _ = parse_trt_operators(TRT_OPERATORS_EXCERPT)
    assert opsets == (9, 20) and unsupported == ["Attention"]
    assert supported["Softmax"] == sorted(supported["Softmax"]) and "float16" in supported["Softmax"]
    assert notes == {"Softmax": "Only the last axis is supported"}
    doc = build_tensorrt(TRT_OPERATORS_EXCERPT, commit="c0ffee", version="10.1", commit_date=None)
    assert doc["ops"][""]["Abs"][0][:2] == [9, 20] and doc["not_supported"] == {"": ["Attention"]}
    with pytest.raises(ValueError, match="unknown TensorRT type"):
        parse_trt_operators(TRT_OPERATORS_EXCERPT.replace("INT64", "INT3"))
