"""Building blocks shared by the reference encoders (BERT, ALBERT, local-window).

Everything is written "eager style" (explicit matmul/softmax, explicit masks)
so that the exported ONNX graphs contain the patterns the rewriting passes
look for, exactly as the Hugging Face eager implementations produce them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The additive bias for "may not attend": the most negative float32, as in
#: Hugging Face's eager attention. Unlike ``-inf`` it keeps fully masked rows
#: finite (softmax of a row of equal values is uniform, never NaN).
MASK_VALUE = torch.finfo(torch.float32).min


def init_weights(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give ``module`` deterministic weights and put it in eval mode.

    LayerNorm weights become 1 and LayerNorm biases 0; every other parameter
    (Linear and embedding weights, and Linear biases, so that tests notice a
    dropped bias) is drawn from N(0, std^2) with a generator seeded with
    ``seed``, in ``named_parameters`` order. Tied parameters appear once.
    """
    generator = torch.Generator().manual_seed(seed)
    layer_norm_params = set()
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            layer_norm_params.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if id(param) in layer_norm_params:
                if name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module.eval()


def padding_mask_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a 0/1 ``[batch, sequence]`` mask into an additive ``[batch, 1, 1, sequence]`` bias.

    Kept keys get 0, padded keys ``MASK_VALUE``: ``(1 - mask) * finfo(float32).min``.
    """
    extended = attention_mask[:, None, None, :].to(torch.float32)
    return (1.0 - extended) * MASK_VALUE


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q, K, V projections (with bias).

    Returns the context before the output projection; the caller applies it.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, sequence, _ = x.shape
        return x.reshape(batch, sequence, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``hidden``: [batch, sequence, hidden]; ``bias``: additive, broadcastable to
        [batch, heads, sequence, sequence]."""
        batch, sequence, width = hidden.shape
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + bias
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v)
        return context.transpose(1, 2).reshape(batch, sequence, width)


class PostLNLayer(nn.Module):
    """One BERT encoder layer (post-LayerNorm).

    ``x = LN(x + O(attn(x)))`` then ``x = LN(x + W2(gelu_erf(W1(x))))``.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads)
        self.attention_output = nn.Linear(hidden_size, hidden_size)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = nn.GELU()  # exact (erf) GELU, like BERT
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attended = self.attention_output(self.attention(hidden, bias))
        hidden = self.attention_norm(hidden + attended)
        ffn = self.output(self.activation(self.intermediate(hidden)))
        return self.output_norm(hidden + ffn)


class EncoderEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm.

    With ``embedding_size`` smaller than the hidden size (ALBERT) the three
    tables have width ``embedding_size`` and the caller maps to the hidden size.
    """

    def __init__(self, vocab_size: int, max_positions: int, type_vocab_size: int, width: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(max_positions, width)
        self.token_type = nn.Embedding(type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        embedded = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.norm(embedded)
