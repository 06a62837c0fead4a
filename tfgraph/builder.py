"""The one graph builder of the bottom layer: nodes for a rewrite, recorded on onnx-ir's tape.

Every lowering and decomposition that emits more than a node or two builds with :class:`Builder`
(``passes/decompose.py``, ``passes/blocked_attention.py``, ``passes/attention_lowering*.py``)::

    b = Builder("layer0/attn", nodes)          # records into ``nodes`` (or b.nodes)
    scores = b("MatMul", q, k_t)
    probs = b("Softmax", scores, axis=-1)
    a, c = b("Split", x, b.i64(4, 4), num_outputs=2, axis=-1)
    half = b.scalar(0.5, like=x)                # a Constant of x's element type

Output names are ``<prefix>/<op>_<n>``, ``n`` the position in the node list, so two builders that
share a list never collide. Builders that fill different lists of one graph (the branches of an
``If`` share the main graph's namespace) must use different prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir


class Builder(ir.tape.Tape):
    """onnx-ir's :class:`~onnx_ir.tape.Tape` with named outputs, keyword attributes and deduplicated
    constants. ``nodes``: an existing list to record into (shared with the caller and other
    builders); by default the tape's own."""

    def __init__(self, prefix: str, nodes: list[ir.Node] | None = None):
        super().__init__()
        if nodes is not None:
            self._nodes = nodes  # the tape records into the caller's list
        self.prefix = prefix
        self._constants: dict[tuple, ir.Value] = {}

    @property
    def nodes(self) -> list[ir.Node]:
        return self._nodes

    def __call__(self, op: str, *inputs: ir.Value | None, domain: str = "", num_outputs: int = 1,
                 **attributes) -> ir.Value | tuple[ir.Value, ...]:
        stem = f"{self.prefix}/{op}_{len(self._nodes)}"
        if num_outputs == 1:
            out = self.op(op, list(inputs), attributes or None, domain=domain, name=stem)
            out.name = f"{stem}:0"
            return out
        outs = self.op_multi_out(op, list(inputs), attributes or None, domain=domain, name=stem,
                                 num_outputs=num_outputs)
        for i, value in enumerate(outs):
            value.name = f"{stem}:{i}"
        return tuple(outs)

    def const(self, array) -> ir.Value:
        """A Constant node holding ``array``, made once per value by this builder."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self("Constant", value=ir.tensor(array))
        return self._constants[key]

    def i64(self, *values: int) -> ir.Value:
        """A 1-D int64 constant (shapes, axes, starts/ends)."""
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, value: float, like: ir.Value | None = None) -> ir.Value:
        """A 0-D constant of ``like``'s element type (float32 when unknown)."""
        dtype = like.dtype.numpy() if like is not None and like.dtype is not None else np.float32
        return self.const(np.array(value, dtype=dtype))

    def extend(self, nodes: Sequence[ir.Node]) -> None:
        """Record nodes made elsewhere (e.g. by another helper) in order."""
        self._nodes.extend(nodes)


def take_over(old: Sequence[ir.Value], new: Sequence[ir.Value]) -> None:
    """Each ``new`` value takes the matching ``old`` value's place: its name, shape and type, and every
    use, graph outputs included (the old value is renamed ``<name>/replaced``, for dead-code removal)."""
    old, new = list(old), list(new)
    for before, after in zip(old, new):
        name = before.name
        before.name = f"{name}/replaced"
        after.name, after.shape, after.type = name, before.shape, before.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
