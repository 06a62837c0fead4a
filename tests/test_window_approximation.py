"""The opt-in window approximation (``--attention window=N[,global=G]``)."""

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
from tfgraph.errors import BadInputError  # noqa: E402
from tfgraph.compiler.export import export  # noqa: E402
from tfgraph.models.hf_configs import make_hf_checkpoint  # noqa: E402
from tfgraph.passes.attention_window_approximation import parse_window_spec  # noqa: E402
from tfgraph.passes.registry import PassSpec  # noqa: E402
from tfgraph.targets.cpu import CPU_FP32  # noqa: E402


# cpu-fp32's lowering rules as the to/window_to shorthand, whose options the tests vary.
CPU_SHORTHAND = {"to": "com.microsoft.Attention", "window_to": "auto", "window_kernel": "com.microsoft.MultiHeadAttention",
                 "blocked_min_sequence": 1024}


def _target(name: str, **lowering) -> tfgraph.targets.Target:
    return CPU_FP32.map_passes(
        lambda p: PassSpec(p.name, {**CPU_SHORTHAND, **lowering}) if p.name == "lower-attention" else p, name=name)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("approx")
    out = {}
    for kind in ("bert", "gpt2"):
        folder = make_hf_checkpoint(kind, root / kind)
        out[kind] = export(folder, root / f"{kind}.onnx", exporter="dynamo")
    return out


def test_parse_window_spec():
    assert parse_window_spec("window=256") == {"window": 256}
    assert parse_window_spec("window=256,global=1") == {"window": 256, "global_tokens": 1}
    for bad in ("window", "window=0", "global=1", "window=8,stride=2", "window=-3", "window=abc"):
        with pytest.raises(BadInputError):
            parse_window_spec(bad)


@pytest.mark.parametrize("kind, label", [("gpt2", "causal->window"), ("bert", "bidirectional->window")])
def test_cli_reports_the_change(cli, tmp_path, exports, kind, label):
    result = cli("compile", exports[kind], "-o", tmp_path / "out", "--attention", "window=4,global=1", "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    approximation = manifest["approximation"]
    assert approximation["blocks"] == {label: {"matches": 2}}
    assert approximation["options"] == {"window": 4, "global_tokens": 1}
    (change,) = approximation["output_change_vs_dense"].values()
    assert 0.5 < change["cosine"] < 0.99999 and change["max_abs"] > 1e-3  # it does change the model
    assert any(w.startswith("APPROXIMATION") for w in manifest["warnings"])
    assert "APPROXIMATION" in result.err


def test_needs_the_flag(tmp_path, exports):
    """Without the flag nothing is approximated: the dense model is compiled exactly."""
    artifact = tfgraph.compile(exports["bert"], "cpu-fp32", output=tmp_path / "out")
    assert artifact.manifest["approximation"] is None
    assert not any(r["name"] == "approximate-attention-window" for r in artifact.manifest["passes"])


def test_refused_without_verification(cli, tmp_path, exports):
    result = cli("compile", exports["bert"], "-o", tmp_path / "out", "--attention", "window=4", "--no-verify")
    assert result.code == 2 and "verification" in result.err
    assert not (tmp_path / "out").exists()


def test_bad_values(cli, tmp_path, exports):
    for value in ("window=0", "windows=4", "flash"):
        result = cli("compile", exports["bert"], "-o", tmp_path / "out", "--attention", value)
        assert result.code == 2, value
        assert len(result.err.strip().splitlines()) == 1
    result = cli("export", "bert-small", "-o", tmp_path / "m.onnx", "--attention", "window=4")
    assert result.code == 2


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_lowered_equals_dense_model_with_the_band(tmp_path, exports, kind):
    """The compiled (blocked / fused) model equals the dense model with the same band mask
    applied: the neutral ops kept as their standard-ONNX definitions (lowering "function")."""
    lowered = tfgraph.compile(exports[kind], _target("window-lowered", blocked_min_sequence=16), output=tmp_path / "a",
                              approximate_attention="window=6,global=1")
    dense = tfgraph.compile(exports[kind], _target("window-dense", to="function", window_to=None),
                            output=tmp_path / "b", approximate_attention="window=6,global=1")
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "a" / "model.onnx").graph.node)
    assert ops["If"] == 2
    for length in (9, 16, 37):
        feeds = verify.generate_inputs(ir.load(exports[kind]), {"batch": 2, "sequence": length}, seed=length)
        got = verify.run(ir.load(tmp_path / "a" / "model.onnx"), feeds, options=None)
        want = verify.run(ir.load(tmp_path / "b" / "model.onnx"), feeds, options=None)
        for diff in verify.compare(want, got, atol=1e-4, rtol=1e-4, padded=verify.padded_positions(feeds)):
            assert diff.ok, (length, diff)


def test_cached_keys_are_left_dense(tmp_path):
    """A decoder step with a KV cache: the band would need the past length; such blocks are
    reported as skipped, and the model is unchanged (cosine 1)."""
    artifact = tfgraph.compile("gpt-small-kv", "cpu-fp32", output=tmp_path / "out", approximate_attention="window=4")
    approximation = artifact.manifest["approximation"]
    assert approximation["blocks"] == {"skipped (cached keys)": {"matches": 2}}
    for change in approximation["output_change_vs_dense"].values():
        assert change["max_abs"] < 1e-4
