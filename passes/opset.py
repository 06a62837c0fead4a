"""upgrade-opset: bring the model to at least a given ai.onnx opset (onnx's version converter).

Some execution providers recognize their fused forms only from newer op versions: the QNN EP's
GELU fusion (Div → Erf → Add → Mul into QNN's Gelu) failed validation on an opset-17 8-bit graph and
left each Erf on the CPU EP (QNN has no standalone Erf), while the same graph converted to opset 21
ran entirely on QNN (measured on bert-small, TorchScript export, npu-a8w8). A target asks for the
version it needs; models already at or above it are left alone (``modified`` False).
"""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.passes.quantize import upgrade_opset
from tfgraph.passes.registry import register_pass


@register_pass("upgrade-opset")
class UpgradeOpset(ir.passes.InPlacePass):
    """Convert the model to ai.onnx ``version`` when it imports an older one."""

    def __init__(self, *, version: int):
        super().__init__()
        self.version = int(version)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            changed = upgrade_opset(model, self.version, why="the target")
        except ValueError as e:
            raise BadInputError(str(e)) from None
        return ir.passes.PassResult(model, changed)
