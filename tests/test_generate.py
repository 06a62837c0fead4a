"""Generation from decoder artifacts (issue 18): greedy tokens equal transformers' generate, left-padded
batches, seeded sampling, the `tfgraph generate` command and its errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _decoders import artifact, checkpoint
from tfgraph.errors import BadInputError
from tfgraph.deploy.generate import load_generator

NEW_TOKENS = 32


def _transformers_generate(kind: str, ids: np.ndarray, mask: np.ndarray, *, eos: bool) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint(kind)), attn_implementation="sdpa").eval()
    config = model.generation_config
    if not eos:
        config.eos_token_id = None
    config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
                             do_sample=False, generation_config=config)
    return out.numpy()


def _prompts(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` prompts of 9, 6, … tokens, left-padded with the pad id 0."""
    rng = np.random.default_rng(batch)
    ids = rng.integers(3, 128, size=(batch, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 0
    return ids, mask


def compare_greedy(kind: str, path) -> None:
    generator = load_generator(path)
    for batch in (1, 2):
        ids, mask = _prompts(batch)
        ours = generator.generate(ids, NEW_TOKENS, attention_mask=mask)  # no eos: all 32 tokens
        assert ours.shape == (batch, 9 + NEW_TOKENS)
        np.testing.assert_array_equal(ours, _transformers_generate(kind, ids, mask, eos=False))
        assert generator.stats["new_tokens"] == NEW_TOKENS and generator.stats["decode_ms_per_token"] > 0
    ids, mask = _prompts(2)  # the checkpoint's eos/pad from generation_config.json, as transformers reads them
    ours = generator.generate(ids, NEW_TOKENS, attention_mask=mask, eos_token_id=generator.eos_token_id)
    np.testing.assert_array_equal(ours, _transformers_generate(kind, ids, mask, eos=True))


@pytest.mark.parametrize("kind, exporter, from_onnx", [
    ("gpt2", "dynamo", False),
    ("llama", "dynamo", False),  # grouped KV heads
    ("llama", "torchscript", True),
])
def test_greedy_tokens_equal_transformers(kind, exporter, from_onnx):
    compare_greedy(kind, artifact(kind, exporter, from_onnx=from_onnx))


def test_shared_cache_buffers_generate_what_per_step_caches_do():
    """The cpu-fp32 Llama reads its cache only through GroupQueryAttention (lengths and padding from the
    mask): the generator binds one buffer per cache tensor as past and present; the tokens, left-padded
    batch included, are those of per-step present tensors fed back as the next past."""
    import dataclasses

    generator = load_generator(artifact("llama"))
    assert generator.layout.shared_buffer
    ids, mask = _prompts(2)
    shared = generator.generate(ids, NEW_TOKENS, attention_mask=mask)
    generator.layout = dataclasses.replace(generator.layout, shared_buffer=False)
    np.testing.assert_array_equal(generator.generate(ids, NEW_TOKENS, attention_mask=mask), shared)
    assert shared.shape == (2, 9 + NEW_TOKENS)


SLOW = pytest.mark.skipif(not os.environ.get("TFGRAPH_SLOW_DECODERS"),
                          reason="more architectures: set TFGRAPH_SLOW_DECODERS=1 (about 25 s each)")


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("kind, exporter", [("mistral", "dynamo"), ("qwen2", "dynamo"), ("phi", "dynamo"),
                                            ("gpt2", "torchscript"), ("mistral", "torchscript")])
def test_greedy_tokens_equal_transformers_more_architectures(kind, exporter):
    from tfgraph.models.hf_configs import HF_KINDS

    if kind not in HF_KINDS:
        pytest.skip(f"no tiny {kind} checkpoint in tfgraph.models.hf_configs")
    compare_greedy(kind, artifact(kind, exporter))


def test_seeded_sampling_is_reproducible():
    generator = load_generator(artifact("llama"))
    ids, mask = _prompts(2)
    options = dict(attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    first = generator.generate(ids, 16, seed=7, **options)
    np.testing.assert_array_equal(first, generator.generate(ids, 16, seed=7, **options))
    assert not np.array_equal(first, generator.generate(ids, 16, seed=8, **options))
    np.testing.assert_array_equal(first[:, :9], ids)
    assert first.min() >= 0 and first.max() < 128


def test_generator_threads_spin_unless_told_not_to():
    """spin=False makes pool threads sleep between operators (either session path); by default onnxruntime's
    spinning stays on; the tokens are the same, and the logits are read from the generator's own array."""
    path = artifact("llama")
    ids, mask = _prompts(2)
    tokens = []
    for kwargs, spinning in (({"spin": False}, "0"), ({"threads": 1, "spin": False}, "0"), ({"threads": 1}, "")):
        generator = load_generator(path, **kwargs)
        options = generator.session.get_session_options()
        try:
            entry = options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            entry = ""
        assert entry == spinning, kwargs
        assert generator._logits is not None  # (batch, sequence, vocab): bound by pointer, never copied whole
        tokens.append(generator.generate(ids, 8, attention_mask=mask))
    for other in tokens[1:]:
        np.testing.assert_array_equal(other, tokens[0])


def test_bad_generation_inputs():
    generator = load_generator(artifact("llama"))
    ids, mask = _prompts(2)
    with pytest.raises(BadInputError, match="left-padded"):
        generator.generate(ids, 4, attention_mask=mask[:, ::-1].copy())
    with pytest.raises(BadInputError, match="over the model's context of 64"):
        generator.generate(np.ones((1, 70), np.int64), 1)
    with pytest.raises(BadInputError, match="at most 55 new tokens"):
        generator.generate(ids, 60)
    with pytest.raises(BadInputError, match="top_p"):
        generator.generate(ids, 2, do_sample=True, top_p=0.0)


def test_generate_command_streams_text(cli):
    path = artifact("gpt2")
    result = cli("generate", path, "--prompt", "the cat sat", "--max-new-tokens", 6, "--json")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.splitlines()]
    *tokens, summary = lines
    assert len(tokens) == len(summary["new_ids"]) and [t["token"] for t in tokens] == summary["new_ids"]
    generator = load_generator(path)
    expected = generator.generate(np.array([summary["prompt_ids"]]), 6, eos_token_id=generator.eos_token_id)
    assert summary["new_ids"] == expected[0, len(summary["prompt_ids"]):].tolist()
    assert summary["text"] == "".join(t["text"] for t in tokens)
    plain = cli("generate", path, "--prompt-ids", "5,6,7", "--max-new-tokens", 3)
    assert plain.code == 0 and "ms/token" in plain.err


def test_generate_command_errors(cli, mlp_path, tmp_path):
    path = artifact("gpt2")
    too_long = ",".join(["5"] * 65)
    result = cli("generate", path, "--prompt-ids", too_long)
    assert result.code == 2 and "over the model's context of 64 tokens" in result.err
    result = cli("generate", path, "--prompt-ids", "1,x")
    assert result.code == 2 and "--prompt-ids" in result.err
    assert cli("compile", mlp_path, "-o", tmp_path / "mlp", "-q").code == 0
    result = cli("generate", tmp_path / "mlp", "--prompt-ids", "1,2", "--json")
    assert result.code == 2 and "not a generator artifact" in json.loads(result.out)["error"]


def test_onnx_beside_its_hugging_face_files_compiles_like_the_folder(cli, tmp_path):
    """Optimum's layout — the export with config.json, generation_config.json and the tokenizer beside it: compiling
    the .onnx carries them (text prompts, genai_config.json, the context length for constant rotary tables and the
    prompt check); the same .onnx alone gets none of them."""
    import shutil

    from _decoders import onnx_file

    source = onnx_file("gpt2", "dynamo")
    folder, alone = tmp_path / "optimum", tmp_path / "alone"
    for target in (folder, alone):
        target.mkdir()
        for f in source.parent.glob(f"{source.name}*"):  # the model and its external data
            shutil.copy(f, target / f.name)
    for f in checkpoint("gpt2").iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    out = tmp_path / "out"
    result = cli("compile", folder / source.name, "--task", "text-generation", "-o", out, "-q")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["hf_files"] == str(folder)
    assert manifest["generation"]["context_length"] == config["n_positions"]
    assert manifest["generation"]["genai_config"] == "genai_config.json" and (out / "genai_config.json").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    text = cli("generate", out, "--prompt", "the cat sat", "--max-new-tokens", 4, "--json")
    assert text.code == 0, text.err
    assert json.loads(text.out.splitlines()[-1])["new_ids"]
    bare = tmp_path / "bare"
    assert cli("compile", alone / source.name, "--task", "text-generation", "-o", bare, "-q").code == 0
    manifest = json.loads((bare / "manifest.json").read_text())
    assert "hf_files" not in manifest["input"] and not (bare / "tokenizer").exists()
    assert cli("generate", bare, "--prompt", "the cat sat", "--max-new-tokens", 2).code == 2  # token ids only
