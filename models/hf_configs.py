"""Tiny Hugging Face checkpoints built from configs, for tests.

:func:`make_hf_checkpoint` builds a small randomly-initialized transformers
model (seeded, so the same kind always gives the same weights) and saves it
with ``save_pretrained`` (``config.json`` + ``model.safetensors``; no tokenizer)
into a folder that :func:`tfgraph.models.hf_model` and
:func:`tfgraph.compiler.export.export` accept. The sizes keep each dynamo export to a
few seconds on a laptop CPU.

Kinds (:data:`HF_KINDS`):

* ``bert``: ``BertModel`` (post-LN encoder, absolute positions, token types).
* ``albert``: ``AlbertModel`` (factorized embeddings, one shared layer).
* ``gpt2``: ``GPT2LMHeadModel`` (pre-LN causal LM, tied input/output embeddings).
* ``llama``: ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped KV heads:
  4 query heads sharing 2 key/value heads).
* ``mistral``: ``MistralForCausalLM`` (as llama, plus a sliding window of 8
  tokens, shorter than the sequences the tests use, so the window matters).
* ``gpt_neo``: ``GPTNeoForCausalLM`` (alternating global and local layers, the local
  ones attending a window of 8 tokens; eager attention only in transformers).
* ``qwen2``: ``Qwen2ForCausalLM`` (as llama, with biased Q/K/V projections).
* ``phi``: ``PhiForCausalLM`` (parallel attention and MLP from one LayerNorm, partial rotary
  embeddings on half of each head, biased projections).

Importing this module does not import torch; :func:`make_hf_checkpoint` does.
"""

from __future__ import annotations

import os
from pathlib import Path

from tfgraph.errors import BadInputError

__all__ = ["HF_KINDS", "SEED", "make_hf_checkpoint", "hf_config"]

#: The kinds :func:`make_hf_checkpoint` builds.
HF_KINDS = ("bert", "albert", "gpt2", "llama", "mistral", "gpt_neo", "qwen2", "phi")
#: The torch seed every checkpoint is initialized with.
SEED = 0

_VOCAB = 128
_POSITIONS = 64
_HIDDEN = 32
_LAYERS = 2
_HEADS = 4
_INTERMEDIATE = 64

# Keyword arguments of each kind's config class; the model class follows.
_KINDS: dict[str, tuple[str, str, dict]] = {
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            type_vocab_size=2,
        ),
    ),
    "albert": (
        "AlbertConfig",
        "AlbertModel",
        dict(
            vocab_size=_VOCAB,
            embedding_size=16,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            type_vocab_size=2,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=_VOCAB,
            n_embd=_HIDDEN,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_inner=_INTERMEDIATE,
            n_positions=_POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=True,
        ),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            rms_norm_eps=1e-6,
            sliding_window=8,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_layers=_LAYERS,
            num_heads=_HEADS,
            attention_types=[[["global", "local"], _LAYERS // 2]],
            window_size=8,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=2,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_INTERMEDIATE,
            max_position_embeddings=_POSITIONS,
            partial_rotary_factor=0.5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
}


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise BadInputError(f"unknown Hugging Face test model kind {kind!r}; choose one of: {', '.join(HF_KINDS)}")


def hf_config(kind: str):
    """The transformers config object of ``kind`` (imports transformers)."""
    _check_kind(kind)
    from .hf import _transformers

    transformers = _transformers()
    config_name, _, kwargs = _KINDS[kind]
    return getattr(transformers, config_name)(**kwargs)


def make_hf_checkpoint(kind: str, folder: str | os.PathLike) -> Path:
    """Build the tiny ``kind`` model (one of :data:`HF_KINDS`) and save it into ``folder``.

    The weights are drawn with ``torch.manual_seed(SEED)`` (the global RNG state
    is restored afterwards), so every call writes the same checkpoint. The folder
    is created if needed and gets ``config.json``, ``generation_config.json``
    (causal LMs) and ``model.safetensors``. Returns ``folder`` as a :class:`Path`.
    Raises BadInputError for an unknown kind.
    """
    _check_kind(kind)
    config = hf_config(kind)
    import torch

    from .hf import _transformers, quiet_transformers

    model_class = getattr(_transformers(), _KINDS[kind][1])
    destination = Path(folder)
    destination.mkdir(parents=True, exist_ok=True)
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config).eval()
        model.save_pretrained(destination)
    return destination
