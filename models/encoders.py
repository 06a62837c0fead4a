"""Reference encoders: BERT, ALBERT and a local-window (banded attention) encoder.

All three take ``(input_ids, attention_mask, token_type_ids)`` (int64,
``[batch, sequence]``) and return ``last_hidden_state``
(float32, ``[batch, sequence, hidden]``).
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import EncoderConfig
from .layers import MASK_VALUE, EncoderEmbeddings, PostLNLayer, init_weights, padding_mask_bias


class BertEncoder(nn.Module):
    """BERT-style post-LN encoder: embeddings -> LayerNorm -> ``num_layers`` post-LN layers."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(
            config.vocab_size, config.max_positions, config.type_vocab_size, config.hidden_size, config.layer_norm_eps
        )
        self.layers = nn.ModuleList(
            PostLNLayer(config.hidden_size, config.num_heads, config.intermediate_size, config.layer_norm_eps)
            for _ in range(config.num_layers)
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids, token_type_ids)
        bias = padding_mask_bias(attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return hidden


class AlbertEncoder(nn.Module):
    """ALBERT-style encoder.

    Factorized embeddings (tables of width ``embedding_size``, LayerNorm, then a
    Linear ``embedding_size -> hidden_size``) and ONE post-LN layer whose
    parameters are shared by all ``num_layers`` applications.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        width = config.embedding_size or config.hidden_size
        self.embeddings = EncoderEmbeddings(
            config.vocab_size, config.max_positions, config.type_vocab_size, width, config.layer_norm_eps
        )
        self.embedding_projection = nn.Linear(width, config.hidden_size)
        self.shared_layer = PostLNLayer(
            config.hidden_size, config.num_heads, config.intermediate_size, config.layer_norm_eps
        )
        self.num_layers = config.num_layers

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embedding_projection(self.embeddings(input_ids, token_type_ids))
        bias = padding_mask_bias(attention_mask)
        for _ in range(self.num_layers):
            hidden = self.shared_layer(hidden, bias)
        return hidden


class LocalEncoder(BertEncoder):
    """BERT-style **post-LN** encoder with two-sided local-window attention.

    Query ``i`` attends key ``j`` only when ``|i - j| <= config.window`` and key
    ``j`` is not padding. The band is built inside the graph from the sequence
    length (``torch.arange``), so the exported model works at any length.
    After ``L`` layers position ``i`` depends on tokens within ``L * window``.
    """

    def __init__(self, config: EncoderConfig):
        if config.window is None:
            raise ValueError("LocalEncoder needs config.window")
        super().__init__(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids, token_type_ids)
        positions = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        distance = positions[:, None] - positions[None, :]
        in_band = distance.abs() <= self.config.window  # [sequence, sequence]
        key_kept = attention_mask[:, None, None, :] != 0  # [batch, 1, 1, sequence]
        allowed = in_band[None, None, :, :] & key_kept  # [batch, 1, sequence, sequence]
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        bias = torch.where(allowed, zero, torch.full_like(zero, MASK_VALUE))
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return hidden


def build_bert(config: EncoderConfig) -> BertEncoder:
    """A :class:`BertEncoder` with deterministic weights, in eval mode."""
    return init_weights(BertEncoder(config))


def build_albert(config: EncoderConfig) -> AlbertEncoder:
    """An :class:`AlbertEncoder` with deterministic weights, in eval mode."""
    return init_weights(AlbertEncoder(config))


def build_local(config: EncoderConfig) -> LocalEncoder:
    """A :class:`LocalEncoder` with deterministic weights, in eval mode."""
    return init_weights(LocalEncoder(config))


def example_inputs(config: EncoderConfig, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Realistic ``(input_ids, attention_mask, token_type_ids)`` for an encoder.

    Ids are drawn (seeded) from ``[0, vocab_size)``; the second batch row (if any)
    has its last quarter (at least one position, when ``seq >= 2``) padded;
    token types are 0 for the first half of each row and 1 for the rest.
    """
    return encoder_inputs(config.vocab_size, config.type_vocab_size, batch, seq)


def encoder_inputs(
    vocab_size: int, type_vocab_size: int, batch: int, seq: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared by the built-in encoders and Hugging Face encoders; see :func:`example_inputs`."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator, dtype=torch.long)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch >= 2 and seq >= 2:
        attention_mask[1, seq - max(1, seq // 4) :] = 0
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    if type_vocab_size >= 2:
        token_type_ids[:, seq // 2 :] = 1
    return input_ids, attention_mask, token_type_ids
