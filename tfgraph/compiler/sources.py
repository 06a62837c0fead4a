"""Where a compile's model comes from: a file, a built-in name, a Hugging Face folder or an
artifact folder (exported first where needed), and the facts about it the manifest records."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import onnx
import onnx_ir as ir

from tfgraph import ir as tir
from tfgraph._version import __version__
from tfgraph.errors import BadInputError
from tfgraph.passes.registry import PassSpec

Progress = Callable[[str, int, int], None]


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "tfgraph": __version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def resolve_model(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    stack: contextlib.ExitStack,
    *,
    exporter: str = "dynamo",
    export_batch: int = 2,
    export_seq: int = 16,
    attention: str | None = None,
    progress: Progress | None = None,
    task: str | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Turn what the user gave into an onnx_ir model plus a description of its source for the manifest."""
    if isinstance(model, ir.Model):
        return model, {"source": "onnx_ir.Model", "sha256": None}
    if isinstance(model, onnx.ModelProto):
        import hashlib

        data = model.SerializeToString()
        return ir.serde.deserialize_model(model), {"source": "onnx.ModelProto", "sha256": hashlib.sha256(data).hexdigest()}
    path = pathlib.Path(model)
    from tfgraph import models as builtin

    looks_like_file = path.suffix == ".onnx" or path.exists() or os.sep in str(model)
    if path.is_dir() and builtin.is_hf_dir(path):
        source = {"source": str(path), "kind": "huggingface"}
    elif path.is_dir() and (path / "manifest.json").is_file() and (path / "model.onnx").is_file():
        loaded = tir.load(path / "model.onnx")  # a tfgraph artifact: its model
        return loaded.model, {**loaded.input_hashes(), "artifact": str(path)}
    elif path.is_dir():
        found = sorted(p.name for p in path.iterdir())[:6]
        raise BadInputError(
            f"{path}: is a directory but not a model: no config.json with weights (model.safetensors / pytorch_model.bin) "
            f"for a Hugging Face checkpoint, and no model.onnx + manifest.json of a tfgraph artifact "
            f"({'it holds ' + ', '.join(found) if found else 'it is empty'}); give an .onnx file or such a folder"
        )
    elif looks_like_file:
        loaded = tir.load(path)
        found = loaded.input_hashes()
        if hf_folder_of(path) is not None:  # Optimum's layout: the export beside its config and tokenizer
            found["hf_files"] = str(path.parent)
        return loaded.model, found
    elif str(model) in builtin.list_models():
        source = {"source": str(model), "kind": "builtin"}
    else:
        raise BadInputError(
            f"'{model}' is neither a model file nor a built-in model; built-in models: {', '.join(builtin.list_models())}"
        )
    from tfgraph.compiler.export import export

    tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tfgraph-export-")))
    if progress:
        progress(f"export {model} ({exporter})", 0, 1)
    onnx_path = export(
        str(model), tmp / "model.onnx", exporter=exporter, batch=export_batch, seq=export_seq, attention=attention,
        task=task,
    )
    if progress:
        progress(f"export {model} ({exporter})", 1, 1)
    loaded = tir.load(onnx_path)
    source.update({"exporter": exporter, "attention": attention, "export_shape": {"batch": export_batch, "sequence": export_seq}})
    source.update({"sha256": loaded.input_hashes()["sha256"]})
    return loaded.model, source


APPROXIMATION_PASS = "approximate-attention-window"


def with_window_approximation(pipeline: list, spec: str, target_name: str) -> list:
    """Insert the (opt-in) attention window approximation right after mask classification."""
    from tfgraph.passes.attention_window_approximation import parse_window_spec

    options = parse_window_spec(spec)
    names = [item.name if isinstance(item, PassSpec) else getattr(item, "pass_name", "") for item in pipeline]
    anchor = "classify-attention-masks"
    if anchor not in names:
        raise BadInputError(
            f"--attention {spec}: target '{target_name}' does not fuse and classify attention, so it cannot window it"
        )
    at = names.index(anchor) + 1
    phase = getattr(pipeline[at - 1], "phase", "")  # the anchor's (fuse)
    return pipeline[:at] + [PassSpec(APPROXIMATION_PASS, options, phase)] + pipeline[at:]


def hf_folder_of(path: pathlib.Path) -> pathlib.Path | None:
    """The folder of an ``.onnx`` file when it also holds a Hugging Face ``config.json`` (a ``model_type``): how
    Optimum and onnxruntime-genai's builder lay an export out, with the tokenizer and generation config beside it."""
    config = path.parent / "config.json"
    try:
        return path.parent if config.is_file() and "model_type" in json.loads(config.read_text()) else None
    except (OSError, ValueError, TypeError):
        return None


def hf_files(source: Mapping[str, Any]) -> str | None:
    """The Hugging Face folder whose config, generation config and tokenizer go with the model: the checkpoint
    compiled, or the folder an ``.onnx`` was found in beside them."""
    if source.get("kind") == "huggingface":
        return source["source"]
    return source.get("hf_files")


def tokenizer_dir(source: Mapping[str, Any]) -> str | None:
    folder = hf_files(source)
    if folder is not None:
        return folder
    if source.get("kind") == "builtin" and source.get("source") == "minilm":
        from tfgraph.models import minilm_path

        return str(minilm_path())
    return None
