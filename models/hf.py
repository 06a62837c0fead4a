"""Hugging Face models: local checkpoint folders and the bundled all-MiniLM-L6-v2.

Everything is loaded offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``)
in float32, with the attention implementation the caller picks (transformers'
``attn_implementation``):

* ``"sdpa"`` (the default, as in transformers): ``scaled_dot_product_attention``,
  which both exporters decompose into MatMul/Softmax with the scale
  ``head_dim ** -0.25`` applied to Q and to K, the boolean mask turned into an
  additive one inside each layer (TorchScript: ``Where(mask, 0, -inf)`` per
  layer; dynamo: ``Where(mask, 0, float32.min)``, shared after optimization) and
  a NaN guard ``Where(IsNaN(p), 0, p)`` after each Softmax.
* ``"eager"``: transformers' explicit code: MatMul, one scale ``head_dim ** -0.5``
  on the scores, an additive ``float32.min`` mask built once, Softmax, MatMul.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tfgraph.errors import BadInputError, first_line

#: Inputs an exported Hugging Face model may take, in this order.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Causal LMs take no token types: GPT-2 accepts them but embeds them with the
#: token table, a legacy quirk nobody feeds at inference time.
DECODER_INPUTS = ("input_ids", "attention_mask")

#: ``model_type`` values that are causal language models even when the config
#: does not list a ``*ForCausalLM`` architecture.
CAUSAL_MODEL_TYPES = frozenset(
    {
        "gpt2",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "opt",
        "bloom",
        "falcon",
        "codegen",
        "starcoder2",
        "olmo",
        "smollm3",
    }
)


def _transformers():
    """Import transformers offline, or raise BadInputError with the install hint."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as error:
        raise BadInputError(
            f"loading Hugging Face models needs transformers ({error}); install tfgraph[hf]"
        ) from error
    return transformers


def read_config(path: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder (BadInputError if unreadable)."""
    try:
        with open(path / "config.json", encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise BadInputError(f"{path} is not a Hugging Face checkpoint: cannot read config.json ({error})") from error
    if not isinstance(config, dict):
        raise BadInputError(f"{path} is not a Hugging Face checkpoint: config.json is not a JSON object")
    return config


def is_causal_lm(config: dict) -> bool:
    """Whether a checkpoint config describes a causal language model."""
    architectures = config.get("architectures") or []
    if any(str(name).endswith("ForCausalLM") or str(name).endswith("LMHeadModel") for name in architectures):
        return True
    return bool(config.get("is_decoder")) or config.get("model_type") in CAUSAL_MODEL_TYPES


class HFWrapper(nn.Module):
    """Calls a Hugging Face model with positional inputs and returns one tensor.

    ``input_names`` become keyword arguments of the wrapped model; the output is
    ``last_hidden_state`` for encoders and ``logits`` for causal LMs.
    """

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output: str, extra: dict | None = None):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output = output
        self.extra = dict(extra or {})

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        result = self.model(**kwargs, **self.extra, return_dict=True)
        return result[self.output]


class SentenceEmbedder(nn.Module):
    """A BERT encoder plus sentence-transformers' mean pooling and L2 normalization.

    Returns ``(last_hidden_state, sentence_embedding)``; the embedding is the
    mean of the token vectors where ``attention_mask`` is 1, scaled to unit length.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        pooled = summed / counts
        # torch.nn.functional.normalize: x / max(||x||, eps), as sentence-transformers does.
        norm = pooled.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
        return hidden, pooled / norm


def supports_sdpa(model_class: type) -> bool:
    """Whether transformers can run ``model_class`` with ``attn_implementation="sdpa"``."""
    return bool(getattr(model_class, "_supports_sdpa", False))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs and progress bars (restored afterwards)."""
    hf_logging = _transformers().utils.logging
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def _load(path: Path, causal: bool, attention: str) -> nn.Module:
    transformers = _transformers()
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        with quiet_transformers():
            model = auto.from_pretrained(
                str(path), local_files_only=True, attn_implementation=attention, dtype=torch.float32
            )
    except Exception as error:  # transformers raises many types for bad folders
        raise BadInputError(f"cannot load the Hugging Face checkpoint in {path}: {first_line(error)}") from error
    actual = getattr(model.config, "_attn_implementation", attention)
    if actual != attention:  # never silently export another attention form than asked for
        raise BadInputError(f"{path}: transformers loaded {actual!r} attention instead of {attention!r}")
    if causal:
        model.config.use_cache = False
    return model.eval()


def forward_inputs(model_class: type, causal: bool) -> tuple[str, ...]:
    """The standard inputs ``model_class.forward`` accepts, in canonical order."""
    parameters = inspect.signature(model_class.forward).parameters
    wanted = DECODER_INPUTS if causal else ENCODER_INPUTS
    names = tuple(name for name in wanted if name in parameters)
    if "input_ids" not in names:
        raise BadInputError(f"{model_class.__name__} does not take input_ids; only text models can be exported")
    return names


def checkpoint_model_class(path: Path, causal: bool) -> type:
    """The transformers class that loads the checkpoint in ``path``
    (``AutoModel``/``AutoModelForCausalLM`` mapping), found without loading weights."""
    transformers = _transformers()
    from transformers.models.auto import modeling_auto

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # unknown model_type, malformed config, ...
        raise BadInputError(f"cannot read the Hugging Face config in {path}: {first_line(error)}") from error
    mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING if causal else modeling_auto.MODEL_MAPPING
    try:
        model_class = mapping[type(config)]
    except KeyError as error:
        kind = "causal LM" if causal else "encoder"
        raise BadInputError(
            f"transformers has no {kind} class for model_type {config.model_type!r} in {path}"
        ) from error
    return model_class


def checkpoint_input_names(path: Path, causal: bool) -> tuple[str, ...]:
    """The inputs of the checkpoint in ``path``, found from its model class without loading weights."""
    return forward_inputs(checkpoint_model_class(path, causal), causal)


def build_checkpoint(path: Path, causal: bool, attention: str = "sdpa") -> HFWrapper:
    """Load the checkpoint in ``path`` with ``attention`` ("sdpa" or "eager")
    wrapped as :class:`HFWrapper`, in eval mode."""
    model = _load(path, causal, attention)
    names = forward_inputs(type(model), causal)
    extra = {"use_cache": False} if causal else {}
    return HFWrapper(model, names, "logits" if causal else "last_hidden_state", extra).eval()


def build_minilm(path: Path, attention: str = "sdpa") -> SentenceEmbedder:
    """The bundled all-MiniLM-L6-v2 with ``attention`` as a :class:`SentenceEmbedder`, in eval mode."""
    return SentenceEmbedder(_load(path, causal=False, attention=attention)).eval()


def checkpoint_inputs(
    input_names: tuple[str, ...], vocab_size: int, type_vocab_size: int, batch: int, seq: int
) -> tuple[torch.Tensor, ...]:
    """Example inputs for a checkpoint, restricted to ``input_names`` (in that order)."""
    from .encoders import encoder_inputs

    values = dict(zip(ENCODER_INPUTS, encoder_inputs(vocab_size, type_vocab_size, batch, seq)))
    return tuple(values[name] for name in input_names)
