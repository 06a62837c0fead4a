"""``genai_config.json``: what onnxruntime-genai needs to run a tfgraph decoder artifact.

``onnxruntime_genai.Model(ARTIFACT)`` reads this file beside ``model.onnx``: input/output names (the
cache's as ``past_key_values.%d.key`` patterns), head counts, head size, layers, context length and
the token ids, in the layout onnxruntime-genai's own model builder writes. tfgraph's graph appends
the new keys to the past itself (a Concat, or GroupQueryAttention), so ``past_present_share_buffer`` is
false unless the graph reads its past only through GroupQueryAttention with lengths from the attention
mask (the layout's ``shared_buffer``): then onnxruntime-genai binds one max-length buffer per cache
tensor as both past and present, as it does for its builder's models. Written for artifacts compiled from a Hugging Face folder
(the head counts and hidden size come from its ``config.json``) whose cache follows the Optimum names.
"""

from __future__ import annotations

from typing import Any

from tfgraph.deploy.kv_layout import CacheLayout

FILE = "genai_config.json"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(layout: CacheLayout, context: int | None, config: dict, generation: dict,
                 filename: str = "model.onnx") -> dict | None:
    """The config, or None when the artifact cannot be described (another cache convention, sizes unknown)."""
    if layout.convention != "optimum" or layout.position_ids is not None or context is None:
        return None
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return None
    inputs = {"input_ids": layout.input_ids, "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    if layout.attention_mask is not None:
        inputs["attention_mask"] = layout.attention_mask
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    search = {"do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": context,
              "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": layout.shared_buffer, "repetition_penalty": 1.0, "diversity_penalty": 0.0,
              "temperature": float(generation.get("temperature", 1.0)), "top_k": int(generation.get("top_k", 50)),
              "top_p": float(generation.get("top_p", 1.0))}
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", config.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {"logits": layout.logits, "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "type": "decoder",  # onnxruntime-genai's generic decoder-only model (its "gpt2" expects a combined cache)
            "vocab_size": layout.vocab_size or config.get("vocab_size"),
        },
        "search": search,
    }
