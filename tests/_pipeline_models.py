"""Shared (per test session) small models for the pipeline tests: exported unfused and compiled fused."""

from __future__ import annotations

import pathlib
import threading

_CACHE: dict[str, pathlib.Path] = {}
_LOCK = threading.Lock()


def model_path(tmp_path_factory, name: str, fused: bool) -> pathlib.Path:
    """``name`` (a built-in) exported with the dynamo exporter (unfused attention) or compiled for cpu-fp32
    (fused com.microsoft Attention): an .onnx file or an artifact folder."""
    import tfgraph
    from tfgraph.compiler.export import export

    key = f"{name}-{'fused' if fused else 'raw'}"
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        root = tmp_path_factory.getbasetemp() / "pipeline-models"
        root.mkdir(exist_ok=True)
        raw = root / f"{name}.onnx"
        if not raw.exists():
            export(name, raw)
        _CACHE[f"{name}-raw"] = raw
        if fused:
            out = root / f"{name}-compiled"
            tfgraph.compile(raw, output=out, verify=False)
            _CACHE[key] = out
        return _CACHE[key]
