"""What a deployment needs beside the model: the tokenizer, the model's config and its generation config, carried from a
Hugging Face folder (or the bundled MiniLM) into the artifact, so that ``tfgraph.deploy.text`` and
``tfgraph serve`` can turn text into the model's inputs without the original folder."""

from __future__ import annotations

import json
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

TOKENIZER_DIR = "tokenizer"
CONFIG_FILE = "config.json"
# Decoding defaults (eos/pad/bos token ids, sampling settings) that `tfgraph generate` reads.
GENERATION_CONFIG_FILE = "generation_config.json"
# Files of a Hugging Face tokenizer folder; tokenizer.json (the fast tokenizer) is the one tfgraph.deploy.text reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
EMBEDDING_OUTPUTS = ("sentence_embedding", "sentence_embeddings", "embeddings", "pooler_output")


def deployment_files(folder: str | pathlib.Path | None, model: ir.Model, scratch: pathlib.Path) -> tuple[dict, dict | None, list[str]]:
    """For a Hugging Face ``folder``: (files to put in the artifact, relative name → contents;
    the manifest's ``tokenizer`` section or None; notes for the manifest). A folder with only a slow tokenizer
    gets its ``tokenizer.json`` written by transformers into ``scratch``."""
    if folder is None:
        return {}, None, []
    folder = pathlib.Path(folder)
    files: dict[str, pathlib.Path] = {}
    config: Mapping[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        files[CONFIG_FILE] = folder / CONFIG_FILE
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except ValueError:
            config = {}
    if (folder / GENERATION_CONFIG_FILE).is_file():
        files[GENERATION_CONFIG_FILE] = folder / GENERATION_CONFIG_FILE
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            files[f"{TOKENIZER_DIR}/{name}"] = folder / name
    notes = []
    if f"{TOKENIZER_DIR}/tokenizer.json" not in files:
        made = _fast_tokenizer(folder, scratch)
        if made is not None:
            files[f"{TOKENIZER_DIR}/tokenizer.json"] = made
        else:
            notes.append(f"{folder} has no tokenizer tfgraph can carry (no tokenizer.json, and transformers could not "
                            "make one): the artifact takes token ids only")
            return {k: v.read_bytes() for k, v in files.items() if not k.startswith(TOKENIZER_DIR)}, None, notes
    outputs = [v.name for v in model.graph.outputs]
    max_length = config.get("max_position_embeddings") or config.get("n_positions")
    section = {
        "path": TOKENIZER_DIR,
        "files": sorted(k.split("/", 1)[1] for k in files if k.startswith(TOKENIZER_DIR)),
        "max_length": int(max_length) if isinstance(max_length, int) else None,
        "embedding_output": next((name for name in EMBEDDING_OUTPUTS if name in outputs), None),
        "config": CONFIG_FILE if CONFIG_FILE in files else None,
    }
    return {name: path.read_bytes() for name, path in files.items()}, section, notes


def _fast_tokenizer(folder: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path | None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
        out = pathlib.Path(tempfile.mkdtemp(dir=scratch))
        tokenizer.save_pretrained(str(out))
    except Exception:  # noqa: BLE001 - no tokenizer to carry: reported as a warning
        return None
    made = out / "tokenizer.json"
    return made if made.is_file() else None
