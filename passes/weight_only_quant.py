"""quantize-weights-nbits: block-wise weight-only integer MatMuls (com.microsoft.MatMulNBits).

GPU inference of Transformers at small batch is bound by reading weights, not by arithmetic;
onnxruntime's CUDA EP runs static Q/DQ int8 graphs no faster than fp16 (it has no fused int8
GEMM for them: only TensorRT builds those), but its ``MatMulNBits`` kernel reads 8- or 4-bit
weights and dequantizes them inside the GEMM. This pass turns ``MatMul(x, W)`` with a constant
2-D ``W`` (K×N) into ``MatMulNBits(x, B, scales, zero_points)``: each column of ``W`` cut into
blocks of ``block_size`` along K, each block with its own scale and zero point (asymmetric, the
full [0, 2^bits) range), ``scales`` in the activation's float type (run it after float16
conversion for fp16 graphs). The activations stay float: no calibration is needed. Each node's
relative weight error is recorded in ``self.report``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from tfgraph.passes.quantize import _initializer, drop_unused_initializers
from tfgraph.passes.registry import register_pass

_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def constant_weight(w: ir.Value | None) -> np.ndarray | None:
    """A MatMul's constant 2-D weight (K, N): an initializer or Constant, or the transpose of one — a tied
    LM head reads the (vocabulary, hidden) embedding table through ``Transpose`` (folding it would store
    the table twice)."""
    if w is None:
        return None
    tensor = ir.convenience.get_const_tensor(w)
    if tensor is not None:
        array = tensor.numpy()
        return array if array.ndim == 2 else None
    node = w.producer()
    if node is None or node.op_type != "Transpose" or node.domain != "" or len(node.inputs) != 1:
        return None
    perm = node.attributes.get_ints("perm")
    source = ir.convenience.get_const_tensor(node.inputs[0])
    if source is None or source.numpy().ndim != 2 or perm not in (None, [1, 0], (1, 0)):
        return None
    return source.numpy().T


def is_lm_head(graph: ir.Graph, node: ir.Node) -> bool:
    """A MatMul that computes a graph output (a causal LM's logits) or reads an embedding table (a Gather's
    data) through Transpose (a tied head): the layer whose error reaches every token's distribution."""
    if node.outputs[0] in graph.outputs:
        return True
    transpose = node.inputs[1].producer() if node.inputs[1] is not None else None
    if transpose is None or transpose.op_type != "Transpose":
        return False
    return any(user.op_type == "Gather" and index == 0 for user, index in transpose.inputs[0].uses())


def check_block_size(block_size: int, block_size_8bit: int | None = None) -> None:
    for name, value in (("block_size", block_size), ("block_size_8bit", block_size_8bit)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two ≥ 16, not {value}")


def block_for(bits: int, base_bits: int, block_size: int, block_size_8bit: int | None) -> int:
    """The block of a MatMul stored at ``bits`` by a pass quantizing at ``base_bits``: ``block_size_8bit`` for
    the 8-bit exceptions (head, fallbacks) of a 4-bit pass when given, else ``block_size``."""
    return block_size_8bit if bits == 8 and base_bits != 8 and block_size_8bit else block_size


def check_bits(bits: int, head_bits: int | None) -> None:
    for name, value in (("bits", bits), ("head_bits", head_bits)):
        if value is not None and value not in (4, 8):
            raise ValueError(f"{name} must be 4 or 8, not {value}")


def block_grid(cols: np.ndarray, bits: int, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of ``cols`` (..., width): a level ``q`` in ``[0, 2^bits)`` stands for
    ``(q - zero) · scale``. Asymmetric: min/max with 0 kept in range. Symmetric: the zero point is MatMulNBits'
    implied one, ``2^(bits-1)``, and the scale carries the sign of the block's largest-magnitude weight, which
    lands exactly on the level ``0`` (``-2^(bits-1)`` after the zero point): the full negative half of the
    range serves the block's extreme, whatever its sign (as onnxruntime's own block quantizer does)."""
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        extreme = np.take_along_axis(cols, np.abs(cols).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        scale = extreme / -mid
        scale[scale == 0] = 1.0
        return scale, np.full(scale.shape, float(mid))
    lo = np.minimum(cols.min(axis=-1), 0.0)
    hi = np.maximum(cols.max(axis=-1), 0.0)
    scale = (hi - lo) / qmax
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-lo / scale), 0, qmax)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int,
                    symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``w`` (K, N) → (B uint8 (N, blocks, block_size·bits/8), scales float32 (N·blocks), zero points uint8,
    None when ``symmetric``: MatMulNBits then implies ``2^(bits-1)``) on :func:`block_grid`'s grid.

    Zero points are packed like B (two 4-bit values per byte for bits=4, low nibble first)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    cols = padded.T.reshape(n, blocks, block_size)
    scale, zero = block_grid(cols, bits, symmetric)
    q = np.clip(np.round(cols / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1).astype(np.uint8)
    q, packed_zero = pack_blocks(q, zero.astype(np.uint8), bits)
    return q, scale.astype(np.float32).reshape(-1), None if symmetric else packed_zero


def pack_blocks(q: np.ndarray, zero: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels (N, blocks, block_size) and zero points (N, blocks) in MatMulNBits' layout: for
    bits=4 two values per byte, low nibble first (zero points padded to whole bytes per column)."""
    n, blocks = q.shape[0], q.shape[1]
    q, zero = q.astype(np.uint8), zero.astype(np.uint8).reshape(n, blocks)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        if blocks % 2:
            zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
        zero = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return q, zero.reshape(-1)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, k: int, bits: int,
                      block_size: int) -> np.ndarray:
    """The float (K, N) weight that ``quantize_blocks``'s output stands for (the reference for tests)."""
    n, blocks = q.shape[0], q.shape[1]
    if bits == 4:
        q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(n, blocks, block_size)
        if zero is not None:
            zero = np.stack([zero.reshape(n, -1) & 0xF, zero.reshape(n, -1) >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    if zero is None:  # symmetric: MatMulNBits' implied zero point
        zero = np.full((n, blocks), 1 << (bits - 1))
    w = (q.astype(np.float32) - zero.reshape(n, blocks, 1)) * scale.reshape(n, blocks, 1)
    return w.reshape(n, blocks * block_size)[:, :k].T


def swap_in_matmul_nbits(graph: ir.Graph, node: ir.Node, packed: np.ndarray, scales: np.ndarray,
                         zero_points: np.ndarray | None, *, bits: int, block_size: int, accuracy_level: int) -> ir.Node:
    """Replace the MatMul ``node`` (activations @ a constant (K, N) weight) by com.microsoft.MatMulNBits
    on the weight's ``packed`` blocks, ``scales`` and ``zero_points`` (None: symmetric, no input);
    consumers and the output's name move to the new node."""
    x, w = node.inputs
    k, n = constant_weight(w).shape
    stem = (w.name or node.name or "w").replace("/", "_")
    inputs = [x, _initializer(graph, f"{stem}_q{bits}", packed),
              _initializer(graph, f"{stem}_scales", scales.astype(_FLOATS[x.dtype]))]
    if zero_points is not None:
        inputs.append(_initializer(graph, f"{stem}_zero_points", zero_points))
    new = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=node.name, attributes={
        "K": k, "N": n, "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level})
    new.outputs[0].dtype, new.outputs[0].shape = node.outputs[0].dtype or x.dtype, node.outputs[0].shape
    graph.insert_before(node, new)
    node.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    name = node.outputs[0].name
    graph.remove(node, safe=True)
    new.outputs[0].name = name
    transpose = w.producer()
    if transpose is not None and transpose.graph is graph and not w.uses() and not w.is_graph_output():
        graph.remove(transpose, safe=True)  # a tied head's Transpose of the embedding table
    return new


def fallback_record(node: ir.Node, weight: np.ndarray, *, bits: int, block_size: int, accuracy_level: int,
                    symmetric: bool) -> dict:
    """How the max-drop loop (tfgraph.compiler.precision.revert_nodes) rebuilds the MatMul ``node`` (not yet
    swapped) at ``bits``: one MatMulNBits on round-to-nearest levels, its arrays held here until then."""
    x, out_name = node.inputs[0], node.outputs[0].name
    k, n = weight.shape
    q, scale, zero = quantize_blocks(weight, bits, block_size, symmetric)
    stem = f"{(node.name or out_name).replace('/', '_')}_fallback{bits}"
    weights = {f"{stem}_q{bits}": q, f"{stem}_scales": scale.astype(_FLOATS[x.dtype])}
    if zero is not None:
        weights[f"{stem}_zero_points"] = zero
    attributes = {name: ir.AttrInt64(name, value) for name, value in
                  (("K", k), ("N", n), ("bits", bits), ("block_size", block_size), ("accuracy_level", accuracy_level))}
    return {"nodes": [{"op_type": "MatMulNBits", "domain": "com.microsoft", "inputs": [x.name, *weights],
                       "attributes": attributes, "output": out_name}],
            "weights": weights, "output": out_name, "revert_to": f"{bits}-bit weights (MatMulNBits)"}


@register_pass("quantize-weights-nbits")
class QuantizeWeightsNBits(ir.passes.InPlacePass):
    """MatMul with a constant 2-D weight → com.microsoft.MatMulNBits (block-wise int weights, float activations).

    ``symmetric``: no zero points (MatMulNBits implies ``2^(bits-1)``; see :func:`block_grid`).
    ``block_size_8bit``: the block of the MatMuls stored at 8 bits while ``bits`` is 4 (the LM head at
    ``head_bits=8``, the max-drop loop's fallbacks); None: ``block_size``. onnxruntime's CPU MatMulNBits runs
    8-bit blocks of 32 far slower than blocks of 128 (see targets/cpu.py), and at 8 bits the block size
    barely changes the error.
    ``fallback_bits`` / ``record_fallbacks``: with ``record_fallbacks`` (compile sets it when an accuracy
    budget applies), ``self.quantized`` holds, per quantized node, how to rebuild it at ``fallback_bits``:
    the max-drop loop re-quantizes the layers that cost the most accuracy that way."""

    changes_outputs = True
    keeps_fallbacks = True  # compile's precision phase binds it and sets record_fallbacks

    def __init__(self, *, bits: int = 8, block_size: int = 32, min_elements: int = 4096,
                 exclude_nodes: Sequence[str] = (), accuracy_level: int = 0, head_bits: int | None = None,
                 symmetric: bool = False, fallback_bits: int = 8, record_fallbacks: bool = False,
                 block_size_8bit: int | None = None):
        super().__init__()
        check_bits(bits, head_bits)
        check_bits(fallback_bits, None)
        self.head_bits = head_bits  # the LM head's bits (is_lm_head); None: ``bits``
        check_block_size(block_size, block_size_8bit)
        self.block_size_8bit = block_size_8bit
        self.bits, self.block_size, self.min_elements = bits, block_size, min_elements
        self.exclude_nodes = set(exclude_nodes)
        self.accuracy_level = accuracy_level
        self.symmetric, self.fallback_bits, self.record_fallbacks = symmetric, fallback_bits, record_fallbacks
        self.report: dict = {}
        self.quantized: dict[str, dict] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done: dict[str, float] = {}
        skipped: dict[str, int] = {}
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "" or node.name in self.exclude_nodes:
                continue
            x, w = node.inputs
            why = self._unfit(x, w)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            weight = constant_weight(w).astype(np.float32)
            k, n = weight.shape
            bits = self.head_bits if self.head_bits and is_lm_head(graph, node) else self.bits
            block = self._block(bits)
            q, scale, zero = quantize_blocks(weight, bits, block, self.symmetric)
            approx = dequantize_blocks(q, scale, zero, k, bits, block)
            out_name = node.outputs[0].name
            if self.record_fallbacks and node.name and self.fallback_bits > bits:
                self.quantized[node.name] = fallback_record(
                    node, weight, bits=self.fallback_bits, block_size=self._block(self.fallback_bits),
                    accuracy_level=self.accuracy_level, symmetric=self.symmetric)
            swap_in_matmul_nbits(graph, node, q, scale, zero, bits=bits, block_size=block,
                                 accuracy_level=self.accuracy_level)
            done[node.name or out_name] = float(np.linalg.norm(approx - weight) / max(np.linalg.norm(weight), 1e-30))
        drop_unused_initializers(graph)
        if done:
            model.opset_imports.setdefault("com.microsoft", 1)
        self.report = {"bits": self.bits, "head_bits": self.head_bits or self.bits, "block_size": self.block_size,
                       "block_size_8bit": self._block(8), "symmetric": self.symmetric, "quantized": len(done),
                       "max_relative_weight_error": max(done.values(), default=0.0), "skipped": skipped}
        return ir.passes.PassResult(model, bool(done))

    def _block(self, bits: int) -> int:
        return block_for(bits, self.bits, self.block_size, self.block_size_8bit)

    def _unfit(self, x: ir.Value | None, w: ir.Value | None) -> str | None:
        weight = constant_weight(w)
        if x is None or weight is None:
            return "weight not a constant 2-D tensor (or its transpose)"
        if x.dtype not in _FLOATS:
            return f"activation type {x.dtype}"
        if weight.size < self.min_elements:
            return "weight too small"
        return None

