"""Decoder artifacts run under onnxruntime-genai (issue 18): the genai_config.json compile writes lets
``onnxruntime_genai.Model(ARTIFACT)`` generate, and its greedy tokens equal tfgraph's generator's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _decoders import artifact
from tfgraph.deploy.generate import load_generator

og = pytest.importorskip("onnxruntime_genai")
PROMPT = [5, 9, 17, 33, 65, 12]


def _genai_greedy(path, prompt: list[int], new: int) -> list[int]:
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_onnxruntime_genai_generates_the_same_greedy_tokens(kind):
    path = artifact(kind)
    config = json.loads((path / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["num_key_value_heads"] == (2 if kind == "llama" else 4) and decoder["num_hidden_layers"] == 2
    # the cached layers lower to GroupQueryAttention with lengths from the mask: one buffer per cache tensor
    assert config["search"]["past_present_share_buffer"] is True
    assert json.loads((path / "manifest.json").read_text())["generation"]["cache"]["shared_buffer"] is True
    assert json.loads((path / "manifest.json").read_text())["generation"]["genai_config"] == "genai_config.json"
    generator = load_generator(path)
    ours = generator.generate(np.array([PROMPT]), 32, eos_token_id=generator.eos_token_id)[0, len(PROMPT):].tolist()
    assert _genai_greedy(path, PROMPT, 32) == ours
