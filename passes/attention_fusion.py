"""Attention → ``tfgraph.Attention``: one rule for the forms exporters produce.

The rule anchors on the whole multi-head block, from the three projected inputs in
``(batch, sequence, hidden)`` layout to the merged output:

    Q = Transpose(Reshape(q_in), 0,2,1,3)          V = Transpose(Reshape(v_in), 0,2,1,3)
    Kᵀ = one of: Transpose(Reshape(k_in), 0,2,3,1)                       (TorchScript, eager)
                 Transpose(Transpose(Reshape(k_in), 0,2,1,3), 0,1,3,2)   (unmerged transposes)
                 Reshape(Transpose(Reshape(Transpose(Reshape(k_in))), 0,2,1)) (dynamo SDPA: 3-D swap)
    S = MatMul(Q·[scale], Kᵀ·[scale]) · [scale]    (a scale on Q, on K, on the scores, or split)
    S = S + bias                                   (optional: padding / causal / additive mask)
    P = Softmax(S) [→ Where(IsNaN(P), 0, P)]       (optional NaN guard of transformers' SDPA)
    out = Reshape(Transpose(MatMul(P, V), 0,2,1,3))

Heads and head size are read from inferred shapes; where a Reshape used ``-1`` for the
head count (TorchScript exports of transformers' models), it is recovered by cancelling
the dimensions the Reshape keeps. The mask stays the exporter's own additive tensor, so
padding, causal and arbitrary biases are preserved exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from tfgraph import ops
from tfgraph.passes import attention_softmax
from tfgraph.passes.registry import register_pass
from tfgraph.passes.rules import RuleSetPass

_SCALINGS = ("Mul", "Div", "None")


def _scaled(op, value, scale, tag: str):
    return pattern.OrValue(
        [op.Mul(value, scale), op.Div(value, scale), value], tag_var=tag, tag_values=list(_SCALINGS)
    )


def _probs(op, q, k_t, q_scale, k_scale, s_scale, bias, nan_fill, mask_cond, mask_fill):
    """The shared middle of both rules: scaled scores, optional ``Where(mask, scores, fill)``
    (GPT-Neo's eager attention), optional bias, Softmax, optional NaN guard."""
    scores = op.MatMul(_scaled(op, q, q_scale, "q_scaling"), _scaled(op, k_t, k_scale, "k_scaling"))
    scores = _scaled(op, scores, s_scale, "s_scaling")
    scores = pattern.OrValue(
        [op.Where(mask_cond, scores, mask_fill), scores], tag_var="where_mask", tag_values=[True, False]
    )
    scores = pattern.OrValue([op.Add(scores, bias), scores], tag_var="has_bias", tag_values=[True, False])
    probs = op.Softmax(scores, axis=-1)
    return pattern.OrValue(
        [op.Where(op.IsNaN(probs), nan_fill, probs), probs], tag_var="nan_guard", tag_values=[True, False]
    )


def _check_probs(bindings: dict, result: pattern.MatchResult) -> float | None:
    """Checks of the shared middle; returns the combined scale, or None after recording the failure."""
    scale = 1.0
    for tag, var in (("q_scaling", "q_scale"), ("k_scaling", "k_scale"), ("s_scaling", "s_scale")):
        kind = bindings.get(tag, "None")
        if kind == "None":
            continue
        factor = _scalar(bindings.get(var))
        if factor is None or factor == 0.0:
            result.fail(f"{var} is not a constant non-zero scalar", bindings.get(var))
            return None
        scale *= factor if kind == "Mul" else 1.0 / factor
    if bindings.get("nan_guard") and _scalar(bindings.get("nan_fill")) != 0.0:
        result.fail("the NaN guard after Softmax does not fill with 0", bindings.get("nan_fill"))
        return None
    if bindings.get("where_mask"):
        fill = _scalar(bindings.get("mask_fill"))
        if fill is None or fill > MASK_FILL_LIMIT:
            result.fail(f"Where(mask, scores, fill) with a fill that is not a constant <= {MASK_FILL_LIMIT:g}",
                        bindings.get("mask_fill"))
            return None
    bias = bindings.get("bias")
    if bindings.get("has_bias") and (bias.shape is None or len(bias.shape) > 4):
        result.fail("attention bias rank is unknown or above 4", bias)
        return None
    return scale


# Where(mask, scores, fill) equals scores + Where(mask, 0, fill) after Softmax when the fill
# is this low: fill + score rounds to about fill, and exp of either is 0.
MASK_FILL_LIMIT = -1e4


def _mask_bias(op, like: ir.Value, bias, has_bias: bool, where_mask: bool, mask_cond=None, mask_fill=None):
    """The fused op's additive bias: the exporter's bias, plus ``Where(mask, 0, fill)`` for a Where mask."""
    if where_mask:
        dtype = mask_fill.dtype.numpy() if mask_fill.dtype is not None else np.float32
        zero = op.Constant(value=ir.tensor(np.array(0, dtype=dtype)))
        from_where = op.Where(mask_cond, zero, mask_fill)
        return (op.Add(from_where, bias) if has_bias else from_where), "bias"
    if has_bias:
        return bias, "bias"
    return _zero_bias(op, like), "none"


def _zero_bias(op, like: ir.Value):
    dtype = like.dtype.numpy() if like.dtype is not None else np.float32
    return op.Constant(value=ir.tensor(np.array(0, dtype=dtype)))


def _split_heads_dims(inp: ir.Value, out: ir.Value) -> tuple[int, int] | None:
    """``(heads, head_size)`` of ``Reshape(inp) -> out`` with ``out`` rank 4 (batch, seq, heads, size).

    Static dims are used directly; one unknown dim is recovered from the element count
    when the other dims of ``out`` cancel against dims of ``inp``.
    """
    if out.shape is None or inp.shape is None or len(out.shape) != 4:
        return None
    dims = list(out.shape)
    unknown = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if not unknown or unknown == [0, 1]:
        heads, size = dims[2], dims[3]
        return (heads, size) if isinstance(heads, int) and isinstance(size, int) else None
    # Cancel dims shared by input and output (same symbol or same value), then solve the unknown one.
    remaining_in = list(inp.shape)
    missing = []
    known_out = 1
    for i, d in enumerate(dims):
        if d in remaining_in:
            remaining_in.remove(d)
        elif isinstance(d, int):
            known_out *= d
        else:
            missing.append(i)
    if len(missing) != 1 or not all(isinstance(d, int) for d in remaining_in):
        return None
    total = math.prod(remaining_in)
    if known_out == 0 or total % known_out:
        return None
    dims[missing[0]] = total // known_out
    heads, size = dims[2], dims[3]
    return (heads, size) if isinstance(heads, int) and isinstance(size, int) else None


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(np.asarray(value.const_value.numpy()).reshape(()))


class AttentionFusion(pattern.RewriteRuleClassBase):
    """Multi-head attention block → ``tfgraph.Attention`` (see the module docstring)."""

    def __init__(self):
        super().__init__(name="attention")
        self._heads = 0
        self._scale = 1.0
        self._reshape_after = False

    def pattern(self, op, q_in, k_in, v_in, q_shape, k_shape, v_shape, out_shape, k3_shape, k4_shape,
                q_scale, k_scale, s_scale, bias, nan_fill, mask_cond, mask_fill):
        q = op.Transpose(op.Reshape(q_in, q_shape, _outputs=["q_4d"]), perm=[0, 2, 1, 3])
        k_4d = op.Reshape(k_in, k_shape, _outputs=["k_4d"])
        k_bhsd = op.Transpose(k_4d, perm=[0, 2, 1, 3])
        k_t = pattern.OrValue(
            [
                op.Transpose(k_4d, perm=[0, 2, 3, 1]),
                op.Transpose(k_bhsd, perm=[0, 1, 3, 2]),
                op.Reshape(op.Transpose(op.Reshape(k_bhsd, k3_shape), perm=[0, 2, 1]), k4_shape),
            ],
            tag_var="key_transpose",
            tag_values=["bshd", "bhsd", "3d"],
        )
        probs = _probs(op, q, k_t, q_scale, k_scale, s_scale, bias, nan_fill, mask_cond, mask_fill)
        v = op.Transpose(op.Reshape(v_in, v_shape, _outputs=["v_4d"]), perm=[0, 2, 1, 3])
        context = op.Transpose(op.MatMul(probs, v), perm=[0, 2, 1, 3])
        return op.Reshape(context, out_shape, _outputs=["out"])

    def check(self, context, q_in, k_in, v_in, q_4d, k_4d, v_4d, out, bias=None, has_bias=False, **bindings):
        result = pattern.MatchResult()
        dims = {}
        for name, inp, split_out in (("query", q_in, q_4d), ("key", k_in, k_4d), ("value", v_in, v_4d)):
            if inp.shape is None or len(inp.shape) != 3:
                return result.fail(f"{name} input is not known to be rank 3 (batch, sequence, hidden)", inp)
            split = _split_heads_dims(inp, split_out)
            if split is None:
                return result.fail(f"cannot determine heads and head size of the {name} reshape", split_out)
            dims[name] = split
        heads, head_size = dims["query"]
        if dims["key"] != (heads, head_size):
            return result.fail(f"key heads/size {dims['key']} differ from query's {(heads, head_size)}", k_4d)
        if dims["value"][0] != heads:
            return result.fail(f"value has {dims['value'][0]} heads, query {heads}", v_4d)
        scale = _check_probs({**bindings, "bias": bias, "has_bias": has_bias}, result)
        if scale is None:
            return result
        # The merge Reshape may also flatten batch and sequence (GPT-2's Conv1D reads (B·S, D)):
        # then the fused op is followed by the same Reshape.
        merged = out.shape is not None and len(out.shape) == 3 and q_in.shape is not None and (
            list(out.shape)[:2] == list(q_in.shape)[:2]
        )
        self._reshape_after = not merged
        self._heads = heads
        self._scale = scale
        return result

    def rewrite(self, op, q_in, k_in, v_in, out_shape, bias=None, has_bias=False, where_mask=False, mask_cond=None,
                mask_fill=None, **_):
        bias, kind = _mask_bias(op, q_in, bias, has_bias, where_mask, mask_cond, mask_fill)
        fused = op.Attention(
            q_in, k_in, v_in, bias, num_heads=self._heads, scale=self._scale, mask_kind=kind, _domain=ops.DOMAIN
        )
        return op.Reshape(fused, out_shape) if self._reshape_after else fused


class AttentionBHSDFusion(pattern.RewriteRuleClassBase):
    """Scaled dot-product attention on head-split tensors → ``tfgraph.AttentionBHSD``.

    For blocks the full rule cannot take because Q/K/V are transformed after the head
    split (rotary embeddings, repeated grouped K/V heads): anchors on Q, Kᵀ (a
    ``Transpose(k, 0,1,3,2)``), optional scales, bias and NaN guard, Softmax and the
    product with V. Runs after the full rule, so it only sees what that one left.
    """

    def __init__(self):
        super().__init__(name="attention-bhsd")
        self._scale = 1.0

    def pattern(self, op, q, k, v, q_scale, k_scale, s_scale, bias, nan_fill, mask_cond, mask_fill):
        probs = _probs(op, q, op.Transpose(k, perm=[0, 1, 3, 2]), q_scale, k_scale, s_scale, bias, nan_fill,
                       mask_cond, mask_fill)
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, bias=None, has_bias=False, **bindings):
        result = pattern.MatchResult()
        for name, value in (("query", q), ("key", k), ("value", v)):
            if value.shape is None or len(value.shape) != 4:
                return result.fail(f"{name} is not known to be rank 4 (batch, heads, sequence, size)", value)
        heads = {d for d in (q.shape[1], k.shape[1], v.shape[1])}
        if len(heads) != 1 or not isinstance(q.shape[1], int):
            return result.fail(f"head counts differ or are not static: {q.shape[1]}, {k.shape[1]}, {v.shape[1]}", k)
        if q.shape[3] != k.shape[3] or not isinstance(q.shape[3], int):
            return result.fail("query and key head sizes differ or are not static", k)
        scale = _check_probs({**bindings, "bias": bias, "has_bias": has_bias}, result)
        if scale is None:
            return result
        self._scale = scale
        return result

    def rewrite(self, op, q, k, v, bias=None, has_bias=False, where_mask=False, mask_cond=None, mask_fill=None, **_):
        bias, kind = _mask_bias(op, q, bias, has_bias, where_mask, mask_cond, mask_fill)
        return op.AttentionBHSD(q, k, v, bias, scale=self._scale, mask_kind=kind, _domain=ops.DOMAIN)


@register_pass("fuse-attention")
class FuseAttentionPass(RuleSetPass):
    """Rewrite multi-head attention blocks to the neutral ``tfgraph.Attention`` operator.

    Run ``infer-shapes`` first: the rule reads heads and head size from value shapes.
    After the pattern rules, :mod:`tfgraph.passes.attention_softmax` takes the attention
    Softmaxes they left (``attention-softmax``); any still unfused is listed with the
    reason under ``unfused-softmax``.
    """

    def named_rules(self) -> Sequence[tuple[str, pattern.RewriteRule]]:
        return [("attention", AttentionFusion.rule()), ("attention-bhsd", AttentionBHSDFusion.rule())]

    # Which neutral operator each rule emits (its function definition is added on use).
    RULE_OPS = {"attention": "Attention", "attention-bhsd": "AttentionBHSD"}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        for rule_name, op_name in self.RULE_OPS.items():
            if self.report.get(rule_name, {}).get("matches"):
                ops.ensure_defined(model, op_name)
        # What the pattern rules left: attention found from its math (attention_softmax), and
        # for every attention Softmax still unfused, the reason.
        count, left = attention_softmax.fuse_all(model)
        self.report["attention-softmax"] = {"matches": count}
        if left:
            self.report["unfused-softmax"] = {"matches": 0, "blocks": left}
        return ir.passes.PassResult(model, result.modified or count > 0)
