"""compact-padding (issue 18): a decoder's padded tokens moved behind its real ones, GroupQueryAttention
rotating (do_rotary) and masking (seqlens_k) by itself; exact on left padding and on masks with holes,
verified on its own cache."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from _decoders import artifact, checkpoint, onnx_file
from test_generate import compare_greedy
from tfgraph.errors import VerificationError


def _report(path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    return next(p["report"] for p in manifest["passes"] if p["name"] == "compact-padding")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_attention_rotates_and_masks_inside_the_kernel(exporter):
    path = artifact("llama64", exporter)
    assert _report(path) == {"layers": 2}
    graph = onnx.load(path / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for node in gqa:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["do_rotary"] == 1
        assert node.input[1] == "" and node.input[2] == ""  # the packed projection
        assert len(node.input) <= 9 or not any(node.input[9:])  # no positions, no padding bias
    # the permutation and its inverse run only for steps of several tokens: a decode step runs no TopK
    gates = [n for n in graph.node if n.op_type == "If"]
    assert len(gates) == 2 and len({n.input[0] for n in gates}) == 1
    assert not [n for n in graph.node if n.op_type in ("TopK", "GatherElements", "GatherND")]
    compare_greedy("llama64", path)  # batch 2 left-padded, eos: transformers' tokens


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _chain(session, ids, mask, new, steps=3):
    """Logits of the prompt (every position) and of ``steps`` decode steps, each on the model's own cache."""
    names = [o.name for o in session.get_outputs()]
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {"input_ids": ids, "attention_mask": mask, **{p: np.zeros((ids.shape[0], 2, 0, 16), np.float32)
                                                         for p in past}}
    logits = []
    for step in range(steps + 1):
        out = dict(zip(names, session.run(None, feeds)))
        logits.append(out["logits"])
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        feeds = {"input_ids": new[:, step:step + 1], "attention_mask": mask,
                 **{p: out[p.replace("past_key_values.", "present.")] for p in past}}
    return logits


def test_left_padding_and_holes_give_the_exports_logits():
    """Rows left-padded, with a hole, and full: at every real position of the prompt and at every decode
    step, the compiled graph (on its own cache) gives the export's logits (on the export's cache)."""
    export = _session(onnx_file("llama64", "dynamo"))
    compiled = _session(artifact("llama64", "dynamo") / "model.onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, size=(3, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0          # left padding
    mask[2, [0, 3, 4]] = 0   # padding and a hole in the middle
    new = rng.integers(3, 512, size=(3, 4)).astype(np.int64)
    want, got = _chain(export, ids, mask, new), _chain(compiled, ids, mask, new)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[0][real], want[0][real], atol=2e-5)
    for step in range(1, len(want)):
        np.testing.assert_allclose(got[step], want[step], atol=2e-5)
    # the rows really differ from one another's positions: a padded row alone gives its batched logits
    alone = _chain(compiled, ids[1:2, 4:], np.ones((1, 6), np.int64), new[1:2])
    np.testing.assert_allclose(got[-1][1], alone[-1][0], atol=2e-5)


def test_what_the_rewrite_needs_is_named_when_missing():
    assert "multiple of 16" in _report(artifact("llama"))["skipped"]  # head size 8
    assert "not rotated by RotaryEmbedding" in _report(artifact("gpt2", "torchscript"))["skipped"]  # positions table


def test_a_wrong_rewrite_is_caught_on_its_own_cache(tmp_path, monkeypatch):
    """Leave out the permutation back before the LM head: the padded row's logits come out in the compacted
    order, and the generation check (the model's own cache, the reference's real positions) names the pass."""
    import tfgraph
    from tfgraph.passes import compact_padding

    rewrite = compact_padding.CompactPaddingRule.rewrite

    def broken(self, graph):
        layers = rewrite(self, graph)
        restored = self.head.inputs[0]
        self.head.replace_input_with(0, restored.producer().inputs[0])
        return layers

    monkeypatch.setattr(compact_padding.CompactPaddingRule, "rewrite", broken)
    with pytest.raises(VerificationError) as error:
        tfgraph.compile(checkpoint("llama64"), "cpu-fp32", output=tmp_path / "out", task="text-generation")
    assert error.value.pass_name == "compact-padding"
    assert not (tmp_path / "out").exists()
