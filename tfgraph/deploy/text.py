"""Text → the model's integer feeds, with the tokenizer an artifact carries (run-time side; no compiler imports).

An artifact compiled from a Hugging Face folder (or the built-in ``minilm``) holds its tokenizer in a
subfolder, and ``manifest.json`` says so::

    "tokenizer": {"path": "tokenizer",          # folder inside the artifact: tokenizer.json (+ configs)
                  "max_length": 512,             # the model's max_position_embeddings, or null
                  "embedding_output": "sentence_embedding"}   # the sentence-embedding output, or null

:class:`TextEncoder` reads ``tokenizer.json`` with the ``tokenizers`` library (not transformers) and
turns a list of texts into ``input_ids``, ``attention_mask`` and (when the model has it)
``token_type_ids``, int64, padded to the longest text. The tokenizer file's own truncation and
padding settings are ignored: a text longer than the model's limit is an error naming the limit,
unless ``truncate=True`` asks for it to be cut.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from tfgraph.errors import BadInputError

TOKENIZER_FILE = "tokenizer.json"
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TextEncoder:
    """Texts → integer feeds for a model whose graph inputs are ``input_names``."""

    def __init__(self, tokenizer, input_names: Sequence[str], *, max_length: int | None = None,
                 embedding_output: str | None = None, pad_id: int | None = None):
        unknown = [n for n in input_names if n not in _KNOWN_INPUTS]
        if unknown or "input_ids" not in input_names:
            raise BadInputError(f"the model's inputs {list(input_names)} cannot all be made from text "
                                f"(text gives {', '.join(_KNOWN_INPUTS)})")
        self.pad_id = _pad_id(tokenizer) if pad_id is None else int(pad_id)
        self.tokenizer = tokenizer
        tokenizer.no_truncation()  # the file's own settings (MiniLM's: pad and cut to 128) are not the model's
        tokenizer.no_padding()
        self.input_names = list(input_names)
        self.max_length = int(max_length) if max_length else None
        self.embedding_output = embedding_output
        self._truncating: dict[int, object] = {}

    @classmethod
    def from_artifact(cls, path, input_names: Sequence[str] | None = None) -> TextEncoder:
        """The artifact's tokenizer; BadInputError (one line) when it has none. ``input_names`` defaults to the model's."""
        encoder = load_tokenizer(path, input_names)
        if encoder is None:
            raise BadInputError(f"{path}: the artifact carries no tokenizer (manifest.json has no 'tokenizer'); "
                                "send token ids, or compile from a Hugging Face folder or minilm")
        return encoder

    def encode(self, texts: Sequence[str], *, max_length: int | None = None, truncate: bool = False) -> dict[str, np.ndarray]:
        """int64 feeds for ``texts``, padded to the longest; over ``max_length`` (default: the model's) is an error unless ``truncate``."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise BadInputError("text must be a list of strings")
        if not texts:
            raise BadInputError("text is an empty list")
        limit = int(max_length) if max_length else self.max_length
        encodings = self.tokenizer.encode_batch(list(texts))
        if limit is not None:
            over = [(i, len(e.ids)) for i, e in enumerate(encodings) if len(e.ids) > limit]
            if over and not truncate:
                i, n = over[0]
                raise BadInputError(f"text {i} is {n} tokens long, over the model's limit of {limit} tokens "
                                    "(shorten it, or ask for truncation)")
            if over:
                cut = self._truncator(limit).encode_batch([texts[i] for i, _ in over])
                for (i, _), e in zip(over, cut):
                    encodings[i] = e
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), width), self.pad_id, np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        types = np.zeros((len(texts), width), np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            types[row, :n] = e.type_ids
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(texts), width)).copy()
        made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}
        return {name: made[name] for name in self.input_names}

    def _truncator(self, limit: int):
        if limit not in self._truncating:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.tokenizer.to_str())
            tok.no_padding()
            tok.enable_truncation(limit)
            self._truncating[limit] = tok
        return self._truncating[limit]


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|padding|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def tokenizer_info(path) -> dict | None:
    """The manifest's ``tokenizer`` entry with its folder resolved (inside the artifact), or None."""
    from tfgraph.deploy.artifact import read_manifest

    path = pathlib.Path(path)
    info = read_manifest(path).get("tokenizer")
    if not info:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("path"), str):
        raise BadInputError(f"{path}: manifest.json 'tokenizer' must be an object with a 'path'")
    folder = (path / info["path"]).resolve()
    if path.resolve() not in (folder, *folder.parents):
        raise BadInputError(f"{path}: the tokenizer path {info['path']!r} leaves the artifact folder")
    if not (folder / TOKENIZER_FILE).is_file():
        raise BadInputError(f"{path}: the manifest names a tokenizer but {info['path']}/{TOKENIZER_FILE} is missing")
    return {**info, "folder": folder}


def load_tokenizer(path, input_names: Sequence[str] | None = None) -> TextEncoder | None:
    """The artifact's :class:`TextEncoder`, or None when it carries no tokenizer."""
    info = tokenizer_info(path)
    if info is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise BadInputError(f"{path}: reading its tokenizer needs the 'tokenizers' package (pip install tokenizers, "
                            "or tfgraph[hf])") from None
    try:
        tokenizer = Tokenizer.from_file(str(info["folder"] / TOKENIZER_FILE))
    except Exception as e:
        raise BadInputError(f"{path}: cannot read {info['path']}/{TOKENIZER_FILE} ({' '.join(str(e).split())[:200]})") from None
    if input_names is None:
        input_names = _graph_inputs(pathlib.Path(path))
    pad_id = None
    config = info["folder"] / "tokenizer_config.json"
    if tokenizer.padding is None and config.is_file():
        try:
            pad = json.loads(config.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        except (ValueError, OSError):
            pad_id = None
    return TextEncoder(tokenizer, input_names, max_length=info.get("max_length"),
                       embedding_output=info.get("embedding_output"), pad_id=pad_id)


def _graph_inputs(path: pathlib.Path) -> list[str]:
    import onnx

    from tfgraph.deploy.artifact import MODEL_FILE

    graph = onnx.load(str(path / MODEL_FILE), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers]
