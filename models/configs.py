"""Hyperparameters of the built-in reference models.

This module is deliberately free of torch so that the registry in
``tfgraph.models`` can describe every model (names, vocabulary sizes, input
and output names) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    """Size of a BERT-style encoder (also used by the ALBERT and local-window models).

    ``embedding_size`` is only used by ALBERT (factorized embeddings); ``None``
    means "same as ``hidden_size``". ``window`` is only used by the local-window
    encoder: query ``i`` attends key ``j`` only when ``|i - j| <= window``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    embedding_size: int | None = None
    window: int | None = None

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class GPTConfig:
    """Size of a GPT-style causal decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


BERT_SMALL = EncoderConfig(
    vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=128
)
BERT_BASE = EncoderConfig(
    vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=512
)

ALBERT_SMALL = EncoderConfig(
    vocab_size=1000,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    max_positions=128,
    embedding_size=32,
)
ALBERT_BASE = EncoderConfig(
    vocab_size=30000,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_positions=512,
    embedding_size=128,
)

LOCAL_SMALL = EncoderConfig(
    vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=128, window=4
)
LOCAL_BASE = EncoderConfig(
    vocab_size=30522,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_positions=512,
    window=128,
)

GPT_SMALL = GPTConfig(
    vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=128
)
GPT_BASE = GPTConfig(
    vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=1024
)
