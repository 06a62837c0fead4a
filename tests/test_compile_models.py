"""Done-when of the foundation: real exports compile to cpu-fp32, verify, load and run.

Built-in models are exported with both torch exporters, compiled through the CLI,
and the artifact is checked at a shape other than the one it was verified at.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnxruntime as ort
import pytest

import tfgraph
from tfgraph import analysis
from tfgraph.ir import load as ir_load
from tfgraph.compiler.verify import generate_inputs
from tfgraph.models import sentences

pytest.importorskip("torch", reason="exports need the 'export' extra (torch)")

EXPORTERS = ("dynamo", "torchscript")


def _check_artifact(out: pathlib.Path, exported: pathlib.Path, shapes: dict) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    from tests._checks import assert_matches_source

    assert_matches_source(out, exported, shapes=shapes)  # another shape and seed than the compile's
    for name, diff in manifest["verification"]["outputs"].items():
        assert diff["max_abs"] <= 1e-4, (name, diff)
    # Compiling never adds weights (only the few small constants rewrites need), and never
    # leaves duplicate initializers behind that the input did not have.
    summary = manifest["summary"]
    # (Windowed blocks take a few shape/scalar constants in each branch of their If.)
    allowance = 256 + 512 * sum(n for op, n in manifest["attention"]["fused_ops"].items() if op.startswith("If["))
    assert summary["bytes_after"] <= summary["bytes_before"] + allowance
    compiled = ir_load(out / "model.onnx").model
    source = ir_load(exported).model
    assert analysis.summarize(compiled)["duplicate_bytes"] <= analysis.summarize(source)["duplicate_bytes"]
    # The loaded artifact agrees with the exported model at another shape.
    feeds = generate_inputs(source, shapes, seed=5)
    session = tfgraph.load(out)
    reference = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    assert [o.name for o in session.get_outputs()] == names
    for name, got, want in zip(names, session.run(names, feeds), reference.run(names, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    return manifest


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["bert-small", "gpt-small", "gpt-small-kv", "albert-small", "local-small"])
def test_builtin_models_compile(cli, tmp_path, name, exporter):
    exported = tmp_path / "model.onnx"
    result = cli("export", name, "-o", exported, "--exporter", exporter, "--quiet")
    assert result.code == 0, result.err
    inspected = cli("inspect", exported, "--json")
    assert inspected.code == 0, inspected.err
    # Every layer's attention is found as a Softmax between two MatMuls (small configs have 2 layers).
    assert json.loads(inspected.out)["attention"]["unfused"] == 2
    out = tmp_path / "out"
    result = cli("compile", exported, "--target", "cpu-fp32", "-o", out, "--quiet")
    assert result.code == 0, result.err
    shapes = {"batch": 3, "sequence": 11, "past_sequence": 5}
    manifest = _check_artifact(out, exported, shapes)
    if exporter == "torchscript":
        # TorchScript output carries Identity nodes and shape chains the cleanup removes (counted
        # where cleanup ends: windowed lowerings add nodes later, in their If branches).
        cleaned = next(r for r in manifest["passes"] if r["name"] == "remove-dead")
        assert cleaned["nodes_after"] < manifest["passes"][0]["nodes_before"]
    attention = manifest["attention"]
    # Every layer fused, the KV-cache decoder included (keys/values concatenated with the past).
    assert (attention["found"], attention["fused"], attention["unfused"]) == (2, 2, 0)
    # Plain Q/K/V projections take the packed Attention op; the KV-cache decoder (keys
    # concatenated with the past) takes MultiHeadAttention; the local encoder's two-sided
    # window an If between the blocked form and MultiHeadAttention with the band mask.
    expected_op = "com.microsoft::MultiHeadAttention" if name.endswith("-kv") else "com.microsoft::Attention"
    if name.startswith("local"):
        expected_op = "If[com.microsoft::MultiHeadAttention|com.microsoft::MultiHeadAttention]"
    assert attention["fused_ops"] == {expected_op: 2}
    assert manifest["warnings"] == []
    if name.startswith("albert"):
        assert analysis.summarize(ir_load(out / "model.onnx").model)["duplicate_initializers"] == []


def test_compile_builtin_name_exports_first(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("compile", "bert-small", "--exporter", "torchscript", "-o", out, "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    assert manifest["input"]["kind"] == "builtin" and manifest["input"]["exporter"] == "torchscript"
    assert len(manifest["input"]["sha256"]) == 64
    session = tfgraph.load(out)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]


SENTENCES = sentences.EVERYDAY[:4]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_minilm_real_weights(cli, tmp_path, exporter):
    """`tfgraph compile minilm` end to end, checked against sentence-transformers on real sentences."""
    st = pytest.importorskip("sentence_transformers", reason="needs the 'hf' extra")
    out = tmp_path / "minilm"
    result = cli("compile", "minilm", "--target", "cpu-fp32", "-o", out, "--exporter", exporter)
    assert result.code == 0, result.err
    assert "verified" in result.out
    attention = analysis.summarize(ir_load(out / "model.onnx").model)["attention"]
    assert (attention["unfused"], attention["fused"]) == (0, 6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert max(d["max_abs"] for d in manifest["verification"]["outputs"].values()) <= 1e-4

    from tfgraph.models import minilm_path

    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    expected = model.encode(SENTENCES, normalize_embeddings=True)
    tokens = model.tokenizer(SENTENCES, padding=True, return_tensors="np")
    session = tfgraph.load(out)
    feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    embedding = session.run(["sentence_embedding"], feeds)[0]
    cosine = np.sum(embedding * expected, axis=1) / (np.linalg.norm(embedding, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.9999, cosine


def test_hf_folder_compiles(cli, tmp_path):
    """A local Hugging Face checkpoint folder is exported, then compiled and verified."""
    transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
    )
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).eval().save_pretrained(folder)
    out = tmp_path / "out"
    result = cli("compile", folder, "-o", out, "--exporter", "torchscript", "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    assert manifest["input"]["kind"] == "huggingface"
    assert manifest["verification"]["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    summary = analysis.summarize(ir_load(out / "model.onnx").model)
    assert summary["attention"] == {**summary["attention"], "unfused": 0, "fused": 2}
