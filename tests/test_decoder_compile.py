"""compile --task text-generation (issue 18, KV cache): export with past/present key-values, the cache
convention detected in .onnx files, verification on a prompt (past length 0) and decode steps, and
the errors for decoders whose cache cannot be identified."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _decoders import artifact, onnx_file
from tfgraph.deploy.kv_layout import detect


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("kind, exporter, from_onnx", [
    ("gpt2", "dynamo", False),
    ("llama", "dynamo", False),
    ("llama", "torchscript", True),  # an .onnx with Optimum names: the convention is detected
])
def test_cached_decoder_compiles_and_verifies_prompt_and_decode(kind, exporter, from_onnx):
    manifest = _manifest(artifact(kind, exporter, from_onnx=from_onnx))
    generation = manifest["generation"]
    assert generation["convention"] == "optimum"
    cache = generation["cache"]
    assert cache["layers"] == 2 and cache["head_size"] == 8
    assert cache["kv_heads"] == (2 if kind == "llama" else 4)  # grouped KV heads stay grouped
    assert cache["past"][1] == ["past_key_values.1.key", "past_key_values.1.value"]
    assert cache["present"][0] == ["present.0.key", "present.0.value"]
    steps = generation["verification"]["steps"]
    assert [s["past"] for s in steps] == [0, 16, 17]  # the prompt with an empty cache, then decode steps
    assert all(s["passed"] and s["next_tokens_equal"] for s in steps)
    from tests._checks import assert_matches_source

    # Recomputed outside the compile: the artifact against the export, with a non-empty past.
    assert_matches_source(artifact(kind, exporter, from_onnx=from_onnx), onnx_file(kind, exporter),
                          shapes={"batch": 1, "sequence": 5, "past_sequence": 7, "total_sequence": 12})
    assert manifest["attention"]["unfused"] == 0 and manifest["attention"]["fused"] == 2
    # The masks are probed with the mask spanning past + current tokens: causal with the key padding.
    classify = next(r for r in manifest["passes"] if r["name"] == "classify-attention-masks")
    assert classify["rules"] == {"causal+padding(attention_mask)": {"matches": 2}}
    assert generation["context_length"] == (None if from_onnx else 64)
    if not from_onnx:
        assert "generation_config.json" in manifest["files"]


def test_exported_graph_takes_empty_and_filled_cache():
    """One graph serves the prompt (past 0) and decode steps; present = past + new along the sequence."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file("llama", "torchscript")), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"]
    dims = {i.name: i.shape for i in session.get_inputs()}
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 8]
    for past, sequence in ((0, 5), (5, 1)):
        feeds = {"input_ids": np.ones((1, sequence), np.int64), "attention_mask": np.ones((1, past + sequence), np.int64)}
        feeds.update({n: np.zeros((1, 2, past, 8), np.float32) for n in names[2:]})
        logits, *present = session.run(None, feeds)
        assert logits.shape == (1, sequence, 128) and present[0].shape == (1, 2, past + sequence, 8)


def test_detect_conventions():
    optimum = detect([("input_ids", ("b", "s"), "int64"), ("attention_mask", ("b", "t"), "int64"),
                      ("position_ids", ("b", "s"), "int64"),
                      ("past_key_values.0.key", ("b", 2, "p", 8), "float32"),
                      ("past_key_values.0.value", ("b", 2, "p", 8), "float32")],
                     [("logits", ("b", "s", 50), "float32"), ("present.0.key", None, "float32"),
                      ("present.0.value", None, "float32")])
    assert optimum.convention == "optimum" and optimum.position_ids == "position_ids" and optimum.vocab_size == 50
    builtin = detect([("input_ids", ("b", "s"), "int64"), ("past_key_0", ("b", 4, "p", 16), "float32"),
                      ("past_value_0", ("b", 4, "p", 16), "float32")],
                     [("logits", None, "float32"), ("present_key_0", None, "float32"),
                      ("present_value_0", None, "float32")])
    assert builtin.convention == "tfgraph" and builtin.kv_heads == 4 and builtin.attention_mask is None
    assert detect([("input_ids", ("b", "s"), "int64")], [("logits", None, "float32")]) is None


def _combined_cache_model(path):
    """An old GPT-2-style export: one ``past_0`` input per layer holding key and value stacked."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("past_0", TensorProto.FLOAT, [2, "batch", 4, "past_sequence", 8])]
    outputs = [helper.make_tensor_value_info("present_0", TensorProto.FLOAT, [2, "batch", 4, "total", 8])]
    graph = helper.make_graph([helper.make_node("Identity", ["past_0"], ["present_0"])], "old", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_unidentified_cache_convention_is_exit_2(cli, tmp_path):
    """A cache tfgraph cannot pair up is refused with what it found."""
    model = _combined_cache_model(tmp_path / "old.onnx")
    result = cli("compile", model, "-o", tmp_path / "out", "--task", "text-generation")
    assert result.code == 2
    assert "cannot identify the KV-cache convention" in result.err and "past_0" in result.err
    assert not (tmp_path / "out").exists()


def test_task_on_a_model_without_cache_is_exit_2(cli, mlp_path, tmp_path):
    result = cli("compile", mlp_path, "-o", tmp_path / "out", "--task", "text-generation")
    assert result.code == 2 and "no KV-cache inputs" in result.err and "inputs: x" in result.err


def test_task_on_an_encoder_is_exit_2(cli, tmp_path):
    result = cli("export", "bert-small", "-o", tmp_path / "m.onnx", "--task", "text-generation")
    assert result.code == 2 and "not a causal language model" in result.err
