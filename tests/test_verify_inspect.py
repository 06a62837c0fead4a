"""Input generation, output comparison, and the analyses behind `tfgraph inspect`."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tfgraph import analysis
from tfgraph.compiler.flops import estimate_flops
from tfgraph.errors import BadInputError
from tfgraph.compiler.verify import compare, generate_inputs, parse_shapes, within_kernel_numerics
from tests.conftest import make_mlp


def _embedding_model(vocab: int = 37) -> ir.Model:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocab, 8)).astype(np.float32), "emb")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
            helper.make_node("Mul", ["h", "m3"], ["y"]),
        ],
        "emb",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [table, numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_generated_inputs_respect_vocab_and_mask():
    feeds = generate_inputs(_embedding_model(vocab=37), {"batch": 4, "sequence": 32})
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape == (4, 32) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 37 and len(np.unique(ids)) > 10
    assert mask[0].all()  # first row unpadded, later rows padded at the end, never empty
    assert all(0 < mask[b].sum() < 32 for b in range(1, 4))
    assert all((np.diff(mask[b]) <= 0).all() for b in range(4))


def test_generated_inputs_are_deterministic_and_shaped():
    model = ir.serde.deserialize_model(make_mlp())
    a = generate_inputs(model, seed=7)["x"]
    b = generate_inputs(model, seed=7)["x"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 16, 16)
    with pytest.raises(BadInputError, match="does not fit"):
        generate_inputs(model, {"x": (2, 3, 4)})


def test_parse_shapes():
    assert parse_shapes(["input_ids=1x128,attention_mask=1x128", "past_sequence=0"]) == {
        "input_ids": (1, 128),
        "attention_mask": (1, 128),
        "past_sequence": 0,
    }
    for bad in ("x", "x=ab", "x=-1"):
        with pytest.raises(BadInputError):
            parse_shapes([bad])


def test_compare_tolerance_nan_and_shape():
    e = {"y": np.array([1.0, 100.0, np.nan], np.float32)}
    ok = compare(e, {"y": np.array([1.00005, 100.009, np.nan], np.float32)}, atol=1e-4, rtol=1e-4)[0]
    assert ok.ok and ok.max_abs == pytest.approx(0.009, rel=1e-2)
    bad = compare(e, {"y": np.array([1.0, 100.0, 3.0], np.float32)}, atol=1e-4, rtol=1e-4)[0]
    assert not bad.ok and bad.max_abs == float("inf") and "NaN" in bad.reason
    shaped = compare(e, {"y": np.zeros(4, np.float32)}, atol=1, rtol=1)[0]
    assert not shaped.ok and "shape" in shaped.reason
    ints = compare({"i": np.array([1, 2])}, {"i": np.array([1, 3])}, atol=1, rtol=1)[0]
    assert not ints.ok  # integer outputs must match exactly, whatever the tolerance


def test_relative_rms_leaves_padding_out_and_bounds_kernel_numerics():
    """relative_rms = ‖a − e‖ / ‖e‖ over the compared positions (padded ones out); the final checks accept a
    divergence as the deployed kernels' own arithmetic only within KERNEL_NUMERICS_LIMIT (0.5)."""
    e = np.array([[[3.0, 4.0], [0.0, 0.0]]], np.float32)  # batch 1, sequence 2 (the second padded), 2 values
    a = np.array([[[3.0, 4.0 + 1.0], [50.0, 50.0]]], np.float32)
    padded = np.array([[False, True]])
    (diff,) = compare({"y": e}, {"y": a}, atol=1e-4, rtol=1e-4, padded=padded)
    assert diff.relative_rms == pytest.approx(1.0 / 5.0)
    assert within_kernel_numerics([diff])
    (far,) = compare({"y": e}, {"y": -e}, atol=1e-4, rtol=1e-4, padded=padded)
    assert far.relative_rms == pytest.approx(2.0) and not within_kernel_numerics([far])
    (nan,) = compare({"y": e}, {"y": np.full_like(e, np.nan)}, atol=1e-4, rtol=1e-4)
    assert nan.relative_rms is None and not within_kernel_numerics([nan])


def test_kv_cache_entries_at_padded_positions_are_left_out():
    """A (batch, heads, positions, head size) cache: entries at padded positions are never attended to, so
    they are not compared (their largest difference reported); a real position still must match."""
    padded = np.array([[False, False, False], [True, False, False]])  # row 1 left-padded by one
    e = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    a = e.copy()
    a[1, :, 0] += 7.0  # the padded slot of row 1, both heads
    (cache,) = compare({"present": e}, {"present": a}, atol=1e-4, rtol=1e-4, padded=padded)
    assert cache.ok and cache.padded_max_abs == pytest.approx(7.0)
    a[1, 1, 2, 0] += 1.0  # a real position
    (cache,) = compare({"present": e}, {"present": a}, atol=1e-4, rtol=1e-4, padded=padded)
    assert not cache.ok and cache.max_abs == pytest.approx(1.0)


def test_flops_match_the_formula():
    model = ir.serde.deserialize_model(make_mlp(hidden=16))
    feeds = generate_inputs(model, {"batch": 3, "sequence": 10})
    flops = estimate_flops(model, feeds)
    # Three MatMuls: x·W1 twice (16→32), h·W2 once (32→16), over 3·10 rows.
    assert flops["total"] == 2 * 30 * 16 * 32 * 2 + 2 * 30 * 32 * 16
    # The probe outputs were removed again.
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_duplicates_and_histogram():
    model = make_mlp()
    dup = numpy_helper.to_array(model.graph.initializer[0]).copy()
    model.graph.initializer.append(numpy_helper.from_array(dup, "W1_copy"))
    model.graph.node.append(helper.make_node("MatMul", ["xi", "W1_copy"], ["extra"]))
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    ir_model = ir.serde.deserialize_model(model)
    groups = analysis.duplicate_initializers(ir_model)
    assert len(groups) == 1 and sorted(groups[0].names) == ["W1", "W1_copy"] and groups[0].nbytes == 16 * 32 * 4
    summary = analysis.summarize(ir_model)
    assert summary["ops"]["MatMul"] == 4 and summary["duplicate_bytes"] == 16 * 32 * 4
    json.dumps(summary)


def test_inspect_cli_json(cli, mlp_path):
    result = cli("inspect", mlp_path, "--json", "--shape", "sequence=4")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["nodes"] == 11 and report["parameters"] == 16 * 32 * 2 + 32 + 16
    assert report["flops"]["total"] == 2 * 8 * 16 * 32 * 2 + 2 * 8 * 32 * 16
    assert report["attention"]["unfused"] == 0


@pytest.mark.parametrize("model, target, form", [
    ("local-small", "cpu-fp32", None),            # windows: blocked form inside If branches
    ("bert-small", "tensorrt-fp16", "tfgraph::StandardAttention"),  # neutral op inlined to standard ops
    ("bert-small", "npu-a8w8", "tfgraph::StandardAttention"),  # ... then converted to opset 21 (the mark survives)
])
def test_fused_attention_counted_by_mark_not_by_name(onnx_export, model, target, form):
    """A pass that renames every node does not make fused blocks look unfused (--strict still passes)."""
    import tfgraph

    @tfgraph.register_pass("test-rename-all", replace=True)
    class RenameAll(tfgraph.Pass):
        def call(self, m):
            for i, node in enumerate(m.graph.all_nodes()):
                node.name = f"n{i}"
            return tfgraph.PassResult(m, True)

    shapes = {"input_ids": (1, 16), "attention_mask": (1, 16)} if target.startswith("npu") else None
    artifact = tfgraph.compile(onnx_export(model, "torchscript"), target, extra_passes=["test-rename-all"], strict=True,
                               shapes=shapes)
    attention = artifact.manifest["attention"]
    assert (attention["found"], attention["fused"], attention["unfused"]) == (2, 2, 0)
    if form:
        assert attention["fused_ops"] == {form: 2}
