"""Numeric self-tests of a target's lowerings, run on the target's own execution providers.

Runtimes differ in what they honour: OpenVINO and QNN silently ignore Attention-25's
window attributes and return dense-causal results, so a lowering that is right on
onnxruntime CPU can be wrong elsewhere. :func:`window_self_test` builds attention blocks in
tfgraph's neutral form — the kinds ``classify-attention-masks`` reports for a sliding window
and a two-sided window (with key padding), a general additive bias (a per-head relative table,
as T5/BEiT/ALiBi give) and no mask at all — lowers each with the target's own pipeline, runs
it with the target's providers and session options at a short and a long sequence (both sides
of the blocked form's crossover), and compares every query that sees a key with a numpy
reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common is used below; importing onnx_ir alone does not load it

from tfgraph import ops
from tfgraph.deploy import runtime
from tfgraph.passes import blocked_attention as blocked
from tfgraph.passes.registry import PassSpec, create_pass
from tfgraph.targets import Target, get_target

HEADS, HEAD_SIZE = 2, 8
# (case, mask kind, window left, window right)
CASES = (("causal window", "window", 7, 0), ("two-sided window", "window", 4, 4), ("relative bias", "bias", 0, 0),
         ("no mask", "none", 0, 0))


@dataclasses.dataclass
class SelfTestResult:
    target: str
    case: str
    sequence: int
    max_abs: float
    passed: bool
    detail: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _model(kind: str, left: int, right: int) -> ir.Model:
    width = HEADS * HEAD_SIZE
    q, k, v = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "sequence", width]))
               for n in "qkv")
    inputs, nodes = [q, k, v], []
    attributes: dict = {"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5, "mask_kind": kind}
    if kind == "window":
        mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
        inputs.append(mask)
        bias = blocked.dense_mask(nodes, q, left=left, right=right, key_padding=mask)
        attributes.update(window_left=left, window_right=right, key_padding="attention_mask")
    elif kind == "bias":  # a per-head table over (query, key) positions, shared by the batch
        bias = ir.Value(name="bias", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, HEADS, "sequence", "sequence"]))
        inputs.append(bias)
    else:  # no mask: a zero scalar bias, as the fusions write it
        zero = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0.0, np.float32))})
        nodes.append(zero)
        bias = zero.outputs[0]
    node = ir.node("Attention", [q, k, v, bias], domain=ops.DOMAIN, attributes=attributes)
    node.outputs[0].name = "y"
    node.outputs[0].shape = ir.Shape(["batch", "sequence", width])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    nodes.append(node)
    model = ir.Model(ir.Graph(inputs, node.outputs, nodes=nodes, opset_imports={"": 18}), ir_version=9)
    ops.ensure_defined(model, "Attention")
    return model


def _reference(q, k, v, keys, kind, left, right, bias=None):
    b, s, d = q.shape
    split = lambda x: x.reshape(b, s, HEADS, HEAD_SIZE).transpose(0, 2, 1, 3)  # noqa: E731
    offset = np.arange(s)[None, :] - np.arange(s)[:, None]
    band = (offset >= -left) & (offset <= right) if kind == "window" else np.ones((s, s), bool)
    visible = band[None, None] & (keys[:, None, None, :] != 0)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) * HEAD_SIZE ** -0.5 + (bias if bias is not None else 0.0)
    scores = np.where(visible, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, d), visible.any(-1)[:, 0]


def _lowering(target: Target) -> list[PassSpec]:
    """The target's whole pipeline, which takes the neutral block like any model's (passes
    that change outputs on purpose, such as pruning, are left out)."""
    from tfgraph.passes.registry import get_pass_class

    return [spec for spec in target.passes if not getattr(get_pass_class(spec.name), "changes_outputs", False)]


def window_self_test(target: str | Target, *, atol: float | None = None) -> list[SelfTestResult]:
    """Run the windowed-attention self-test of ``target``; one result per (case, sequence length)."""
    profile = get_target(target)
    tolerance = atol if atol is not None else max(profile.tolerance.atol, 1e-4)
    lowering = _lowering(profile)
    crossover = next((rule.min_sequence for s in lowering if s.name == "lower-attention"
                      for rule in s.create().rules if rule.name == "window"), 0)
    lengths = sorted({37, max(crossover, 64) + 13})
    providers = runtime.usable(profile.providers)[0]
    results = []
    for case, kind, left, right in CASES:
        # Static-shape targets (NPUs) get one model per length, its inputs pinned like `--shape` does.
        builds = [(lengths, None)] if not profile.static_shapes else [([n], n) for n in lengths]
        for run_lengths, static in builds:
            model = _model(kind, left, right)
            if static is not None:
                for value in model.graph.inputs:
                    value.shape = (ir.Shape([1, HEADS, static, static]) if value.name == "bias"
                                   else ir.Shape([2, static, *list(value.shape)[2:]]))
            try:
                for spec in lowering:
                    create_pass(spec.name, **dict(spec.options))(model)
                ir.passes.common.RemoveUnusedNodesPass()(model)
                session = runtime.session(model, providers, options=profile.session_options)
            except Exception as e:  # noqa: BLE001 - reported as a failed self-test
                results.append(SelfTestResult(profile.name, case, 0, float("inf"), False, f"does not load: {e}"[:300]))
                continue
            for length in run_lengths:
                rng = np.random.default_rng(length)
                q, k, v = (rng.standard_normal((2, length, HEADS * HEAD_SIZE)).astype(np.float32) for _ in range(3))
                keys = np.ones((2, length), np.int64)
                feeds = {"q": q, "k": k, "v": v}
                bias = None
                if kind == "window":
                    keys[1, length - length // 3:] = 0
                    feeds["attention_mask"] = keys
                elif kind == "bias":
                    bias = feeds["bias"] = rng.standard_normal((1, HEADS, length, length)).astype(np.float32)
                want, rows = _reference(q, k, v, keys, kind, left, right, bias)
                got = session.run(None, feeds)[0]
                err = float(np.abs(got - want)[rows].max())
                results.append(SelfTestResult(profile.name, case, length, err, bool(err <= tolerance)))
    return results


MODELS = ("bert-small", "gpt-small")  # tiny BERT-style encoder and GPT-style decoder (2 layers)


def profile_self_test(target: str | Target, *, models: tuple[str, ...] = MODELS) -> list[SelfTestResult]:
    """Tiny BERT- and GPT-style models through the target's whole pipeline (precision passes
    included), verified on the target's own providers against the fp32 model, with the placement
    report: a result fails on a verification error or an undocumented CPU fallback. Needs torch
    (the built-in models are exported with TorchScript)."""
    import tfgraph
    from tfgraph.errors import TfgraphError

    profile = get_target(target)
    shapes = {"batch": 1, "sequence": 16} if profile.static_shapes else {"batch": 2, "sequence": 16}
    results = []
    for name in models:
        try:
            artifact = tfgraph.compile(name, target=profile, exporter="torchscript", shapes=shapes)
        except TfgraphError as e:
            results.append(SelfTestResult(profile.name, f"{name} compile", 16, float("inf"), False, str(e)[:300]))
            continue
        manifest = artifact.manifest
        worst = max((d["max_abs"] for d in manifest["verification"]["outputs"].values()), default=0.0)
        place = manifest["placement"]
        ran_on = ",".join(manifest["verification"]["session"]["providers"])
        detail = f"on {ran_on}; placement {place['nodes']} ({place['source']})"
        passed = bool(manifest["verification"]["passed"]) and place["unexpected_fallback"] == 0
        if place["unexpected_fallback"]:
            detail += f"; unexpected CPU fallback {place['fallback_ops']}"
        results.append(SelfTestResult(profile.name, f"{name} compile", 16, float(worst), passed, detail))
    return results
