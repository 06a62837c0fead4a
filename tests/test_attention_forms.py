"""Attention forms found from their math (passes/attention_softmax.py), one small torch module each.

Every form is exported with TorchScript and dynamo (dynamo tests are slow: ~10 s an export),
compiled for cpu-fp32, and must fuse every block; each carries a bias large enough that
dropping it would break the ≤ 1e-4 match against torch. Negative twins: a Softmax that is
not attention (keys and values are constants, the softmax is over the query axis) or that the
neutral op cannot hold (tanh over a biased score, a Max that changes finite scores) stays
unfused, with the reason in the manifest.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import tfgraph  # noqa: E402

B, S, T, H, D = 2, 6, 6, 2, 6  # head size 6: not a multiple of 8
E = H * D
TOLERANCE = 1e-4


def _rng_module(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module.eval()


def _split(x: torch.Tensor, heads: int = H) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class Projections(torch.nn.Module):
    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.q = torch.nn.Linear(E, E)
        self.k = torch.nn.Linear(E, kv_heads * D)
        self.v = torch.nn.Linear(E, kv_heads * D)
        self.kv_heads = kv_heads


class T5Like(Projections):
    """No scale, a relative-position bias from a bucket table (T5), no mask."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(2 * S, H)

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        pos = torch.arange(x.shape[1])
        rel = (pos[None, :] - pos[:, None]).clamp(-S + 1, S) + S - 1
        bias = self.table(rel).permute(2, 0, 1).unsqueeze(0) * 4.0
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        return _merge(torch.matmul(scores.softmax(-1), v))


class AlibiLike(Projections):
    """(batch·heads, S, D) products (Bloom's baddbmm): ALiBi slopes, a Where causal mask on a (B, H, S, T) view."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (_split(p(x)).reshape(b * H, s, D) for p in (self.q, self.k, self.v))
        slopes = torch.tensor([0.5, 0.25]).view(1, H, 1, 1)
        alibi = (slopes * torch.arange(s).view(1, 1, 1, s) * 3.0).expand(b, H, 1, s).reshape(b * H, 1, s)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(D))
        scores = scores.view(b, H, s, s)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = torch.where(causal, scores, torch.finfo(torch.float32).min)
        probs = scores.softmax(-1).view(b * H, s, s)
        return torch.bmm(probs, v).view(b, H, s, D).transpose(1, 2).reshape(b, s, E)


class SwinLike(Projections):
    """Windows of 3 positions as batch, a relative table bias and a per-window mask added on a 5-D view."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(H, 3, 3))

    def forward(self, x):
        b, s, _ = x.shape
        w = x.reshape(b * (s // 3), 3, E)
        q, k, v = _split(self.q(w)), _split(self.k(w)), _split(self.v(w))
        scores = (q * D ** -0.5) @ k.transpose(-2, -1) + self.table.unsqueeze(0) * 3.0
        mask = torch.zeros(s // 3, 3, 3)
        mask[-1, :, -1] = -100.0
        scores = scores.view(b, s // 3, H, 3, 3) + mask.unsqueeze(1).unsqueeze(0)
        probs = scores.view(-1, H, 3, 3).softmax(-1)
        return _merge(probs @ v).reshape(b, s, E)


class DebertaLike(Projections):
    """Disentangled terms (content→position from Q and a position table, gathered), XSoftmax masking."""

    def __init__(self):
        super().__init__()
        self.rel = torch.nn.Parameter(torch.randn(2 * S, E))

    def forward(self, x, mask):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        s = x.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(3 * D)
        pos_k = _split(self.k(self.rel[None]))  # (1, H, 2S, D)
        c2p = q @ pos_k.transpose(-1, -2)  # (B, H, s, 2S)
        index = (torch.arange(s)[None, :] - torch.arange(s)[:, None] + S).clamp(0, 2 * S - 1)
        c2p = torch.gather(c2p, -1, index.expand(q.shape[0], H, s, s))
        scores = scores + c2p / math.sqrt(3 * D)
        full = (mask[:, None, None, :] * mask[:, None, :, None]).bool()
        scores = scores.masked_fill(~full, torch.finfo(torch.float32).min)
        probs = scores.softmax(-1).masked_fill(~full, 0.0)
        return _merge(probs @ v)


class GroupedKV(Projections):
    """MQA: one K/V head broadcast over the query heads in the product, padding mask, partial rotary on Q/K."""

    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x, mask):
        q, k, v = _split(self.q(x)), _split(self.k(x), 1), _split(self.v(x), 1)
        half = D // 2
        angle = torch.arange(x.shape[1]).float()[:, None] * 0.3
        cos, sin = angle.cos(), angle.sin()

        def rotary(t):
            r, rest = t[..., :half], t[..., half:]
            x1, x2 = r[..., : half // 2], r[..., half // 2 : half]
            return torch.cat([torch.cat([-x2, x1], -1) * sin + r * cos, rest], -1)

        q, k = rotary(q), rotary(k)
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5 + bias
        return _merge(torch.matmul(scores.softmax(-1), v))


class CrossAttention(Projections):
    """Queries from x, keys and values from another sequence of another length, key padding mask."""

    def forward(self, x, memory, mask):
        q, k, v = _split(self.q(x)), _split(self.k(memory)), _split(self.v(memory))
        bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
        return _merge(torch.softmax(q @ k.transpose(-1, -2) * 0.4 + bias, dim=-1) @ v)


class Sdpa(Projections):
    """torch's scaled_dot_product_attention with an additive float mask (decomposed by either exporter)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1, H, S, S) * 3.0)

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        return _merge(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.table))


class EinsumBlocks(Projections):
    """LongT5-style local attention: blocks of 3 positions, products as 5-D Einsums, a bias per head."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(H, 3, 3) * 3.0)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s // 3, 3, H, D) for p in (self.q, self.k, self.v))
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) + self.table
        probs = scores.softmax(-1)
        return torch.einsum("...hqk,...khd->...qhd", probs, v).reshape(b, s, E)


class CosineScaled(Projections):
    """Swin-v2's cosine attention: normalized Q and K, a learned per-head logit scale (not a scalar), a bias."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)))
        self.table = torch.nn.Parameter(torch.randn(H, S, S))

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
        scores = cosine * torch.clamp(self.logit_scale, max=math.log(100.0)).exp() + self.table
        return _merge(scores.softmax(-1) @ v)


class SoftCapped(Projections):
    """Gemma-2's tanh soft-capping (scores/cap → tanh → ·cap) before a causal mask and a bias: the op's softcap."""

    CAP = 2.0

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1, H, S, S))

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        scores = torch.tanh(q @ k.transpose(-1, -2) * D ** -0.5 / self.CAP) * self.CAP
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(torch.float32).min) + self.table
        return _merge(scores.softmax(-1) @ v)


class ClampedToMin(Projections):
    """XGLM: a padding bias of finfo.min, then ``max(scores, finfo.min)`` (a clamp of -inf) before the Softmax."""

    def forward(self, x, mask):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        low = torch.finfo(torch.float32).min
        bias = (1.0 - mask[:, None, None, :].float()) * low
        scores = torch.max(q @ k.transpose(-1, -2) * D ** -0.5 + bias, torch.tensor(low))
        return _merge(scores.softmax(-1) @ v)


class WideValues(torch.nn.Module):
    """LeViT: one projection split per head into Q, K and values twice as wide as the keys
    (MultiHeadAttention's 4-D K and V must share one shape: its rule refuses the block)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(E, H * 4 * D)
        self.table = torch.nn.Parameter(torch.randn(H, S, S))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, H, 4 * D).split([D, D, 2 * D], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        return _merge((q @ k.transpose(-1, -2) * D ** -0.5 + self.table).softmax(-1) @ v)


# --- negative twins -------------------------------------------------------------------------


class Router(torch.nn.Module):
    """Softmax(x·W)·E: a gate over constant experts, not attention."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(E, 4))
        self.e = torch.nn.Parameter(torch.randn(4, E))

    def forward(self, x):
        return torch.softmax(x @ self.w, -1) @ self.e


class QueryAxis(Projections):
    """Softmax over the query axis: not attention over keys."""

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        return _merge(torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v)


class CappedAfterBias(Projections):
    """Tanh over the scores plus a bias: the op caps the scaled scores only, so it stays unfused."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(1, H, S, S))

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        scores = torch.tanh((q @ k.transpose(-1, -2) + self.table) / 2.0) * 2.0
        return _merge(scores.softmax(-1) @ v)


class ClampedHigh(Projections):
    """``max(scores, -1)``: a clamp that changes finite scores, not a no-op, so it stays unfused."""

    def forward(self, x):
        q, k, v = _split(self.q(x)), _split(self.k(x)), _split(self.v(x))
        return _merge(torch.max(q @ k.transpose(-1, -2), torch.tensor(-1.0)).softmax(-1) @ v)


# --- harness ---------------------------------------------------------------------------------


def _inputs(names: tuple[str, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = []
    for name in names:
        if name == "x":
            out.append(torch.randn(B, S, E, generator=g))
        elif name == "memory":
            out.append(torch.randn(B, T + 3, E, generator=g))
        elif name == "mask":
            length = T + 3 if "memory" in names else S
            mask = torch.ones(B, length, dtype=torch.int64)
            mask[1, -2:] = 0
            out.append(mask)
    return out


def _export(module, names, path, exporter: str, outputs=("y",)):
    inputs = tuple(_inputs(names))
    if exporter == "torchscript":
        torch.onnx.export(module, inputs, str(path), dynamo=False, input_names=list(names), output_names=list(outputs),
                          opset_version=18)
    else:
        program = torch.onnx.export(module, inputs, dynamo=True, input_names=list(names), output_names=list(outputs),
                                    optimize=True)
        program.save(str(path))
    return inputs


def _compile(tmp_path, module, names, exporter, outputs=("y",)):
    path = tmp_path / f"{type(module).__name__}-{exporter}.onnx"
    inputs = _export(module, names, path, exporter, outputs)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    artifact = tfgraph.compile(str(path), "cpu-fp32", inputs=feeds)
    return artifact, inputs, feeds


def _run(artifact, feeds) -> list[np.ndarray]:
    import onnx_ir as ir

    session = ort.InferenceSession(ir.to_proto(artifact.model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _fuse_report(artifact) -> dict:
    return next(r for r in artifact.manifest["passes"] if r["name"] == "fuse-attention")["rules"]


FORMS = {
    "t5-relative-bias-no-scale": (T5Like, ("x",)),
    "alibi-3d-where-mask": (AlibiLike, ("x",)),
    "swin-windows-table-5d-mask": (SwinLike, ("x",)),
    "deberta-disentangled-xsoftmax": (DebertaLike, ("x", "mask")),
    "mqa-partial-rotary-odd-head": (GroupedKV, ("x", "mask")),
    "cross-attention": (CrossAttention, ("x", "memory", "mask")),
    "sdpa-float-mask": (Sdpa, ("x",)),
    "einsum-5d-local-blocks": (EinsumBlocks, ("x",)),
    "per-head-logit-scale": (CosineScaled, ("x",)),
    "tanh-soft-capping": (SoftCapped, ("x",)),
    "finfo-min-clamp": (ClampedToMin, ("x", "mask")),
    "value-heads-wider-than-keys": (WideValues, ("x",)),
}


def _params():
    for form in FORMS:
        for exporter in ("torchscript", "dynamo"):
            marks = [pytest.mark.slow] if exporter == "dynamo" else []
            yield pytest.param(form, exporter, id=f"{form}-{exporter}", marks=marks)


@pytest.mark.parametrize("form,exporter", list(_params()))
def test_form_fuses_and_keeps_its_bias(tmp_path, form, exporter):
    cls, names = FORMS[form]
    module = _rng_module(cls())
    artifact, inputs, feeds = _compile(tmp_path, module, names, exporter)
    attention = artifact.manifest["attention"]
    assert attention["found"] >= 1 and attention["unfused"] == 0, _fuse_report(artifact)
    assert attention["fused"] == attention["found"]
    with torch.no_grad():
        want = module(*inputs).numpy()
    got = _run(artifact, feeds)[0]
    keep = np.ones(want.shape[:2], bool)
    if "mask" in names and "memory" not in names:
        keep = feeds["mask"].astype(bool)  # padded query rows carry no defined value
    assert np.abs(got - want)[keep].max() <= TOLERANCE
    if cls is SoftCapped:  # no CPU kernel caps: the neutral op holds the cap, and its body applies it
        caps = [n.attributes.get_float("softcap", 0.0) for g in artifact.model.graphs() for n in g
                if n.op_type == "AttentionBHSD"]
        assert caps and all(c == pytest.approx(SoftCapped.CAP) for c in caps), caps


def test_attention_inside_an_if_body_fuses(tmp_path):
    """A block inside an If branch (a model that picks its attention at run time) is fused there."""
    import onnx

    module = _rng_module(T5Like())
    path = tmp_path / "inner.onnx"
    inputs = _export(module, ("x",), path, "torchscript")
    inner = onnx.load(str(path))
    branch = onnx.helper.make_graph(list(inner.graph.node), "then", [], list(inner.graph.output),
                                    list(inner.graph.initializer))
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, [B, S, E])])
    flag = onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)], "g",
        [inner.graph.input[0], flag], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [B, S, E])])
    model = onnx.helper.make_model(graph, opset_imports=list(inner.opset_import))
    outer = tmp_path / "if.onnx"
    onnx.save(model, str(outer))
    feeds = {"x": inputs[0].numpy(), "flag": np.array(True)}
    artifact = tfgraph.compile(str(outer), "cpu-fp32", inputs=feeds)
    ops = {(n.domain, n.op_type) for g in artifact.model.graphs() for n in g}
    assert any(op.endswith("Attention") for _, op in ops), ops
    assert not any(n.op_type == "Softmax" for g in artifact.model.graphs() for n in g)
    with torch.no_grad():
        want = module(*inputs).numpy()
    assert np.abs(_run(artifact, feeds)[0] - want).max() <= TOLERANCE


NEGATIVE = {
    "router-constant-keys": (Router, ("x",), ("y",), "constant"),
    "softmax-over-queries": (QueryAxis, ("x",), ("y",), "last axis"),
    "tanh-over-a-bias": (CappedAfterBias, ("x",), ("y",), "before the tanh soft-capping"),
    "max-above-the-floor": (ClampedHigh, ("x",), ("y",), "not a clamp of -inf"),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_negative_twin_stays_unfused_with_a_reason(tmp_path, name):
    cls, names, outputs, reason = NEGATIVE[name]
    module = _rng_module(cls())
    artifact, inputs, feeds = _compile(tmp_path, module, names, "torchscript", outputs)
    assert not any(n.domain == "tfgraph" or n.op_type.endswith("Attention") for g in artifact.model.graphs() for n in g)
    report = _fuse_report(artifact)
    assert report["attention-softmax"]["matches"] == 0
    if artifact.manifest["attention"]["found"]:  # a block the analysis counts must say why it was left
        reasons = [b["reason"] for b in report["unfused-softmax"]["blocks"]]
        assert any(reason in r for r in reasons), reasons
    with torch.no_grad():
        want = module(*inputs)
    want = want[0] if isinstance(want, tuple) else want
    assert np.abs(_run(artifact, feeds)[0] - want.numpy()).max() <= TOLERANCE


def test_unseeded_random_op_in_the_input_is_refused_by_name(tmp_path):
    """ViTMAE draws its patch noise inside the model: two fresh sessions may agree and a rewritten graph
    draw other numbers, so an unseeded Random* op is refused up front, named, not blamed on a pass."""
    import onnx

    from tfgraph.errors import BadInputError

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("RandomUniformLike", ["x"], ["noise"], name="patch_noise"),
                                    onnx.helper.make_node("Add", ["x", "noise"], ["y"])], "g", [x], [y])
    path = tmp_path / "noise.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(BadInputError, match=r"patch_noise \(RandomUniformLike\), no seed"):
        tfgraph.compile(str(path), "cpu-fp32", inputs={"x": np.ones((2, 4), np.float32)})


class SoftCappedCausal(torch.nn.Module):
    """Gemma-2's soft-capping with a causal mask and a bias, head size 8 (GroupQueryAttention's multiple)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(E, 3 * H * 8)
        self.table = torch.nn.Parameter(torch.randn(1, H, S, S))

    def forward(self, x):
        q, k, v = (_split(t) for t in self.qkv(x).chunk(3, -1))
        scores = torch.tanh(q @ k.transpose(-1, -2) * 8 ** -0.5 / 2.0) * 2.0
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return _merge((scores.masked_fill(~causal, torch.finfo(torch.float32).min) + self.table).softmax(-1) @ v)


def test_softcap_lowers_only_to_a_kernel_that_caps(tmp_path):
    """MultiHeadAttention has no softcap: its rule refuses the block with the reason; GroupQueryAttention
    caps the scaled scores before its mask and bias (its ``softcap`` attribute), as the neutral op does."""
    from tfgraph.passes.attention_lowering import LowerAttentionPass

    module = _rng_module(SoftCappedCausal())
    artifact, inputs, feeds = _compile(tmp_path, module, ("x",), "torchscript")
    with torch.no_grad():
        want = module(*inputs).numpy()
    lowered = next(r for r in artifact.manifest["passes"] if r["name"] == "lower-attention")["rules"]
    assert "softcap" in lowered["com.microsoft.MultiHeadAttention"]["near_miss"], lowered
    gqa = LowerAttentionPass(rules=["group-query", "multi-head"])
    gqa(artifact.model)
    nodes = [n for n in artifact.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 1 and nodes[0].attributes.get_float("softcap") == pytest.approx(2.0), gqa.report
    assert np.abs(_run(artifact, feeds)[0] - want).max() <= TOLERANCE


def test_fp16_clamp_to_the_dtype_minimum_is_walked_over():
    """``Max(scores, -65504)`` in float16 is the same clamp of -inf as float32's finfo.min (above -1e30)."""
    import onnx
    import onnx_ir as ir

    from tfgraph.passes import attention_softmax

    f16 = onnx.TensorProto.FLOAT16
    inputs = [onnx.helper.make_tensor_value_info(n, f16, [B, H, S, D]) for n in ("q", "kt_src", "v")]
    floor = onnx.helper.make_tensor("floor", f16, [], [-65504.0])
    nodes = [onnx.helper.make_node("Transpose", ["kt_src"], ["kt"], perm=[0, 1, 3, 2]),
             onnx.helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             onnx.helper.make_node("Max", ["scores", "floor"], ["clamped"]),
             onnx.helper.make_node("Softmax", ["clamped"], ["probs"], axis=-1),
             onnx.helper.make_node("MatMul", ["probs", "v"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", inputs, [onnx.helper.make_tensor_value_info("y", f16, [B, H, S, D])],
                                   [floor])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])))
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    block = attention_softmax.find(softmax)
    assert [n.op_type for n, _ in block.path] == ["Max"] and block.scale == 1.0


def test_openvino_packed_attention_takes_a_non_default_scale_in_its_weights(tmp_path):
    """Plain OpenVINO reads com.microsoft.Attention without its scale attribute: T5's unscaled scores
    diverged by 5.2 under the target's verification. The packed rule folds the scale into the Q columns."""
    pytest.importorskip("openvino")
    cls, names = FORMS["t5-relative-bias-no-scale"]
    module = _rng_module(cls())
    path = tmp_path / "t5.onnx"
    inputs = _export(module, names, path, "torchscript")
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    artifact = tfgraph.compile(str(path), "openvino-fp32", inputs=feeds)  # verified under OpenVINO
    (node,) = [n for n in artifact.model.graph if n.op_type == "Attention" and n.domain == "com.microsoft"]
    heads = node.attributes.get_int("num_heads")
    assert node.attributes.get_float("scale") == pytest.approx((E // heads) ** -0.5)
    with torch.no_grad():
        want = module(*inputs).numpy()
    assert np.abs(_run(artifact, feeds)[0] - want).max() <= TOLERANCE
