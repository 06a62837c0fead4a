"""Causal LMs from a Hugging Face folder exported *with* a KV cache (``--task text-generation``).

The exported graph follows the naming Optimum and onnxruntime-genai's model builder use, so that
tools that know those conventions read it:

* inputs ``input_ids`` [batch, sequence], ``attention_mask`` [batch, total_sequence] (past and
  current tokens, 1 = real token, left padding), ``past_key_values.{i}.key`` / ``.value``
  [batch, kv_heads, past_sequence, head_size];
* outputs ``logits`` [batch, sequence, vocab], ``present.{i}.key`` / ``.value``
  [batch, kv_heads, total_sequence, head_size] (the past with this step's keys/values appended).

Position ids are computed inside the graph from the mask, exactly as transformers' ``generate``
does (``cumsum(mask) - 1``, 1 at padded positions, the last ``sequence`` columns), so a left-padded
batch generates the same tokens as transformers without a ``position_ids`` input. One graph serves
the prompt (past length 0: empty past tensors) and every decode step.

The cache is transformers' ``DynamicCache`` built from the flat past tensors, with full
(non-sliding) layers: a sliding-window model (Mistral) keeps every key in the cache and applies
its window through the mask, so ``present`` is always ``past + new`` long.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from tfgraph.errors import BadInputError

#: Graph input/output names of layer ``i``'s cache (Optimum / onnxruntime-genai convention).
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
#: Dimension names of the cached graph.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


def cache_dims(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_size) of a transformers text config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_size = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return layers, kv_heads, head_size


class CachedDecoder(nn.Module):
    """``forward(input_ids, attention_mask, *past)`` → ``(logits, *present)`` of a transformers causal LM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = cache_dims(model.config)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        mask = attention_mask.to(torch.int64)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, return_dict=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def names(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Graph input and output names of a cached decoder with ``layers`` layers."""
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [PAST_KEY.format(i), PAST_VALUE.format(i)]
        outputs += [PRESENT_KEY.format(i), PRESENT_VALUE.format(i)]
    return tuple(inputs), tuple(outputs)


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    inputs, outputs = names(layers)
    axes = {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL}, "logits": {0: BATCH, 1: SEQUENCE}}
    for name in inputs[2:]:
        axes[name] = {0: BATCH, 2: PAST}
    for name in outputs[1:]:
        axes[name] = {0: BATCH, 2: TOTAL}
    return axes


def build(path: Path, attention: str) -> CachedDecoder:
    from .hf import _load

    model = _load(path, causal=True, attention=attention)
    model.config.use_cache = True
    return CachedDecoder(model).eval()


def example_inputs(config, vocab_size: int, batch: int, seq: int, past: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded ids, an all-ones mask over past + sequence and random past tensors; the past length
    defaults to ``max(2, seq // 2)`` (0 and 1 would be specialized by torch.export)."""
    layers, kv_heads, head_size = cache_dims(config)
    past = max(2, seq // 2) if past is None else past
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    cache = [torch.randn(batch, kv_heads, past, head_size, generator=generator) for _ in range(2 * layers)]
    return (ids, mask, *cache)


def cache_spec(spec, path: Path):
    """The :class:`~tfgraph.models.ModelSpec` of the causal LM in ``path`` exported with its KV cache
    (``spec`` is the folder's plain spec, whose attention form and sizes are kept)."""
    from dataclasses import replace

    from .hf import _transformers, is_causal_lm, read_config

    if not is_causal_lm(read_config(path)):
        raise BadInputError(f"{path}: --task text-generation needs a causal language model; this checkpoint is an "
                            "encoder (no *ForCausalLM architecture)")
    config = _transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)
    layers = cache_dims(config)[0]
    inputs, outputs = names(layers)
    return replace(
        spec,
        description=spec.description + ", with KV cache",
        build=functools.partial(build, path, spec.attention),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dynamic_axes(layers),
        example_inputs=functools.partial(example_inputs, config, spec.vocab_size),
    )
