"""Compression: semantic weight dedup, the final duplicate check, and shrinking pruned models exactly.

Models are the small built-ins and tiny Hugging Face checkpoints, exported once per module
with both exporters.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import tfgraph
from tfgraph import analysis
from tfgraph.compiler import prune
from tfgraph.errors import VerificationError
from tfgraph.compiler.instruments import fingerprint
from tfgraph.ir import load as ir_load
from tfgraph.ir import model_bytes
from tfgraph.passes.dedup_derived import DedupDerivedPass
from tfgraph.passes.registry import PassSpec
from tfgraph.passes.shrink_pruned import ShrinkPrunedPass
from tfgraph.compiler.passmanager import PassManager
from tfgraph.targets import Target
from tfgraph.targets.cpu import CLEANUP, CPU_FP32, CPU_LOWERING, FUSION
from tfgraph.targets.profile import phases
from tfgraph.compiler.verify import generate_inputs, run

pytest.importorskip("torch", reason="exports need the 'export' extra (torch)")

EXPORTERS = ("dynamo", "torchscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, exporter)`` → path of the ONNX export (built-in name or an HF kind 'hf-<kind>'), cached."""
    from tfgraph.compiler.export import export
    from tfgraph.models.hf_configs import make_hf_checkpoint

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], pathlib.Path] = {}

    def get(name: str, exporter: str) -> pathlib.Path:
        if (name, exporter) not in cache:
            source = name
            if name.startswith("hf-"):
                folder = root / name
                if not folder.exists():
                    make_hf_checkpoint(name[3:], folder)
                source = str(folder)
            cache[(name, exporter)] = export(source, root / f"{name}-{exporter}.onnx", exporter=exporter)
        return cache[(name, exporter)]

    return get


def _compile(path, tmp_path, name="out", **kwargs):
    out = tmp_path / name
    artifact = tfgraph.compile(str(path), "cpu-fp32", output=out, **kwargs)
    return artifact, ir_load(out / "model.onnx").model


def _tensors(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _rel_err(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30)) for k in want)


# ---------------------------------------------------------------------------------------------
# Weight dedup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["albert-small", "hf-albert"])
def test_albert_artifact_stores_every_weight_once(exported, tmp_path, name, exporter):
    artifact, model = _compile(exported(name, exporter), tmp_path)
    weights = artifact.manifest["weights"]
    assert weights["bytes_after"] == weights["unique_bytes"] == model_bytes(model)
    assert weights["duplicate_bytes"] == 0
    assert analysis.duplicate_initializers(model) == []
    # Not even a transposed / reshaped copy is left: semantic dedup finds nothing more to do.
    assert DedupDerivedPass()(model).modified is False
    # The shared layer is stored once: the packed QKV weight appears once though two layers use it.
    packed = [v for v in model.graph.initializers.values() if v.name.endswith("qkv_weight")]
    assert len(packed) == 1
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attention) == 2 and all(n.inputs[1] is packed[0] for n in attention)


def _copies_of(model: ir.Model, table: np.ndarray) -> list[str]:
    return [n for n, a in _tensors(model).items() if a.size == table.size and (
        (a.shape == table.shape and np.array_equal(a, table)) or (a.shape == table.T.shape and np.array_equal(a, table.T)))]


@pytest.mark.parametrize(("name", "exporter", "table"), [
    ("hf-gpt2", "dynamo", "model.transformer.wte.weight"),
    ("hf-gpt2", "torchscript", "model.transformer.wte.weight"),
    ("gpt-small", "torchscript", "wte.weight"),
])
def test_tied_embedding_stored_once(exported, tmp_path, name, exporter, table):
    path = exported(name, exporter)
    source = ir_load(path).model
    tensors = _tensors(source)
    embedding = tensors.get(table)
    if embedding is None:  # dynamo names the tied table after the LM head
        embedding = next(a for n, a in tensors.items() if a.ndim == 2 and a.shape[0] == 128 and a.shape[1] == 32)
    assert len(_copies_of(source, embedding)) == 2  # the export stores the table and its transpose
    artifact, model = _compile(path, tmp_path)
    assert len(_copies_of(model, embedding)) == 1
    weights = artifact.manifest["weights"]
    assert weights["bytes_before"] - weights["bytes_after"] >= embedding.nbytes
    # The LM head reads the table through a transposed product, not a copy.
    fused = [n for n in model.graph if n.op_type in ("FusedMatMul", "Gemm") and n.attributes.get_int("transB", 0) == 1]
    assert len(fused) == 1
    feeds = generate_inputs(source, {"batch": 3, "sequence": 7}, seed=3)
    got = tfgraph.load(tmp_path / "out").run(None, feeds)
    want = run(source, feeds)
    np.testing.assert_allclose(got[0], want[model.graph.outputs[0].name], atol=1e-4, rtol=1e-4)


def _tiny_model(initializers: dict[str, np.ndarray], nodes, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_dedup_derived_transpose_reshape_cast():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 24])
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", 40])
    shapes = {"y1": ["b", "s", 40], "y2": ["n", 24], "y3": [1], "y4": [24, 40], "y5": [24, 40]}
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    proto = _tiny_model(
        {"W": w, "WT": np.ascontiguousarray(w.T), "Wflat": w.reshape(-1), "W16": w.astype(np.float16)},
        [
            helper.make_node("MatMul", ["x", "W"], ["y1"]),
            helper.make_node("MatMul", ["x2", "WT"], ["y2"]),
            helper.make_node("ReduceSum", ["Wflat"], ["y3"], keepdims=1),
            helper.make_node("Cast", ["W16"], ["w16f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["w16f", "W"], ["y4"]),
            helper.make_node("Transpose", ["WT"], ["y5"], perm=[1, 0]),
        ],
        [x, x2],
        outs,
    )
    model = ir.serde.deserialize_model(proto)
    feeds = {"x": rng.standard_normal((2, 3, 24)).astype(np.float32), "x2": rng.standard_normal((5, 40)).astype(np.float32)}
    want = run(model, feeds)
    before = model_bytes(model)
    dedup = DedupDerivedPass()
    assert dedup(model).modified is True
    assert set(model.graph.initializers) == {"W", "Wflat.shape"}  # + the Reshape target shape, one int64
    assert model_bytes(model) == before - w.nbytes - w.nbytes - w.nbytes // 2 + 8
    assert {k: v["matches"] for k, v in dedup.report.items()} == {"matmul-transB": 1, "transpose": 1, "reshape": 1, "cast": 1, "bytes_saved": 3}
    got = run(model, feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    onnx.checker.check_model(ir.serde.serialize_model(model))
    assert DedupDerivedPass()(model).modified is False


def test_compile_fails_on_duplicates_left_behind(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    proto = _tiny_model(
        {"A": w, "B": w.copy()},
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
    )
    no_dedup = Target(name="no-dedup", description="test", providers=CPU_FP32.providers, precision="fp32",
                      phases=phases(rewrite=(PassSpec("remove-dead"),)), tolerance=CPU_FP32.tolerance)
    with pytest.raises(VerificationError, match="more than once"):
        tfgraph.compile(proto, no_dedup)
    artifact = tfgraph.compile(proto, "cpu-fp32")
    assert artifact.manifest["weights"] == {"bytes_before": 512, "bytes_after": 256, "unique_bytes": 256, "duplicate_bytes": 0}


# ---------------------------------------------------------------------------------------------
# Pruning and shrinking
# ---------------------------------------------------------------------------------------------

NO_SHRINK = tuple(s for s in CLEANUP + FUSION if s.name != "shrink-pruned")
CLEANUP_ONLY = tuple(s for s in CLEANUP if s.name != "shrink-pruned")


def _matmul_weight_bytes(model: ir.Model) -> int:
    weights = {id(n.inputs[1]): n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    return sum(v.const_value.nbytes for v in weights.values())


def _pipeline(model: ir.Model, specs) -> ir.Model:
    PassManager(list(specs)).run(model)
    return model


def _attention_heads(model: ir.Model) -> list[int]:
    return [n.attributes.get_int("num_heads") for n in model.graph if n.op_type == "Attention"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pruned_bert_shrinks_exactly(exported, tmp_path, exporter):
    """30% of heads and neurons zeroed: the compiled model loses exactly their weights and computes what the zeroed one does."""
    path = exported("bert-small", exporter)  # 2 layers, 4 heads of 16, FFN 256, hidden 64
    zeroed = ir_load(path).model
    report = prune.prune_structured(zeroed, heads=0.3, neurons=0.3)
    assert (report["heads_total"], report["heads_pruned"]) == (8, 2)
    assert (report["neurons_total"], report["neurons_pruned"]) == (512, 154)
    zeroed_path = tmp_path / "zeroed.onnx"
    ir.save(zeroed, zeroed_path)

    full, full_model = _compile(path, tmp_path, "full")
    shrunk, shrunk_model = _compile(zeroed_path, tmp_path, "shrunk")
    hidden, head_dim = 64, 16
    per_head = (4 * head_dim * hidden + 3 * head_dim) * 4  # Q/K/V columns + biases, output-projection rows
    per_neuron = (2 * hidden + 1) * 4  # up column + bias, down row
    saved = full.manifest["weights"]["bytes_after"] - shrunk.manifest["weights"]["bytes_after"]
    assert saved == 2 * per_head + 154 * per_neuron
    assert sorted(_attention_heads(shrunk_model)) == sorted(4 - len(x["pruned_heads"]) for x in report["per_layer"] if "heads" in x)
    # cpu-fp32 shrinks before fusion where the head split can be read safely, after it otherwise
    # (the built-in TorchScript export takes the merged width from the input's shape).
    shrinks = [r["rules"]["shrink"] for r in shrunk.manifest["passes"] if r["name"] == "shrink-pruned" and r["modified"]]
    assert sum(r["neurons_removed"] for r in shrinks) == 154 and sum(r["heads_removed"] for r in shrinks) == 2
    assert shrinks[0]["heads_removed"] == (2 if exporter == "dynamo" else 0)
    # Same outputs as the zeroed model, at a shape other than the verification one.
    feeds = generate_inputs(zeroed, {"batch": 3, "sequence": 9}, seed=4)
    want = run(zeroed, feeds)
    got = dict(zip([o.name for o in shrunk_model.graph.outputs], tfgraph.load(tmp_path / "shrunk").run(None, feeds)))
    assert _rel_err(got, want) <= 1e-5
    # And the zeroed model really differs from the unpruned one (the pruning did something).
    assert _rel_err(run(ir_load(path).model, feeds), want) > 1e-2


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_shrink_before_and_after_fusion(exported, exporter):
    """shrink-pruned on the unfused graph (FFN neurons), on tfgraph.Attention, and on lowered packed
    com.microsoft.Attention: exact every time."""
    zeroed = ir_load(exported("hf-bert", exporter)).model  # 2 layers, 4 heads of 8, FFN 64
    prune.prune_structured(zeroed, heads=0.3, neurons=0.3, scope="layer")
    feeds = generate_inputs(zeroed, {"batch": 2, "sequence": 11}, seed=2)
    want = run(zeroed, feeds)

    unfused = _pipeline(ir.serde.deserialize_model(ir.serde.serialize_model(zeroed)), CLEANUP_ONLY)
    assert not any(n.op_type == "Attention" for n in unfused.graph)
    before = _matmul_weight_bytes(unfused)
    shrink = ShrinkPrunedPass()
    assert shrink(unfused).modified
    assert shrink.report["shrink"] == {"matches": 4, "heads_removed": 2, "neurons_removed": 38}
    # Up columns and down rows of 19 neurons per layer, Q/K/V columns and output rows of one head of 8 per layer.
    assert _matmul_weight_bytes(unfused) == before - 38 * 2 * 32 * 4 - 2 * 4 * 8 * 32 * 4
    assert _rel_err(run(unfused, feeds), want) <= 1e-6
    # The shrunk unfused graph still fuses, with 3 heads per layer, and nothing is left to shrink.
    PassManager(list(FUSION)).run(unfused)
    assert _attention_heads(unfused) == [3, 3]
    assert ShrinkPrunedPass()(unfused).modified is False
    assert _rel_err(run(unfused, feeds), want) <= 1e-5

    lowered = _pipeline(ir.serde.deserialize_model(ir.serde.serialize_model(zeroed)), NO_SHRINK + CPU_LOWERING)
    assert _attention_heads(lowered) == [4, 4]
    shrink = ShrinkPrunedPass()
    assert shrink(lowered).modified
    assert shrink.report["shrink"] == {"matches": 4, "heads_removed": 2, "neurons_removed": 38}
    assert _attention_heads(lowered) == [3, 3]
    packed = [n.inputs[1].const_value.shape for n in lowered.graph if n.op_type == "Attention"]
    assert [tuple(s) for s in packed] == [(32, 72), (32, 72)]
    assert _rel_err(run(lowered, feeds), want) <= 1e-5


def test_per_layer_head_counts(exported, tmp_path):
    path = exported("bert-small", "dynamo")
    zeroed = ir_load(path).model
    assert prune.zero_heads(zeroed, {0: [1], 1: [0, 2, 3]}) == 4
    zeroed_path = tmp_path / "zeroed.onnx"
    ir.save(zeroed, zeroed_path)
    artifact, model = _compile(zeroed_path, tmp_path)
    assert _attention_heads(model) == [3, 1]
    from tests._checks import assert_matches_source

    assert_matches_source(artifact, zeroed_path, shapes={"batch": 3, "sequence": 9})  # removing zeroed heads is exact
    feeds = generate_inputs(zeroed, {"batch": 2, "sequence": 13}, seed=6)
    got = dict(zip([o.name for o in model.graph.outputs], tfgraph.load(tmp_path / "out").run(None, feeds)))
    assert _rel_err(got, run(zeroed, feeds)) <= 1e-5


@pytest.mark.parametrize("stage", ["unfused", "fused"])
def test_nothing_prunable_is_left_alone(exported, stage):
    model = _pipeline(ir_load(exported("bert-small", "dynamo")).model, CLEANUP_ONLY if stage == "unfused" else NO_SHRINK)
    before = fingerprint(model)
    tensors = _tensors(model)
    shrink = ShrinkPrunedPass()
    result = shrink(model)
    assert result.modified is False
    assert shrink.report["shrink"] == {"matches": 0, "heads_removed": 0, "neurons_removed": 0}
    assert fingerprint(model) == before
    assert all(np.array_equal(tensors[k], v) for k, v in _tensors(model).items())


def test_prune_cli_activation_schedule_then_compile(exported, cli, tmp_path):
    path = exported("hf-bert", "dynamo")
    pruned = tmp_path / "pruned.onnx"
    result = cli("prune", path, "-o", pruned, "--heads", "0.5", "--neurons", "0.5", "--score", "activation",
                 "--schedule", "0.25", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)["structured"]
    assert [s["heads_pruned"] for s in report["schedule"]] == [2, 4]
    assert [s["neurons_pruned"] for s in report["schedule"]] == [32, 64]
    zeroed = ir_load(pruned).model
    out = tmp_path / "out"
    result = cli("compile", pruned, "-o", out, "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    assert manifest["weights"]["bytes_after"] < 0.8 * manifest["weights"]["bytes_before"]
    model = ir_load(out / "model.onnx").model
    assert sum(_attention_heads(model)) == 8 - 4
    feeds = generate_inputs(zeroed, {"batch": 2, "sequence": 10}, seed=7)
    got = dict(zip([o.name for o in model.graph.outputs], tfgraph.load(out).run(None, feeds)))
    assert _rel_err(got, run(zeroed, feeds)) <= 1e-5
    assert "weights stored" in cli("compile", pruned, "-o", tmp_path / "again").out


def test_prune_passes_inside_compile(exported, tmp_path):
    path = exported("gpt-small", "dynamo")
    artifact, model = _compile(path, tmp_path, extra_passes=["prune-structured:heads=0.5,neurons=0.5", "shrink-pruned"])
    records = {r["name"]: r for r in artifact.manifest["passes"]}
    # Pruning changes the outputs (recorded), the passes after it are verified against the pruned model.
    change = records["prune-structured"]["output_change"]
    assert max(d["max_abs"] for d in change.values()) > 1e-3
    assert records["shrink-pruned"]["verification"]["logits"]["max_abs"] <= 1e-5
    assert _attention_heads(model) and sum(_attention_heads(model)) == 4
    weights = artifact.manifest["weights"]
    assert weights["bytes_after"] < 0.8 * weights["bytes_before"]


def test_magnitude_pruning_reports_sparsity(exported, tmp_path):
    model = ir_load(exported("bert-small", "torchscript")).model
    before = model_bytes(model)
    report = prune.magnitude_prune(model, 0.6)
    assert report["tensors"] == 12  # Q, K, V, O, up, down of two layers
    assert report["sparsity_before"] == 0.0
    assert abs(report["sparsity_after"] - 0.6) < 1e-3
    assert model_bytes(model) == before  # report only: nothing shrinks
    artifact, _ = _compile(exported("bert-small", "torchscript"), tmp_path, extra_passes=["prune-magnitude:sparsity=0.5"])
    record = next(r for r in artifact.manifest["passes"] if r["name"] == "prune-magnitude")
    assert record["modified"] and abs(record["rules"]["prune-magnitude"]["sparsity_after"] - 0.5) < 1e-3
