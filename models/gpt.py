"""Reference GPT-style causal decoder (pre-LN), with or without a KV cache.

Without cache the module maps ``input_ids`` to ``logits``. With cache
(``use_cache=True``) it takes ``input_ids, past_key_0, past_value_0, ...,
past_key_{L-1}, past_value_{L-1}`` (the past tensors are
``[batch, heads, past_sequence, head_dim]``) and returns ``logits,
present_key_0, present_value_0, ...`` where each present tensor is the past one
with this step's keys/values appended along the sequence axis.

Past length 0 (the first step of generation): the torch module accepts empty
``[batch, heads, 0, head_dim]`` past tensors, and so do the exported graphs in
onnxruntime, from either exporter (the tests check this), because the graphs
are traced with a past length of at least 2 and keep it symbolic. Tracing
*with* past length 0 or 1 is what fails: torch.export specializes dimensions
of size 0 and 1 and rejects the dynamic ``past_sequence`` ("Constraints
violated"), so :func:`example_inputs` never produces them by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configs import GPTConfig
from .layers import MASK_VALUE, init_weights


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with fused QKV projection and optional KV cache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        bias: torch.Tensor,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(output, key, value)``; key/value include the past, if any."""
        batch, sequence, width = hidden.shape
        q, k, v = self.qkv(hidden).split(width, dim=-1)
        q = q.reshape(batch, sequence, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, sequence, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, sequence, self.num_heads, self.head_dim).transpose(1, 2)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=2)
            v = torch.cat([past_value, v], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + bias, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, sequence, width)
        return self.proj(context), k, v


class Block(nn.Module):
    """Pre-LN decoder block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` (tanh GELU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden, bias, past_key=None, past_value=None):
        attended, key, value = self.attn(self.ln_1(hidden), bias, past_key, past_value)
        hidden = hidden + attended
        hidden = hidden + self.fc_out(self.act(self.fc(self.ln_2(hidden))))
        return hidden, key, value


class GPTDecoder(nn.Module):
    """GPT-style decoder: token + learned position embeddings, pre-LN blocks, final LN,
    LM head tied to the token embedding (``lm_head.weight is wte.weight``)."""

    def __init__(self, config: GPTConfig, use_cache: bool = False):
        super().__init__()
        self.config = config
        self.use_cache = use_cache
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_positions, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        """``forward(input_ids)`` -> logits, or with cache
        ``forward(input_ids, pk0, pv0, pk1, pv1, ...)`` -> ``(logits, k0, v0, k1, v1, ...)``."""
        layers = len(self.blocks)
        if self.use_cache and len(past) != 2 * layers:
            raise ValueError(f"expected {2 * layers} past tensors, got {len(past)}")
        if not self.use_cache and past:
            raise ValueError("this model was built without a KV cache")
        sequence = input_ids.shape[1]
        past_length = past[0].shape[2] if self.use_cache else 0
        # Absolute positions of this step's tokens, and of every key (past + new).
        query_positions = torch.arange(sequence, dtype=torch.long, device=input_ids.device) + past_length
        key_positions = torch.arange(past_length + sequence, dtype=torch.long, device=input_ids.device)
        visible = key_positions[None, :] <= query_positions[:, None]  # [sequence, past + sequence]
        zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        bias = torch.where(visible, zero, torch.full_like(zero, MASK_VALUE))[None, None]

        hidden = self.wte(input_ids) + self.wpe(query_positions)[None]
        presents: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if self.use_cache:
                hidden, key, value = block(hidden, bias, past[2 * index], past[2 * index + 1])
                presents += [key, value]
            else:
                hidden, _, _ = block(hidden, bias)
        logits = self.lm_head(self.ln_f(hidden))
        if self.use_cache:
            return (logits, *presents)
        return logits


def build_gpt(config: GPTConfig, use_cache: bool = False) -> GPTDecoder:
    """A :class:`GPTDecoder` with deterministic weights, in eval mode."""
    return init_weights(GPTDecoder(config, use_cache=use_cache))


def past_length_for(seq: int) -> int:
    """The past length :func:`example_inputs` uses by default: ``max(2, seq // 2)``."""
    return max(2, seq // 2)


def example_inputs(
    config: GPTConfig, batch: int, seq: int, use_cache: bool = False, past: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Seeded ``input_ids`` (``[batch, seq]``, ids < vocab) and, with cache, past
    key/value tensors ``[batch, heads, past, head_dim]`` (``past`` defaults to
    :func:`past_length_for`)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator, dtype=torch.long)
    if not use_cache:
        return (input_ids,)
    past = past_length_for(seq) if past is None else past
    shape = (batch, config.num_heads, past, config.head_dim)
    cache = tuple(torch.randn(shape, generator=generator) for _ in range(2 * config.num_layers))
    return (input_ids, *cache)
