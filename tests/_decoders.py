"""Decoder artifacts for the KV-cache / generation tests, built once per test process and shared by
every module that asks for the same (kind, exporter, target): a dynamo export plus a compile takes
~20 s on the 2-core CI machine. Tiny random-init checkpoints from tfgraph.models.hf_configs
(hidden 32, 2 layers, 64 positions); ``gpt2`` gets a small trained tokenizer so text prompts work."""

from __future__ import annotations

import atexit
import pathlib
import shutil
import tempfile

_ROOT = pathlib.Path(tempfile.mkdtemp(prefix="tfgraph-decoders-"))
atexit.register(shutil.rmtree, _ROOT, True)
_CACHE: dict[tuple, pathlib.Path] = {}
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we read a book at night",
             "she plays the piano well", "birds sing in the morning"]


def checkpoint(kind: str) -> pathlib.Path:
    key = ("checkpoint", kind)
    if key not in _CACHE:
        from tfgraph.models.hf_configs import make_hf_checkpoint

        folder = _llama64(_ROOT / "hf" / kind) if kind == "llama64" else make_hf_checkpoint(kind, _ROOT / "hf" / kind)
        if kind == "gpt2":
            _tokenizer(folder, vocab_size=128)
        _CACHE[key] = folder
    return _CACHE[key]


def _llama64(folder: pathlib.Path) -> pathlib.Path:
    """A Llama with weights worth quantizing: hidden 64, FFN 256, vocab 512, 4 query / 2 KV heads, 2 layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def _tokenizer(folder: pathlib.Path, vocab_size: int) -> None:
    """A BPE tokenizer trained on SENTENCES with at most ``vocab_size`` tokens, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)  # tokenizer.json + tokenizer_config.json


def onnx_file(kind: str, exporter: str) -> pathlib.Path:
    key = ("onnx", kind, exporter)
    if key not in _CACHE:
        from tfgraph.compiler.export import export

        _CACHE[key] = export(checkpoint(kind), _ROOT / f"{kind}-{exporter}.onnx", exporter=exporter,
                             task="text-generation")
    return _CACHE[key]


def artifact(kind: str, exporter: str = "dynamo", target: str = "cpu-fp32", *, from_onnx: bool = False,
             **options) -> pathlib.Path:
    """``compile --task text-generation`` of ``kind`` (from its folder, or from its exported .onnx)."""
    key = ("artifact", kind, exporter, target, from_onnx, tuple(sorted(options.items())))
    if key not in _CACHE:
        import tfgraph

        source = onnx_file(kind, exporter) if from_onnx else checkpoint(kind)
        out = _ROOT / "artifacts" / f"{kind}-{exporter}-{target}-{len(_CACHE)}"
        tfgraph.compile(source, target, output=out, task="text-generation", exporter=exporter, **options)
        _CACHE[key] = out
    return _CACHE[key]
