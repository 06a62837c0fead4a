"""NPU-style targets (Qualcomm QNN HTP through the onnxruntime-qnn plugin execution provider)."""

from __future__ import annotations

TARGETS: tuple = ()
