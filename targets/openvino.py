"""OpenVINO targets (the onnxruntime-ep-openvino plugin execution provider)."""

from __future__ import annotations

TARGETS: tuple = ()
