"""The KV-cache convention of a decoder graph, read from its input and output names and shapes.

Run-time and compile-time code share it (it imports nothing from the compiler): ``compile --task
text-generation`` records the layout in the manifest's ``generation`` section, and
:mod:`tfgraph.deploy.generate` feeds the graph from it. Conventions recognised:

* ``optimum``: ``past_key_values.{i}.key`` / ``.value`` → ``present.{i}.key`` / ``.value`` (Optimum,
  onnxruntime-genai's model builder, ``tfgraph compile HF_DIR --task text-generation``);
* ``tfgraph``: ``past_key_{i}`` / ``past_value_{i}`` → ``present_key_{i}`` / ``present_value_{i}``
  (the built-in ``gpt-*-kv`` models).

Past tensors must be (batch, kv_heads, past_sequence, head_size) with static heads and head size.
The other inputs may be ``input_ids`` (required), ``attention_mask`` (over past + current tokens)
and ``position_ids``. Anything else that looks like a cache, or a cache that does not pair up,
is a :class:`~tfgraph.errors.BadInputError` that names what was found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfgraph.errors import BadInputError

Shape = tuple[Any, ...]
Signature = Sequence[tuple[str, Shape | None, str]]  # (name, shape with ints / dim names / None, numpy dtype name)

_CONVENTIONS = {
    "optimum": (re.compile(r"^past_key_values\.(\d+)\.(key|value)$"), "present.{i}.{kind}"),
    "tfgraph": (re.compile(r"^past_(key|value)_(\d+)$"), "present_{kind}_{i}"),
}
_CACHE_WORDS = ("past", "cache", "present", "kv")
KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where a decoder graph's inputs, logits and per-layer cache tensors are."""

    convention: str
    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    past: tuple[tuple[str, str], ...]  # per layer: (key, value) input names
    present: tuple[tuple[str, str], ...]  # per layer: (key, value) output names
    kv_heads: int
    head_size: int
    dtype: str
    vocab_size: int | None
    dims: dict  # symbolic dimension names: batch, sequence, past_sequence, total_sequence (None when fixed)
    # The graph reads the past only through kernels that take one buffer as past and present (GroupQueryAttention
    # with its lengths from the attention mask): a caller may bind a (batch, kv_heads, max_length, head_size)
    # buffer per tensor as both and skip the per-step copy of the cache.
    shared_buffer: bool = False

    @property
    def layers(self) -> int:
        return len(self.past)

    def to_json(self) -> dict:
        return {
            "convention": self.convention,
            "inputs": {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                       "position_ids": self.position_ids},
            "logits": self.logits,
            "cache": {"layers": self.layers, "kv_heads": self.kv_heads, "head_size": self.head_size,
                      "dtype": self.dtype, "layout": "batch, kv_heads, sequence, head_size",
                      "shared_buffer": self.shared_buffer,
                      "past": [list(p) for p in self.past], "present": [list(p) for p in self.present]},
            "vocab_size": self.vocab_size,
            "dims": dict(self.dims),
        }

    @classmethod
    def from_json(cls, data: dict) -> CacheLayout:
        try:
            cache = data["cache"]
            return cls(convention=data["convention"], input_ids=data["inputs"]["input_ids"],
                       attention_mask=data["inputs"].get("attention_mask"),
                       position_ids=data["inputs"].get("position_ids"), logits=data["logits"],
                       past=tuple(tuple(p) for p in cache["past"]), present=tuple(tuple(p) for p in cache["present"]),
                       kv_heads=int(cache["kv_heads"]), head_size=int(cache["head_size"]), dtype=cache["dtype"],
                       vocab_size=data.get("vocab_size"), dims=dict(data.get("dims") or {}),
                       shared_buffer=bool(cache.get("shared_buffer", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(f"manifest.json 'generation' section is malformed ({type(e).__name__}: {e})") from None


def mask_positions(mask: np.ndarray, length: int) -> np.ndarray:
    """transformers' position ids of a step's last ``length`` tokens from its (batch, total) attention mask:
    the count of real tokens before each, 1 at padding (int64)."""
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    return np.ascontiguousarray(positions[:, -length:], np.int64)


def _listing(signature: Signature) -> str:
    return ", ".join(f"{name}{list(shape) if shape is not None else ''}" for name, shape, _ in signature) or "none"


def detect(inputs: Signature, outputs: Signature) -> CacheLayout | None:
    """The layout of a decoder with ``inputs``/``outputs``, or None when no input looks like a cache.
    BadInputError when something looks like a cache but no convention explains it."""
    cache_like = [name for name, _, _ in inputs if any(w in name.lower() for w in _CACHE_WORDS)]
    if not cache_like:
        return None
    out_names = {name: (shape, dtype) for name, shape, dtype in outputs}
    in_info = {name: (shape, dtype) for name, shape, dtype in inputs}
    for convention, (pattern, present_fmt) in _CONVENTIONS.items():
        layers: dict[int, dict[str, str]] = {}
        for name in cache_like:
            match = pattern.match(name)
            if match:
                i, kind = (match.group(1), match.group(2)) if convention == "optimum" else (match.group(2), match.group(1))
                layers.setdefault(int(i), {})[kind] = name
        if not layers:
            continue
        unmatched = [n for n in cache_like if not pattern.match(n)]
        if unmatched:
            raise BadInputError(f"cannot identify the KV-cache convention: inputs {unmatched} do not follow the "
                                f"{convention} names the other cache inputs use (inputs: {_listing(inputs)})")
        return _build(convention, layers, present_fmt, in_info, out_names, inputs, outputs)
    raise BadInputError(
        f"cannot identify the KV-cache convention of this decoder: inputs {_listing(inputs)}; outputs "
        f"{_listing(outputs)}. Known conventions: past_key_values.N.key/.value -> present.N.key/.value (Optimum, "
        "onnxruntime-genai) and past_key_N/past_value_N -> present_key_N/present_value_N (tfgraph)")


def _build(convention, layers, present_fmt, in_info, out_names, inputs, outputs) -> CacheLayout:
    count = max(layers) + 1
    missing = [f"layer {i} {kind}" for i in range(count) for kind in ("key", "value") if kind not in layers.get(i, {})]
    if missing:
        raise BadInputError(f"incomplete KV cache ({convention} names): no past input for {', '.join(missing[:4])} "
                            f"(inputs: {_listing(inputs)})")
    past = tuple((layers[i]["key"], layers[i]["value"]) for i in range(count))
    present = tuple((present_fmt.format(i=i, kind="key"), present_fmt.format(i=i, kind="value")) for i in range(count))
    absent = [name for pair in present for name in pair if name not in out_names]
    if absent:
        raise BadInputError(f"KV cache inputs follow the {convention} names but outputs {absent[:4]} are missing "
                            f"(outputs: {_listing(outputs)})")
    shape, dtype = in_info[past[0][0]]
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise BadInputError(f"past input {past[0][0]} has shape {shape}; expected (batch, kv_heads, past_sequence, "
                            "head_size) with fixed kv_heads and head_size")
    for pair in past:
        for name in pair:
            other = in_info[name][0]
            if other is None or len(other) != 4 or other[1] != shape[1] or other[3] != shape[3]:
                raise BadInputError(f"past input {name} has shape {other}, unlike {past[0][0]} {shape}")
    others = [n for n in in_info if n not in KNOWN_INPUTS and n not in {x for p in past for x in p}]
    if others:
        raise BadInputError(f"decoder inputs {others} are neither input_ids, attention_mask, position_ids nor the KV "
                            f"cache; tfgraph cannot feed them during generation (inputs: {_listing(inputs)})")
    if "input_ids" not in in_info:
        raise BadInputError(f"the decoder has a KV cache but no input_ids input (inputs: {_listing(inputs)})")
    logits = "logits" if "logits" in out_names else next(
        (n for n in out_names if n not in {x for p in present for x in p}), None)
    if logits is None:
        raise BadInputError(f"the decoder has no logits output (outputs: {_listing(outputs)})")
    logit_shape = out_names[logits][0]
    vocab = logit_shape[-1] if logit_shape and isinstance(logit_shape[-1], int) else None
    ids_shape = in_info["input_ids"][0] or (None, None)
    mask_shape = in_info["attention_mask"][0] if "attention_mask" in in_info else None

    def dim(s, axis):
        return s[axis] if s is not None and len(s) > axis and isinstance(s[axis], str) else None

    dims = {"batch": dim(ids_shape, 0), "sequence": dim(ids_shape, 1), "past_sequence": dim(shape, 2),
            "total_sequence": dim(mask_shape, 1)}
    return CacheLayout(convention=convention, input_ids="input_ids",
                       attention_mask="attention_mask" if "attention_mask" in in_info else None,
                       position_ids="position_ids" if "position_ids" in in_info else None, logits=logits,
                       past=past, present=present, kv_heads=int(shape[1]), head_size=int(shape[3]), dtype=str(dtype),
                       vocab_size=vocab, dims=dims)
