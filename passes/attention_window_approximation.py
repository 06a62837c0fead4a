"""Opt-in approximation: restrict dense attention to a local window (plus optional global tokens).

This changes what the model computes (sparse attention in the Longformer/BigBird sense),
so it only runs when asked for (``tfgraph compile --attention window=256[,global=1]``)
and the compiler reports the output change against the dense model.

For every neutral attention block (after ``classify-attention-masks``): causal blocks
see the ``window`` most recent keys, the current one included (``window_left =
window - 1``, as Mistral's ``sliding_window``); bidirectional blocks see ``window // 2``
keys on each side (Longformer's convention). Blocks that already have a window keep the
narrower one (and get no global tokens: they would see past the native window, which an
additive bias cannot undo). ``global_tokens=g``: the first ``g`` keys stay visible to every query (to
every later one in causal blocks), and in bidirectional blocks the first ``g`` queries
see every key.

The block's additive bias gets the band added (so the neutral op's own definition, and
every lowering that reads the bias, computes the approximated attention), and its
``mask_kind`` becomes ``window`` (the target may then lower it in O(S·window)) or, when
the original mask was a general bias, ``window_bias`` (lowered densely).
"""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.ops import MaskKind
from tfgraph import ops
from tfgraph.errors import BadInputError
from tfgraph.passes import blocked_attention as blocked
from tfgraph.passes.attention_lowering import is_self_attention
from tfgraph.passes.registry import register_pass

_CAUSAL = tuple(k for k in MaskKind if k.causal)
_EXACT = tuple(k for k in MaskKind if k.exact)


def parse_window_spec(spec: str) -> dict[str, int]:
    """``"window=256[,global=1]"`` → ``{"window": 256, "global_tokens": 1}``."""
    options: dict[str, int] = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ("window", "global") or not value.strip().isdigit():
            raise BadInputError(f"bad attention approximation '{spec}': expected window=N[,global=G] with integers")
        options["window" if key == "window" else "global_tokens"] = int(value)
    if "window" not in options or options["window"] < 1:
        raise BadInputError(f"bad attention approximation '{spec}': window=N with N >= 1 is required")
    return options


@register_pass("approximate-attention-window")
class ApproximateAttentionWindowPass(ir.passes.InPlacePass):
    """Restrict every fused attention block to a local window (an approximation; see the module docstring)."""

    changes_outputs = True  # the compiler rebaselines verification and reports the change

    def __init__(self, *, window: int, global_tokens: int = 0):
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise BadInputError(f"window must be a positive integer, got {window!r}")
        if not isinstance(global_tokens, int) or global_tokens < 0:
            raise BadInputError(f"global_tokens must be a non-negative integer, got {global_tokens!r}")
        self.window = window
        self.global_tokens = global_tokens
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts: dict[str, int] = {}
        for graph in model.graphs():
            for node in list(graph):
                if node.domain != ops.DOMAIN or node.op_type not in ("Attention", "AttentionBHSD"):
                    continue
                if not is_self_attention(node):  # cached keys: the band would need the past length
                    counts["skipped (cached keys)"] = counts.get("skipped (cached keys)", 0) + 1
                    continue
                kind = node.attributes.get_string("mask_kind", "bias")
                causal = kind in _CAUSAL or (kind.startswith("window") and node.attributes.get_int("window_right") == 0)
                left, right = (self.window - 1, 0) if causal else (self.window // 2, self.window // 2)
                global_tokens = self.global_tokens
                if kind.startswith("window"):
                    # A native window stays in force (an additive bias can only mask more), so
                    # global tokens, which would see past it, are not added to such blocks.
                    left = min(left, node.attributes.get_int("window_left"))
                    right = min(right, node.attributes.get_int("window_right"))
                    global_tokens = 0
                q, _, _, bias = node.inputs
                new: list[ir.Node] = []
                band = blocked.dense_mask(
                    new, q, left=left, right=right, key_padding=None, global_tokens=global_tokens,
                    sequence_axis=2 if node.op_type == "AttentionBHSD" else 1, prefix=f"{node.name or 'attention'}/approx",
                )
                total = ir.node("Add", [bias, band])
                total.outputs[0].name = f"{node.name or node.outputs[0].name}/approx/bias"
                new.append(total)
                graph.insert_before(node, new)
                node.replace_input_with(3, total.outputs[0])
                exact = kind in _EXACT or node.attributes.get_string("key_padding") is not None
                new_kind = "window" if exact else "window_bias"
                node.attributes["mask_kind"] = ir.AttrString("mask_kind", MaskKind(new_kind).value)
                node.attributes["window_left"] = ir.AttrInt64("window_left", left)
                node.attributes["window_right"] = ir.AttrInt64("window_right", right)
                if global_tokens:
                    node.attributes["global_tokens"] = ir.AttrInt64("global_tokens", global_tokens)
                label = f"{'causal' if causal else 'bidirectional'}->{new_kind}"
                if global_tokens != self.global_tokens:
                    label += " (native window kept, no global tokens)"
                counts[label] = counts.get(label, 0) + 1
        self.report = {label: {"matches": n} for label, n in sorted(counts.items())}
        return ir.passes.PassResult(model, any(not label.startswith("skipped") for label in counts))
