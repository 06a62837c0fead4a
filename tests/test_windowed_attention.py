"""Windowed attention on exported models: detection (classify-attention-masks) and the lowerings.

Mistral (sliding window 8, causal), GPT-Neo (alternating global and local layers,
window 8) and the built-in two-sided local encoder (window ±4), with both exporters.
The compiled models are run at sequence lengths below and above the blocked form's
crossover (lowered here to 16 tokens so that short tests exercise both branches of the
``If``), at lengths that are and are not multiples of the block, with right and left
padding, against the raw export. Positions that are themselves padding are left out:
a query that sees no key has no defined value (see ``tfgraph.compiler.verify.compare``).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("transformers", reason="needs the 'hf' extra")

import tfgraph  # noqa: E402
from tfgraph.compiler import verify  # noqa: E402
from tfgraph.compiler.export import export  # noqa: E402
from tfgraph.models.hf_configs import make_hf_checkpoint  # noqa: E402
from tfgraph.passes.registry import PassSpec  # noqa: E402
from tfgraph.targets.cpu import CPU_FP32  # noqa: E402

CROSSOVER = 16
# cpu-fp32's lowering rules as the to/window_to shorthand, whose options the tests vary.
CPU_SHORTHAND = {"to": "com.microsoft.Attention", "window_to": "auto", "window_kernel": "com.microsoft.MultiHeadAttention",
                 "blocked_min_sequence": 1024}


def _target(**lowering) -> tfgraph.targets.Target:
    return CPU_FP32.map_passes(
        lambda p: PassSpec(p.name, {**CPU_SHORTHAND, **lowering}) if p.name == "lower-attention" else p,
        name="cpu-fp32-window-test")


def _report(manifest: dict, pass_name: str) -> dict:
    record = next(r for r in manifest["passes"] if r["name"] == pass_name)
    return {name: entry["matches"] for name, entry in record["rules"].items()}


def _feeds(model_path, batch: int, seq: int, left_padding: bool) -> dict[str, np.ndarray]:
    feeds = verify.generate_inputs(ir.load(model_path), {"batch": batch, "sequence": seq}, seed=seq)
    if left_padding:
        feeds = {k: (v[..., ::-1].copy() if "mask" in k else v) for k, v in feeds.items()}
    return feeds


def _check_against_export(raw_path, compiled_path, lengths):
    for seq in lengths:
        for left_padding in (False, True):
            feeds = _feeds(raw_path, 3, seq, left_padding)
            want = verify.run(ir.load(raw_path), feeds)
            got = verify.run(ir.load(compiled_path), feeds, options=None)
            for diff in verify.compare(want, got, atol=1e-4, rtol=1e-4, padded=verify.padded_positions(feeds)):
                assert diff.ok, (seq, left_padding, diff)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-window")
    return {kind: make_hf_checkpoint(kind, root / kind) for kind in ("mistral", "gpt_neo")}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("window-onnx")
    cache = {}

    def get(kind: str, exporter: str):
        if (kind, exporter) not in cache:
            source = checkpoints.get(kind, kind)
            attention = "eager" if kind == "gpt_neo" else None
            cache[kind, exporter] = export(source, root / f"{kind}-{exporter}.onnx", exporter=exporter, attention=attention)
        return cache[kind, exporter]

    return get


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mistral_sliding_window(tmp_path, exports, exporter):
    raw = exports("mistral", exporter)
    artifact = tfgraph.compile(raw, _target(blocked_min_sequence=CROSSOVER), output=tmp_path / "out")
    manifest = artifact.manifest
    # The window (8 keys: the current one and 7 before) and the padding input are found exactly.
    assert _report(manifest, "classify-attention-masks") == {"window+padding(attention_mask)": 2}
    # Dynamic sequence length: an If picks the blocked form or GroupQueryAttention per call.
    assert _report(manifest, "lower-attention")["window:if"] == 2
    model = onnx.load((artifact.path / "model.onnx"))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    short = next(a.g for a in ifs[0].attribute if a.name == "else_branch")
    gqa = next(n for n in short.node if n.op_type == "GroupQueryAttention")
    assert next(a.i for a in gqa.attribute if a.name == "local_window_size") == 8  # GQA counts the current key
    # The exporter's dense (B, 1, S, S) mask is gone: outside the If branches (which build
    # what they need from the padding input) no node reads attention_mask's values any more.
    assert not [n.op_type for n in model.graph.node if "attention_mask" in n.input and n.op_type != "Shape"]
    _check_against_export(raw, (artifact.path / "model.onnx"), lengths=(5, 13, 16, 21, 40))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gpt_neo_local_and_global_layers(tmp_path, exports, exporter):
    raw = exports("gpt_neo", exporter)
    artifact = tfgraph.compile(raw, _target(blocked_min_sequence=CROSSOVER), output=tmp_path / "out")
    classified = _report(artifact.manifest, "classify-attention-masks")
    assert classified == {"causal+padding(attention_mask)": 1, "window+padding(attention_mask)": 1}
    assert artifact.manifest["attention"]["unfused"] == 0
    _check_against_export(raw, (artifact.path / "model.onnx"), lengths=(7, 24, 33))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_two_sided_local_encoder(tmp_path, exports, exporter):
    """Longformer-style window (±4) in the built-in encoder: right > 0, so no GQA; MHA below the crossover."""
    raw = exports("local-small", exporter)
    artifact = tfgraph.compile(raw, _target(blocked_min_sequence=CROSSOVER), output=tmp_path / "out")
    assert _report(artifact.manifest, "classify-attention-masks") == {"window+padding(attention_mask)": 2}
    model = onnx.load((artifact.path / "model.onnx"))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["If"] == 2
    _check_against_export(raw, (artifact.path / "model.onnx"), lengths=(6, 16, 19, 35))


@pytest.mark.parametrize("kernel", ["standard", "com.microsoft.MultiHeadAttention"])
@pytest.mark.parametrize("block", [4, 8])
def test_blocked_only_both_kernels(tmp_path, exports, kernel, block):
    """Always blocked (no If), both tile kernels, blocks smaller than and equal to the window."""
    raw = exports("mistral", "dynamo")
    target = _target(window_to="blocked", window_kernel=kernel, block=block)
    artifact = tfgraph.compile(raw, target, output=tmp_path / "out")
    assert _report(artifact.manifest, "lower-attention")["window:blocked"] == 2
    ops = collections.Counter(n.op_type for n in onnx.load((artifact.path / "model.onnx")).graph.node)
    assert ops["If"] == 0 and ops["GroupQueryAttention"] == 0
    assert ops["MultiHeadAttention"] == (2 if kernel != "standard" else 0)
    _check_against_export(raw, (artifact.path / "model.onnx"), lengths=(3, 8, 17, 29))


def test_static_length_picks_one_form(tmp_path, exports):
    """With a static sequence length the choice is made at compile time: no If."""
    raw = exports("mistral", "torchscript")
    model = onnx.load(raw)
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[1].dim_value = 12
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, fixed)
    short = tfgraph.compile(fixed, _target(blocked_min_sequence=CROSSOVER), output=tmp_path / "short")
    assert _report(short.manifest, "lower-attention")["window:fused"] == 2
    long = tfgraph.compile(fixed, _target(blocked_min_sequence=8), output=tmp_path / "long")
    assert _report(long.manifest, "lower-attention")["window:blocked"] == 2


def test_manifest_reports_padded_positions(tmp_path, exports):
    raw = exports("mistral", "dynamo")
    artifact = tfgraph.compile(raw, _target(blocked_min_sequence=CROSSOVER), output=tmp_path / "out")
    verification = json.loads((tmp_path / "out" / "manifest.json").read_text())["verification"]
    assert verification["passed"] and verification["padded_positions_excluded"] > 0


def _block_diagonal_export(path, exporter: str, block: int = 4):
    """A one-layer encoder whose mask is block-diagonal (Swin-like local windows of ``block``
    tokens, computed from positions) combined with key padding."""
    import torch

    class LocalBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(50, 16)
            self.qkv = torch.nn.Linear(16, 48)
            self.out = torch.nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            b, s, _ = x.shape
            q, k, v = (t.reshape(b, s, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=-1))
            positions = torch.arange(s)
            same = (positions[:, None] // block) == (positions[None, :] // block)
            keys = attention_mask[:, None, None, :].bool()
            minimum = torch.finfo(x.dtype).min
            bias = torch.where(same[None, None] & keys, 0.0, minimum)
            probs = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + bias, dim=-1)
            return self.out((probs @ v).transpose(1, 2).reshape(b, s, 16))

    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int64)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["y"])
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2)
        torch.onnx.export(LocalBlocks().eval(), (ids, mask), path, dynamo=True, **kwargs,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    else:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        torch.onnx.export(LocalBlocks().eval(), (ids, mask), path, dynamo=False, dynamic_axes=axes, opset_version=18,
                          **kwargs)
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_block_diagonal_local_windows(tmp_path, exporter):
    raw = _block_diagonal_export(tmp_path / "blocks.onnx", exporter)
    artifact = tfgraph.compile(raw, "cpu-fp32", output=tmp_path / "out")
    assert _report(artifact.manifest, "classify-attention-masks") == {"blocks+padding(attention_mask)": 1}
    assert _report(artifact.manifest, "lower-attention")["window:blocked"] == 1
    _check_against_export(raw, tmp_path / "out" / "model.onnx", lengths=(4, 9, 16, 30))
