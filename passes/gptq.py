"""gptq: 4-bit (or 8-bit) weight-only MatMuls quantized with GPTQ, as com.microsoft.MatMulNBits.

Round-to-nearest (``quantize-weights-nbits``) rounds every weight on its own. GPTQ (Frantar et al.,
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds
the input columns of ``W`` (K×N) one at a time and spreads each column's rounding error over the
columns not yet rounded, weighted by the inverse Hessian of the layer's reconstruction error
``||X·W − X·Ŵ||²``, ``H = 2·XᵀX / n`` from the calibration activations ``X`` that reach the MatMul.
So the error that matters — on the layer's real inputs — is what is minimised, not the weight error.

* ``damp``: ``damp · mean(diag(H))`` is added to the diagonal (inputs the calibration never
  excites would otherwise make ``H`` singular); raised tenfold until ``H`` is positive definite.
  The default, 0.1, is ten times the paper's: with the few hundred calibration tokens a compile
  gets (22 sentences, 257 tokens, against 1536 inputs of MiniLM's FFN output), 0.01 fits the
  calibration sentences best (error 0.11x round-to-nearest's) but generalises worse: on 22
  held-out sentences 29 of MiniLM's 36 layers beat round-to-nearest (mean 0.84x), against 35 of 36
  (mean 0.59x) with 0.1.
* ``act_order``: columns are processed by decreasing ``diag(H)`` (the most important inputs first,
  while most columns are still free to absorb their error). The scales and zero points then come
  from the original weights per block of ``block_size`` consecutive rows of ``W`` (AutoGPTQ's
  "static groups"), so the layout stays MatMulNBits' contiguous blocks; without it they are taken
  when the block's first column is reached, from the already-updated weights (the paper's way).
* The quantization grid is the one ``quantize-weights-nbits`` uses (``block_grid``): per column and
  block of ``block_size`` along K, asymmetric min/max over ``[0, 2^bits)`` with zero points packed
  like the weights, or ``symmetric`` (no zero points) — so GPTQ and round-to-nearest differ only in
  how levels are chosen.

The Hessians are taken on the float model (one calibration run for every MatMul, not layer by layer
on the partly quantized model). The calibration set comes through the constructor
(``calibration``: an object with ``.batches``, a list of feed dicts), as ``compile`` binds it for
passes that declare ``uses_calibration``, else from the pass context, which also runs the model. ``self.report`` gives, per run, the mean relative
reconstruction error ``tr(ΔWᵀHΔW) / tr(WᵀHW)`` of GPTQ and of round-to-nearest on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.ir import exposed_outputs
from tfgraph.passes.registry import register_pass
from tfgraph.passes.weight_only_quant import (_FLOATS, block_for, block_grid, check_bits, check_block_size,
                                              constant_weight, dequantize_blocks, drop_unused_initializers,
                                              fallback_record, is_lm_head, pack_blocks, quantize_blocks,
                                              swap_in_matmul_nbits)


def _inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) after damping H's diagonal."""
    mean = float(np.mean(np.diag(hessian))) or 1.0
    for attempt in range(6):
        h = hessian + np.eye(len(hessian)) * damp * mean * (10 ** attempt)
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(h))
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, *, bits: int = 4, block_size: int = 32, damp: float = 0.1,
                  act_order: bool = False, lazy_block: int = 128,
                  symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ levels of ``w`` (K, N) given the layer Hessian (K, K): (levels uint8 (N, blocks, block_size),
    scales float32 (N, blocks), zero points uint8 (N, blocks)) on MatMulNBits' grid (see the module)."""
    k, n = w.shape
    qmax = (1 << bits) - 1
    blocks = -(-k // block_size)
    weight = w.T.astype(np.float64).copy()  # (N, K): one row per output, columns along K
    h = np.asarray(hessian, np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    scale = np.ones((n, blocks))
    zero = np.zeros((n, blocks))
    if act_order:
        for b in range(blocks):  # static groups: the grid from the original weights
            scale[:, b], zero[:, b] = block_grid(weight[:, b * block_size:(b + 1) * block_size], bits, symmetric)
        perm = np.argsort(-np.diag(h), kind="stable")
    else:
        perm = np.arange(k)
    weight, h = weight[:, perm], h[np.ix_(perm, perm)]
    upper = _inverse_hessian_factor(h, damp)
    levels = np.zeros((n, k))
    lazy = max(lazy_block // block_size, 1) * block_size  # whole blocks per lazy batch
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        part = weight[:, i1:i2].copy()
        errors = np.zeros_like(part)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = perm[i1 + i]
            b = column // block_size
            if not act_order and column % block_size == 0:
                scale[:, b], zero[:, b] = block_grid(part[:, i:i + block_size], bits, symmetric)
            q = np.clip(np.round(part[:, i] / scale[:, b]) + zero[:, b], 0, qmax)
            levels[:, column] = q
            error = (part[:, i] - (q - zero[:, b]) * scale[:, b]) / u[i, i]
            part[:, i:] -= np.outer(error, u[i, i:])
            errors[:, i] = error
        weight[:, i2:] -= errors @ upper[i1:i2, i2:]
    padded = np.repeat(zero[:, :, None], block_size, axis=2)  # padding rows of the last block hold 0
    padded.reshape(n, -1)[:, :k] = levels
    return padded.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def dequantize(levels: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """The float (K, N) weight that unpacked levels stand for."""
    n = levels.shape[0]
    w = (levels.astype(np.float64) - zero[:, :, None]) * scale[:, :, None]
    return w.reshape(n, -1)[:, :k].T


def reconstruction_error(w: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(ΔWᵀHΔW) / tr(WᵀHW)``: the layer output's squared error on the calibration inputs, relative."""
    w = np.asarray(w, np.float64)
    delta = np.asarray(approx, np.float64) - w
    return float(np.sum((hessian @ delta) * delta) / max(np.sum((hessian @ w) * w), 1e-30))


def rtn_error(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool = False) -> float:
    """The same error for round-to-nearest on the same grid (``quantize-weights-nbits``)."""
    q, s, z = quantize_blocks(w.astype(np.float32), bits, block_size, symmetric)
    return reconstruction_error(w, dequantize_blocks(q, s, z, w.shape[0], bits, block_size), hessian)


@register_pass("gptq")
class GPTQ(ir.passes.InPlacePass):
    """MatMul with a constant 2-D weight → com.microsoft.MatMulNBits, levels chosen by GPTQ (see the module)."""

    changes_outputs = True
    uses_calibration = True
    keeps_fallbacks = True  # as quantize-weights-nbits: fallback_bits, record_fallbacks

    def __init__(self, *, bits: int = 4, block_size: int = 32, damp: float = 0.1, act_order: bool = False,
                 min_elements: int = 0, accuracy_level: int = 0, exclude_nodes: Sequence[str] = (),
                 head_bits: int | None = None, symmetric: bool = False, fallback_bits: int = 8,
                 record_fallbacks: bool = False, block_size_8bit: int | None = None, calibration: Any = None,
                 progress=None):
        super().__init__()
        check_bits(bits, head_bits)
        check_bits(fallback_bits, None)
        check_block_size(block_size, block_size_8bit)
        self.block_size_8bit = block_size_8bit  # as quantize-weights-nbits
        self.symmetric, self.fallback_bits, self.record_fallbacks = symmetric, fallback_bits, record_fallbacks
        self.quantized: dict[str, dict] = {}
        self.head_bits = head_bits  # the LM head's bits (is_lm_head); None: ``bits``
        if not 0 < damp < 1:
            raise ValueError(f"damp must be in (0, 1), not {damp}")
        self.bits, self.block_size, self.damp, self.act_order = bits, block_size, damp, act_order
        self.min_elements, self.accuracy_level = min_elements, accuracy_level
        self.exclude_nodes = set(exclude_nodes)
        self.calibration, self.progress = calibration, progress
        self.report: dict = {}

    def _targets(self, graph: ir.Graph) -> list[ir.Node]:
        out = []
        for node in graph:
            if node.op_type != "MatMul" or node.domain != "" or node.name in self.exclude_nodes:
                continue
            x, w = node.inputs
            weight = constant_weight(w)
            if x is None or weight is None or x.dtype not in _FLOATS or weight.size < self.min_elements:
                continue
            out.append(node)
        return out

    def hessians(self, model: ir.Model, values: list[ir.Value]) -> dict[str, np.ndarray]:
        """``2·XᵀX / n`` for each activation in ``values`` over every calibration batch. Model runs and
        (when the constructor got none) the calibration set come from the pass context."""
        from tfgraph.passes.context import current

        ctx = current()
        calibration = self.calibration if self.calibration is not None else ctx.calibration
        if calibration is None:
            raise ValueError("gptq needs calibration data (compile binds it: --calibration, else the verification "
                             "or generated inputs)")
        if not hasattr(calibration, "batches"):  # arrays, a dict or an .npz path: the context loads them
            calibration = ctx.need("load_calibration", "gptq")(calibration, model)
        run = ctx.need("run", "gptq")
        graph = model.graph
        computed = [v for v in values if not v.is_graph_input()]
        names = [v.name for v in values]
        sums: dict[str, np.ndarray] = {}
        counts = dict.fromkeys(names, 0)
        with exposed_outputs(model, computed):
            for batch in calibration.batches:
                found = run(model, {v.name: batch[v.name] for v in graph.inputs})
                for name in names:
                    x = np.asarray(found[name] if name in found else batch[name], np.float64)
                    x = x.reshape(-1, x.shape[-1])
                    sums[name] = sums.get(name, 0) + x.T @ x
                    counts[name] += x.shape[0]
        return {name: 2.0 * sums[name] / max(counts[name], 1) for name in names}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = self._targets(graph)
        if not nodes:
            self.report = {"quantized": 0}
            return ir.passes.PassResult(model, False)
        activations = list({id(n.inputs[0]): n.inputs[0] for n in nodes}.values())
        hessians = self.hessians(model, activations)
        errors, baseline = {}, {}
        for index, node in enumerate(nodes):
            if self.progress:
                self.progress("gptq", index, len(nodes))
            x, w = node.inputs
            weight = constant_weight(w).astype(np.float64)
            k, n = weight.shape
            hessian = hessians[x.name]
            bits = self.head_bits if self.head_bits and is_lm_head(graph, node) else self.bits
            block = block_for(bits, self.bits, self.block_size, self.block_size_8bit)
            levels, scale, zero = gptq_quantize(weight, hessian, bits=bits, block_size=block,
                                                damp=self.damp, act_order=self.act_order, symmetric=self.symmetric)
            errors[node.name] = reconstruction_error(weight, dequantize(levels, scale, zero, k), hessian)
            baseline[node.name] = rtn_error(weight, hessian, bits, block, self.symmetric)
            packed, zero_points = pack_blocks(levels, zero, bits)
            if self.symmetric:
                zero_points = None  # MatMulNBits' implied 2^(bits-1), which block_grid used
            if self.record_fallbacks and node.name and self.fallback_bits > bits:
                self.quantized[node.name] = fallback_record(
                    node, weight.astype(np.float32), bits=self.fallback_bits,
                    block_size=block_for(self.fallback_bits, self.bits, self.block_size, self.block_size_8bit),
                    accuracy_level=self.accuracy_level, symmetric=self.symmetric)
            swap_in_matmul_nbits(graph, node, packed, scale.reshape(-1), zero_points, bits=bits,
                                 block_size=block, accuracy_level=self.accuracy_level)
        drop_unused_initializers(graph)
        model.opset_imports.setdefault("com.microsoft", 1)
        better = sum(errors[k] < baseline[k] for k in errors)
        self.report = {"bits": self.bits, "head_bits": self.head_bits or self.bits, "block_size": self.block_size,
                       "block_size_8bit": block_for(8, self.bits, self.block_size, self.block_size_8bit),
                       "act_order": self.act_order, "symmetric": self.symmetric,
                       "damp": self.damp, "quantized": len(errors),
                       "mean_reconstruction_error": float(np.mean(list(errors.values()))),
                       "mean_reconstruction_error_rtn": float(np.mean(list(baseline.values()))),
                       "layers_better_than_rtn": int(better)}
        return ir.passes.PassResult(model, True)
