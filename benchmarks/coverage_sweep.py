#!/usr/bin/env python
"""Attention-fusion coverage over transformers' architectures, tfgraph against its peers.

For every candidate ``model_type`` of transformers' ``MODEL_MAPPING`` (a priority list of
encoders, decoders, encoder-decoders, vision and audio encoders first; ``--all`` adds every
other type), the config class is built with its defaults and made small generically
(``shrink``: at most 2 layers, hidden size 64, 4 heads, small vocabularies and images; a
few types need their own overrides in ``OVERRIDES``). A type whose config cannot be made
small, or whose base model cannot be built, or that exports with neither exporter, is
recorded with a one-line reason and does not count as an architecture of the sweep.

Each architecture is exported with both exporters (TorchScript, dynamo) and both
attention implementations (``eager``, ``sdpa``; only those the model class has), each
export in its own subprocess with a timeout. On every export that succeeds:

* **blocks**: softmax attention blocks of the export (``tfgraph.analysis.attention_blocks``:
  a Softmax with a MatMul upstream and one downstream, fused ops of the exporter counted too);
* **tfgraph**: ``tfgraph.compile(path, target="cpu-fp32")`` (verification on): blocks fused,
  max abs error against the input model, compile time, and for every unfused Softmax the
  reason the fusion rule gave (``fuse-attention``'s ``unfused`` report);
* **onnxscript**: ``onnxscript.rewriter.ort_fusions.optimize_for_ort``, fused blocks;
* **ort**: ``onnxruntime.transformers.optimizer.optimize_model`` with the matching
  ``model_type`` (``ORT_MODEL_TYPE``; ``bert`` for the encoders it has no type for), fused blocks.

Results are cached per export in ``--out``'s JSON (``benchmarks/results/coverage.json``);
a rerun skips exports already done (``--redo`` recomputes, ``--retry-failed`` reruns failed
ones, ``--recompile`` reuses cached exports' files when present and recompiles only).

Usage::

    nice -n 10 python benchmarks/coverage_sweep.py                 # priority list
    python benchmarks/coverage_sweep.py --types bert,t5 --redo      # some types again
    python benchmarks/coverage_sweep.py --report                   # rewrite coverage.md from the JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "coverage.md"
EXPORTERS = ("torchscript", "dynamo")
ATTENTIONS = ("eager", "sdpa")
BATCH, SEQ = 2, 16
IMAGE = 32
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tried first: the groups below interleaved (a spread of attention forms early); --all appends every other type.
_GROUPS = (
    # text encoders
    ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta", "camembert", "mpnet",
     "ernie", "roformer", "megatron-bert", "data2vec-text", "mobilebert", "esm", "modernbert", "convbert", "big_bird",
     "rembert", "xlm", "flaubert", "layoutlm", "ibert", "funnel", "xmod", "lilt"),
    # decoders
    ("gpt2", "llama", "bloom", "gemma2", "gpt_bigcode", "falcon", "mpt", "phi", "qwen2", "gpt_neo", "gpt_neox", "gptj",
     "codegen", "mistral", "qwen3", "phi3", "gemma", "gemma3_text", "olmo", "olmo2", "stablelm", "opt", "biogpt",
     "starcoder2", "cohere", "granite", "persimmon", "xglm", "glm", "helium", "nemotron", "ctrl", "smollm3"),
    # encoder-decoders (encoder and decoder in one export)
    ("t5", "bart", "whisper", "marian", "mt5", "mbart", "pegasus", "blenderbot", "m2m_100", "longt5", "led", "plbart"),
    # vision
    ("vit", "swin", "beit", "deit", "dinov2", "data2vec-vision", "swinv2", "yolos", "vit_msn", "ijepa",
     "clip_vision_model", "siglip_vision_model", "levit", "pvt", "segformer", "mobilevit", "vit_mae", "dinat"),
    # audio
    ("wav2vec2", "wavlm", "hubert", "audio-spectrogram-transformer", "data2vec-audio", "sew", "unispeech",
     "speech_to_text", "moonshine"),
)
PRIORITY = tuple(dict.fromkeys(t for row in zip(*(g + ("",) * (33 - len(g)) for g in _GROUPS)) for t in row if t))

# onnxruntime.transformers.optimizer model types for the peers (bert for encoders without one).
ORT_MODEL_TYPE = {
    "gpt2": "gpt2", "gpt_neo": "gpt2", "gptj": "gpt2", "codegen": "gpt2", "gpt_bigcode": "gpt2", "opt": "gpt2",
    "biogpt": "gpt2", "xglm": "gpt2", "ctrl": "gpt2", "bloom": "gpt2", "mpt": "gpt2", "falcon": "gpt2",
    "gpt_neox": "gpt_neox", "phi": "phi", "phi3": "phi", "qwen3": "qwen3",
    "t5": "t5", "mt5": "t5", "longt5": "t5",
    "bart": "bart", "mbart": "bart", "marian": "bart", "pegasus": "bart", "blenderbot": "bart", "m2m_100": "bart",
    "led": "bart", "plbart": "bart", "whisper": "bart",
    "vit": "vit", "deit": "vit", "beit": "vit", "data2vec-vision": "vit", "dinov2": "vit", "yolos": "vit",
    "vit_msn": "vit", "ijepa": "vit", "vit_mae": "vit", "swin": "swin", "swinv2": "swin",
    "clip_vision_model": "clip", "siglip_vision_model": "clip",
}

# Generic shrinking: each attribute present on the config is set to the value.
SMALL = {
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "num_decoder_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embed_dim": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "d_ff": 128, "hidden_dim": 128, "n_inner": 128, "d_kv": 16, "head_dim": 16,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_source_positions": 64,
    "max_target_positions": 64, "image_size": IMAGE, "patch_size": 8, "vocab_size": 512, "num_mel_bins": 16,
    "embedding_size": 64, "num_key_value_heads": 2, "multi_query_group_num": 2,
}
# Per-type overrides, applied after SMALL (types whose config has lists or coupled sizes).
OVERRIDES = {
    "swin": dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4, image_size=32, patch_size=2),
    "swinv2": dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4, image_size=32, patch_size=2),
    "dinat": dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], kernel_size=3, image_size=32, patch_size=4),
    "pvt": dict(hidden_sizes=[32, 64], depths=[1, 1], num_attention_heads=[1, 2], sequence_reduction_ratios=[2, 1],
                patch_sizes=[4, 2], strides=[4, 2], mlp_ratios=[2, 2], num_encoder_blocks=2, image_size=32),
    "segformer": dict(hidden_sizes=[32, 64], depths=[1, 1], num_attention_heads=[1, 2], sr_ratios=[2, 1],
                      patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], num_encoder_blocks=2),
    "levit": dict(hidden_sizes=[64, 96], depths=[1, 1], num_attention_heads=[2, 3], key_dim=[16, 16],
                  attention_ratio=[2, 2], mlp_ratio=[2, 2], down_ops=[["Subsample", 16, 4, 4, 2, 2]], image_size=64,
                  patch_size=16),
    "mobilevit": dict(hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96], num_attention_heads=2,
                      image_size=64, patch_size=2),
    "funnel": dict(block_sizes=[1, 1], num_decoder_layers=1, d_model=64, n_head=4, d_head=16, d_inner=128),
    "big_bird": dict(attention_type="original_full"),
    "xlm": dict(emb_dim=64, n_layers=2, n_heads=4),
    "flaubert": dict(emb_dim=64, n_layers=2, n_heads=4),
    "ctrl": dict(n_embd=64, dff=128),
    "wav2vec2": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4),
    "hubert": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4),
    "data2vec-audio": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4, conv_pos_kernel_size=5, num_conv_pos_embeddings_layers=1),
    "wavlm": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64),
    "unispeech": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4),
    "sew": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_feat_extract_layers=2, num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4, squeeze_factor=2),
    "audio-spectrogram-transformer": dict(max_length=64, num_mel_bins=32, patch_size=16, frequency_stride=10,
                                          time_stride=10),
    "speech_to_text": dict(input_feat_per_channel=16, conv_channels=32, num_conv_layers=2),
    "whisper": dict(max_source_positions=32, num_mel_bins=16),
    "gemma2": dict(sliding_window=8),
    "mistral": dict(sliding_window=8),
    # ALiBi falcon computes its slopes in bfloat16 (transformers: slopes.bfloat16() * arange): TorchScript
    # exports that Cast as complex128, dynamo a bfloat16 Mul onnxruntime CPU has no kernel for; rotary instead.
    "falcon": dict(new_decoder_architecture=False, multi_query=True, alibi=False),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2),
    "phi": dict(partial_rotary_factor=0.5),
    "stablelm": dict(partial_rotary_factor=0.25),
    "persimmon": dict(partial_rotary_factor=0.5),
    "glm": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(rotary_pct=0.25),
    "gpt_bigcode": dict(multi_query=True),
    "moonshine": dict(encoder_num_key_value_heads=4, decoder_num_key_value_heads=4, encoder_num_attention_heads=4,
                      decoder_num_attention_heads=4, encoder_num_hidden_layers=2, decoder_num_hidden_layers=2),
    "longt5": dict(local_radius=4, encoder_attention_type="local"),
    "led": dict(attention_window=[8, 8]),
    # ViTMAE masks patches by torch.rand noise drawn inside the model unless `noise` is given: the export
    # would hold an unseeded RandomUniform, its outputs not a function of its inputs. Every patch kept,
    # in order (FIXED_INPUTS' noise): the encoder as used for features.
    "vit_mae": dict(mask_ratio=0.0),
}


def _ascending_noise(config, tensors):
    """ViTMAE's ``noise``: ascending per patch, so the shuffle is the identity (batch read off the pixels)."""
    import torch

    patches = (config.image_size // config.patch_size) ** 2
    return torch.arange(patches, dtype=torch.float32).unsqueeze(0).expand(tensors[0].shape[0], patches)


# Keyword inputs computed inside the wrapper (not inputs of the export): what makes a model deterministic.
FIXED_INPUTS = {"vit_mae": {"noise": _ascending_noise}}
LIMITS = {"layers": 2, "hidden": 128}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return (f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__)[:240]


@contextlib.contextmanager
def quiet():
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --- building a small model -----------------------------------------------------------


def candidate_types(all_types: bool) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    known = set(MODEL_MAPPING_NAMES)
    order = [t for t in PRIORITY if t in known]
    if all_types:
        order += sorted(known - set(order))
    return order


def small_config(model_type: str):
    """The type's config made small; raises ValueError when it cannot be (limits of LIMITS)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for key, value in {**SMALL, **OVERRIDES.get(model_type, {})}.items():
        if key == "num_key_value_heads" and getattr(config, key, None) is None:
            continue
        if key in ("head_dim", "d_kv") and not hasattr(config, key):
            continue
        if hasattr(config, key) or key in OVERRIDES.get(model_type, {}):
            try:
                setattr(config, key, value)
            except Exception:  # noqa: BLE001 - a read-only property: left as is
                pass
    for sub in ("text_config", "vision_config", "encoder", "decoder"):
        if getattr(config, sub, None) is not None and hasattr(getattr(config, sub), "to_dict"):
            raise ValueError(f"composite config ({sub}); not a single encoder/decoder")
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "unk_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and vocab and value >= vocab:
            setattr(config, key, min(vocab - 1, 2 + ("eos" in key)))
    if getattr(config, "layer_types", None) is not None and isinstance(config.layer_types, list):
        config.layer_types = config.layer_types[: _layers(config)]
    layers, hidden = _layers(config), _hidden(config)
    if layers is not None and layers > LIMITS["layers"]:
        raise ValueError(f"{layers} layers after shrinking")
    if hidden is not None and hidden > LIMITS["hidden"]:
        raise ValueError(f"hidden size {hidden} after shrinking")
    return config


def _layers(config) -> int | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    depths = getattr(config, "depths", None)
    return max(depths) if isinstance(depths, (list, tuple)) and depths else None


def _hidden(config) -> int | None:
    for key in ("hidden_size", "d_model", "n_embd", "embed_dim", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if isinstance(sizes, (list, tuple)) and sizes else None


def build(model_type: str, attention: str):
    """(wrapper module, input names, example inputs, dynamic axes per input, kind) for one type."""
    import inspect

    import torch
    from transformers import AutoModel

    config = small_config(model_type)
    torch.manual_seed(0)
    with quiet():
        model = AutoModel.from_config(config, attn_implementation=attention)
    model.eval()
    used = getattr(model.config, "_attn_implementation", None)
    if used is not None and used != attention:
        raise ValueError(f"asked for {attention} attention, the model uses {used}")
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    names, inputs, axes = [], [], []
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if main == "input_ids":
        names.append("input_ids")
        inputs.append(torch.randint(3, max(4, min(vocab, 500)), (BATCH, SEQ)))
        axes.append({0: "batch", 1: "sequence"})
        if "attention_mask" in params:
            mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
            mask[1, -3:] = 0
            names.append("attention_mask")
            inputs.append(mask)
            axes.append({0: "batch", 1: "sequence"})
        kind = "text"
    elif main == "pixel_values":
        size = getattr(config, "image_size", IMAGE)
        size = size if isinstance(size, int) else size[0]
        names.append("pixel_values")
        inputs.append(torch.randn(BATCH, getattr(config, "num_channels", 3), size, size))
        axes.append({0: "batch"})
        kind = "vision"
    elif main == "input_values":
        names.append("input_values")
        inputs.append(torch.randn(BATCH, 1600) if model_type != "audio-spectrogram-transformer" else
                      torch.randn(BATCH, config.max_length, config.num_mel_bins))
        axes.append({0: "batch"})
        kind = "audio"
    elif main == "input_features":
        if model_type == "whisper":
            shape = (BATCH, config.num_mel_bins, 2 * config.max_source_positions)
        else:
            shape = (BATCH, 64, getattr(config, "input_feat_per_channel", 16) * getattr(config, "input_channels", 1))
        names.append("input_features")
        inputs.append(torch.randn(*shape))
        axes.append({0: "batch"})
        kind = "audio"
    else:
        raise ValueError(f"main input {main!r} not handled")
    if "decoder_input_ids" in params:
        names.append("decoder_input_ids")
        inputs.append(torch.randint(3, max(4, min(vocab or 500, 500)), (BATCH, 8)))
        axes.append({0: "batch", 1: "decoder_sequence"})
        kind = "enc-dec " + kind

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            kwargs = dict(zip(names, tensors))
            for key, make in FIXED_INPUTS.get(model_type, {}).items():
                kwargs[key] = make(config, tensors)
            if "use_cache" in params:
                kwargs["use_cache"] = False
            out = self.model(**kwargs, return_dict=True)
            return out[0] if not hasattr(out, "last_hidden_state") or out.last_hidden_state is None else out.last_hidden_state

    return Wrapper().eval(), names, inputs, axes, kind


def export_one(model_type: str, attention: str, exporter: str, path: pathlib.Path) -> dict:
    import torch

    module, names, inputs, axes, kind = build(model_type, attention)
    with torch.no_grad():
        reference = module(*inputs)
    info = {"kind": kind, "inputs": names, "dynamic": True}
    with quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, input_names=names, output_names=["output"],
                              dynamic_axes=dict(zip(names, axes)), opset_version=18, do_constant_folding=True)
        else:
            dims = {}
            shapes = [{a: dims.setdefault(n, torch.export.Dim(n)) for a, n in ax.items()} for ax in axes]
            try:
                program = torch.onnx.export(module, tuple(inputs), dynamo=True, input_names=names,
                                            output_names=["output"], dynamic_shapes=(tuple(shapes),), optimize=True)
            except Exception:  # noqa: BLE001 - dynamic shapes refused: export at the traced shapes
                info["dynamic"] = False
                program = torch.onnx.export(module, tuple(inputs), dynamo=True, input_names=names,
                                            output_names=["output"], optimize=True)
            program.save(str(path))
    info["torch_output_shape"] = list(reference.shape)
    return info


# --- one export, in a subprocess -----------------------------------------------------------


def fused_count(path: pathlib.Path) -> dict:
    import onnx_ir as ir

    from tfgraph.analysis import attention_blocks

    blocks = attention_blocks(ir.load(str(path)))
    return {"fused": blocks["fused"], "unfused": blocks["unfused"], "fused_ops": blocks["fused_ops"]}


def run_peers(model_type: str, raw: pathlib.Path, workdir: pathlib.Path) -> dict:
    import onnx_ir as ir

    out = {}
    start = time.perf_counter()
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with quiet():
            model = ir.load(str(raw))
            result = optimize_for_ort(model)
            model = result[0] if isinstance(result, tuple) else result
            ir.save(model, str(workdir / "onnxscript.onnx"))
        out["onnxscript"] = {**fused_count(workdir / "onnxscript.onnx"), "time_s": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001
        out["onnxscript"] = {"error": one_line(e)}
    start = time.perf_counter()
    model_type_ort = ORT_MODEL_TYPE.get(model_type, "bert")
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        config = small_config(model_type)
        heads = getattr(config, "num_attention_heads", 0)
        heads = heads if isinstance(heads, int) else 0
        hidden = _hidden(config) or 0
        with quiet():
            opt = optimize_model(str(raw), model_type=model_type_ort, num_heads=heads, hidden_size=hidden, use_gpu=False)
            opt.save_model_to_file(str(workdir / "ort.onnx"), use_external_data_format=False)
        out["ort"] = {**fused_count(workdir / "ort.onnx"), "model_type": model_type_ort, "time_s": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001
        out["ort"] = {"error": one_line(e), "model_type": model_type_ort}
    return out


def run_tfgraph(raw: pathlib.Path) -> dict:
    import tfgraph

    start = time.perf_counter()
    try:
        with quiet():
            artifact = tfgraph.compile(str(raw), target="cpu-fp32")
    except Exception as e:  # noqa: BLE001
        return {"error": one_line(e), "time_s": time.perf_counter() - start}
    manifest = artifact.manifest
    verification = manifest.get("verification") or {}
    errors = [o.get("max_abs") for o in (verification.get("outputs") or {}).values() if isinstance(o, dict)]
    errors = [e for e in errors if isinstance(e, (int, float))]
    reasons = []
    for record in manifest.get("passes", []):
        if record.get("name") == "fuse-attention":
            report = record.get("rules") or {}
            for item in (report.get("unfused-softmax") or {}).get("blocks", []):
                reasons.append(item)
    attention = manifest.get("attention") or {}
    return {"found": attention.get("found"), "fused": attention.get("fused"), "unfused": attention.get("unfused"),
            "fused_ops": attention.get("fused_ops"), "max_abs": max(errors) if errors else None,
            "passed": verification.get("passed"), "time_s": time.perf_counter() - start, "unfused_reasons": reasons}


def one(model_type: str, attention: str, exporter: str, keep: pathlib.Path | None) -> dict:
    """Everything for one export (runs in a subprocess)."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tfgraph-coverage-"))
    raw = workdir / "raw.onnx"
    start = time.perf_counter()
    try:
        info = export_one(model_type, attention, exporter, raw)
    except Exception as e:  # noqa: BLE001
        stage = "config" if isinstance(e, (ValueError, KeyError, TypeError, AttributeError)) and not raw.exists() else "export"
        return {"error": f"{stage}: {one_line(e)}", "stage": stage, "export_s": time.perf_counter() - start}
    result = {**info, "export_s": time.perf_counter() - start}
    try:
        result["blocks"] = fused_count(raw)
    except Exception as e:  # noqa: BLE001
        return {**result, "error": f"load: {one_line(e)}", "stage": "load"}
    result["tfgraph"] = run_tfgraph(raw)
    if "input model does not run" in result["tfgraph"].get("error", ""):  # the exporter wrote a broken model
        return {**result, "error": f"export invalid: {result['tfgraph']['error']}", "stage": "export"}
    result.update(run_peers(model_type, raw, workdir))
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(raw, keep)
    return result


# --- driver ----------------------------------------------------------------------------


def load_cache(path: pathlib.Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"exports": {}, "skipped": {}}


def save_cache(path: pathlib.Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, path)


def key_of(model_type: str, attention: str, exporter: str) -> str:
    return f"{model_type}|{attention}|{exporter}"


def run_sub(model_type: str, attention: str, exporter: str, timeout: float, keep: pathlib.Path | None) -> dict:
    command = [sys.executable, __file__, "--one", key_of(model_type, attention, exporter)]
    if keep is not None:
        command += ["--keep", str(keep)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s", "stage": "timeout"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": f"subprocess exit {done.returncode}: {tail[-1][:240] if tail else ''}", "stage": "crash"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--types", help="comma-separated model types (default: the priority list)")
    parser.add_argument("--all", action="store_true", help="every model type of transformers after the priority list")
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--attentions", default=",".join(ATTENTIONS))
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per export (export + compile + peers)")
    parser.add_argument("--jobs", type=int, default=2, help="architectures swept at once (each export is a subprocess)")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--merge", type=pathlib.Path, help="take the exports of another run's JSON (then --report)")
    parser.add_argument("--keep", type=pathlib.Path, help="keep exported files under this folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model_type, attention, exporter = args.one.split("|")
        try:
            result = one(model_type, attention, exporter, pathlib.Path(args.keep) if args.keep else None)
        except Exception as e:  # noqa: BLE001
            result = {"error": f"crash: {one_line(e)}", "stage": "crash", "trace": traceback.format_exc()[-800:]}
        print(json.dumps(result, default=str))
        return 0
    cache_path = args.out.with_suffix(".json")
    cache = load_cache(cache_path)
    if args.merge:
        cache["exports"].update(json.loads(args.merge.read_text())["exports"])
        save_cache(cache_path, cache)
    if args.report or args.merge:
        args.out.write_text(render(cache))
        return 0
    types = args.types.split(",") if args.types else candidate_types(args.all)
    lock = threading.Lock()

    def sweep_type(model_type: str) -> None:
        for attention in args.attentions.split(","):
            for exporter in args.exporters.split(","):
                key = key_of(model_type, attention, exporter)
                old = cache["exports"].get(key)
                if old is not None and old.get("stage") == "config" and not args.redo:
                    break
                failed = old is not None and ("error" in old or "error" in (old.get("tfgraph") or {}))
                if old is not None and not args.redo and not (args.retry_failed and failed):
                    continue
                keep = args.keep / f"{model_type}-{attention}-{exporter}.onnx" if args.keep else None
                start = time.perf_counter()
                result = run_sub(model_type, attention, exporter, args.timeout, keep)
                result["wall_s"] = time.perf_counter() - start
                t = result.get("tfgraph") or {}
                with lock:
                    cache["exports"][key] = result
                    save_cache(cache_path, cache)
                    log(f"{key}: " + (result["error"] if "error" in result else
                                      f"blocks {result['blocks']['unfused'] + result['blocks']['fused']}, tfgraph "
                                      f"{t.get('fused')}/{t.get('found')} err {t.get('max_abs')} {t.get('error', '')}")
                        + f" ({result['wall_s']:.0f}s)")
                if result.get("stage") == "config":  # the other exports of this attention cannot build either
                    if "asked for" not in result["error"] and "does not support" not in result["error"]:
                        return
                    break
        with lock:
            args.out.write_text(render(cache))

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(sweep_type, types))
    args.out.write_text(render(cache))
    return 0


# --- report ----------------------------------------------------------------------------


def _short(op: str) -> str:
    inner = op[op.index("[") + 1:op.rindex("]")].split("|") if op.startswith("If[") else None
    if inner:
        return "If(" + "/".join(sorted({_short(x) for x in inner})) + ")"
    return {"com.microsoft::Attention": "Attention", "com.microsoft::MultiHeadAttention": "MHA",
            "com.microsoft::GroupQueryAttention": "GQA", "tfgraph::AttentionBHSD": "neutral",
            "tfgraph::Attention": "neutral", "tfgraph::BlockedAttention": "blocked"}.get(op, op)


def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.1e}" if isinstance(x, float) else str(x)


def render(cache: dict) -> str:
    exports = cache["exports"]
    by_type: dict[str, dict] = {}
    for key, result in exports.items():
        model_type, attention, exporter = key.split("|")
        by_type.setdefault(model_type, {})[(attention, exporter)] = result
    rows, failures, below = [], [], []
    totals = {"archs": 0, "exports": 0, "blocks": 0, "tfgraph": 0, "onnxscript": 0, "ort": 0, "max_abs": 0.0,
              "failed_compiles": 0}
    for model_type in sorted(by_type):
        results = by_type[model_type]
        ok = {k: r for k, r in results.items() if "error" not in r}
        if not ok:
            failures.append((model_type, sorted({r["error"] for r in results.values()})[0]))
            continue
        totals["archs"] += 1
        arch = {"blocks": 0, "tfgraph": 0, "onnxscript": 0, "ort": 0, "max_abs": None, "time": 0.0, "reasons": [], "ops": set(),
                "exports": []}
        for (attention, exporter), r in sorted(ok.items()):
            blocks = r["blocks"]["fused"] + r["blocks"]["unfused"]
            t = r.get("tfgraph", {})
            arch["exports"].append(f"{attention[0]}/{exporter[0]}")
            arch["blocks"] += blocks
            totals["exports"] += 1
            totals["blocks"] += blocks
            if "error" in t:
                totals["failed_compiles"] += 1
                arch["reasons"].append(f"{attention}/{exporter}: compile failed: {t['error']}")
            else:
                fused = min(t.get("fused") or 0, blocks)
                arch["tfgraph"] += fused
                totals["tfgraph"] += fused
                arch["time"] += t.get("time_s") or 0.0
                arch["ops"].update(_short(op) for op in (t.get("fused_ops") or {}))
                if t.get("max_abs") is not None:
                    arch["max_abs"] = max(arch["max_abs"] or 0.0, t["max_abs"])
                    totals["max_abs"] = max(totals["max_abs"], t["max_abs"])
                for item in t.get("unfused_reasons") or []:
                    arch["reasons"].append(f"{attention}/{exporter}: {item.get('reason', item)}")
                if (t.get("unfused") or 0) and not t.get("unfused_reasons"):
                    arch["reasons"].append(f"{attention}/{exporter}: {t['unfused']} unfused (no reason recorded)")
            for peer in ("onnxscript", "ort"):
                p = r.get(peer, {})
                count = min(p.get("fused") or 0, blocks) if "error" not in p else 0
                arch[peer] += count
                totals[peer] += count
        kind = next(iter(ok.values())).get("kind", "")
        rows.append(f"| {model_type} | {kind} | {' '.join(arch['exports'])} | {arch['blocks']} | {arch['tfgraph']} | "
                    f"{arch['onnxscript']} | {arch['ort']} | {_fmt(arch['max_abs'])} | {arch['time']:.0f} | {', '.join(sorted(arch['ops']))} |")
        if arch["tfgraph"] < arch["blocks"]:
            unique = sorted(set(arch["reasons"]))
            below.append(f"- **{model_type}** ({arch['tfgraph']}/{arch['blocks']}): " + "; ".join(unique[:6]))
    pct = lambda n: f"{100.0 * n / totals['blocks']:.1f}%" if totals["blocks"] else "–"  # noqa: E731
    lines = [
        "# Attention-fusion coverage sweep (cpu-fp32)",
        "",
        f"Generated by `benchmarks/coverage_sweep.py` on {datetime.date.today()}: transformers model types built from "
        f"their default configs made small (≤ {LIMITS['layers']} layers, hidden ≤ {LIMITS['hidden']}; random init, seed 0), "
        f"exported with TorchScript (opset 18) and dynamo, eager and SDPA attention where the class has both, batch {BATCH}, "
        f"sequence {SEQ} (images {IMAGE}², 1600 audio samples). Blocks: Softmax attention blocks of the export "
        "(`tfgraph.analysis.attention_blocks`). tfgraph: `tfgraph.compile(path, target=\"cpu-fp32\")` with verification; "
        "onnxscript: `optimize_for_ort`; ORT: `onnxruntime.transformers.optimizer.optimize_model` with the matching "
        "model_type (bert where ORT has none). Max err: largest max-abs difference of the compiled model against the "
        "export on tfgraph's verification inputs. Time: tfgraph compile seconds summed over the exports.",
        "",
        f"**{totals['archs']} architectures, {totals['exports']} exports, {totals['blocks']} softmax attention blocks: "
        f"tfgraph fused {totals['tfgraph']} ({pct(totals['tfgraph'])}), onnxscript {totals['onnxscript']} "
        f"({pct(totals['onnxscript'])}), ORT optimizer {totals['ort']} ({pct(totals['ort'])}); max error "
        f"{totals['max_abs']:.1e}; tfgraph compile failures: {totals['failed_compiles']}.**",
        "",
        "Exports: e/t = eager TorchScript, e/d = eager dynamo, s/t, s/d likewise for SDPA. \"tfgraph ran them as\": "
        "the fused operators after cpu-fp32's lowering (Attention = packed com.microsoft.Attention, MHA = "
        "MultiHeadAttention, GQA = GroupQueryAttention, neutral = tfgraph.AttentionBHSD kept as its exact ONNX body "
        "because no kernel takes the block's layout, e.g. a dynamic batch·heads axis or a broadcast K/V head).",
        "",
        "| architecture | kind | exports | blocks | tfgraph | onnxscript | ORT opt. | max err | time s | tfgraph ran them as |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        "## Below 100% (every unfused block with the fusion rule's reason)",
        "",
        *(below or ["None."]),
        "",
        "## Not in the sweep (no export succeeded, or the config could not be made small)",
        "",
        *[f"- {t}: {e}" for t, e in failures],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
