"""Attention fusion on Hugging Face architectures built from configs (BERT, ALBERT,
GPT-2, Llama with RoPE and grouped KV heads, Mistral with a sliding window): both exporters,
eager and SDPA attention. Fused attention ops must equal the number of layers and the
compiled outputs must match the export (the compile's own verification, ≤ 1e-4)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="needs the 'hf' extra")

from tfgraph.models.hf_configs import make_hf_checkpoint  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_checkpoint(kind, root / kind) for kind in ("bert", "albert", "gpt2", "llama", "mistral")}


def _compile(cli, folder, out, exporter, attention):
    result = cli("compile", folder, "-o", out, "--exporter", exporter, "--attention", attention, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["bert", "albert", "gpt2", "llama"])
def test_hf_attention_fused_per_layer(cli, tmp_path, checkpoints, kind, exporter, attention):
    manifest = _compile(cli, checkpoints[kind], tmp_path / "out", exporter, attention)
    assert manifest["input"]["attention"] == attention
    # BERT/ALBERT projections are MatMul+bias of one tensor: packed Attention. GPT-2's Conv1D
    # (Gemm, then Split) and Llama's rotary embeddings take MultiHeadAttention.
    op = "com.microsoft::Attention" if kind in ("bert", "albert") else "com.microsoft::MultiHeadAttention"
    assert manifest["attention"] == {"found": LAYERS, "fused": LAYERS, "unfused": 0, "fused_ops": {op: LAYERS}}
    assert manifest["warnings"] == []
    for output in manifest["verification"]["outputs"].values():
        assert output["max_abs"] <= 1e-4


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_mistral_sliding_window_attention_fused(cli, tmp_path, checkpoints, attention):
    """Mistral's sliding window lives in the exporter's mask, which the fused op takes as its bias:
    the window is preserved exactly, not approximated — checked against the export at a sequence
    three times the window (8), where a lost window would change every late position."""
    from tfgraph.compiler.export import export
    from tests._checks import assert_matches_source

    exported = export(checkpoints["mistral"], tmp_path / "mistral.onnx", exporter="torchscript", attention=attention)
    result = cli("compile", exported, "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    assert (manifest["attention"]["fused"], manifest["attention"]["unfused"]) == (LAYERS, 0)
    assert_matches_source(tmp_path / "out", exported, shapes={"batch": 2, "sequence": 24})


def test_llama_uses_head_split_form(cli, tmp_path, checkpoints):
    """Rotary embeddings sit between the head split and the product: the head-split rule takes them."""
    manifest = _compile(cli, checkpoints["llama"], tmp_path / "out", "torchscript", "sdpa")
    rules = next(r for r in manifest["passes"] if r["name"] == "fuse-attention")["rules"]
    assert rules["attention"]["matches"] == 0 and rules["attention-bhsd"]["matches"] == LAYERS
