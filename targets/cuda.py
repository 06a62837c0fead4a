"""CUDA and TensorRT targets (onnxruntime-gpu's CUDA and TensorRT execution providers)."""

from __future__ import annotations

TARGETS: tuple = ()
