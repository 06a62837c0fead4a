"""Targets' numeric self-test of windowed attention (``tfgraph targets --self-test``)."""

from __future__ import annotations

import json
import textwrap

from tfgraph.compiler.selftest import window_self_test


def test_cpu_fp32_passes_on_both_sides_of_the_crossover():
    results = window_self_test("cpu-fp32")
    assert {(r.case, r.sequence) for r in results} == {
        (case, s) for case in ("causal window", "two-sided window", "relative bias", "no mask") for s in (37, 1037)
    }
    assert all(r.passed and r.max_abs < 1e-5 for r in results)


# A target whose lowering silently ignores the window, as OpenVINO and QNN do with
# Attention-25's window attributes: it must fail its self-test.
PLUGIN = """
import dataclasses
import onnx_ir as ir
from tfgraph.passes.registry import PassSpec, register_pass
from tfgraph.targets import register_target
from tfgraph.targets.cpu import CPU_FP32

@register_pass("forget-windows", replace=True)
class ForgetWindows(ir.passes.InPlacePass):
    def call(self, model):
        for node in model.graph:
            if node.domain == "tfgraph":
                node.attributes["window_left"] = ir.AttrInt64("window_left", 30)
                node.attributes["window_right"] = ir.AttrInt64("window_right", 30)
        return ir.passes.PassResult(model, True)

register_target(CPU_FP32.map_passes(
    lambda p: (PassSpec("forget-windows"),
               PassSpec("lower-attention", {"rules": [{"rule": "window", "mode": "blocked"}, "packed", "multi-head"]}))
    if p.name == "lower-attention" else p, name="window-blind"), replace=True)
"""


def test_a_window_blind_lowering_fails(cli, tmp_path):
    plugin = tmp_path / "blind.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    result = cli("targets", "--self-test", "--plugin", plugin, "--target", "window-blind", "--json")
    assert result.code == 1, result.err
    report = json.loads(result.out)
    assert not report["passed"]
    windows = [r for r in report["results"] if "window" in r["case"]]
    assert len(windows) == 4 and all(not r["passed"] and r["max_abs"] > 1e-2 for r in windows)
    # The tiny BERT/GPT compiles have no windows: the blind lowering is right for them.
    assert all(r["passed"] for r in report["results"] if r not in windows)
    ok = cli("targets", "--self-test", "--target", "cpu-fp32")
    assert ok.code == 0 and "FAILED" not in ok.out


def test_neutral_attention_without_a_bias_input_lowers():
    """A neutral Attention whose optional bias is left out (a plugin's fusion may write it so) lowers to
    MultiHeadAttention without one and computes softmax(Q·Kᵀ·scale)·V."""
    import numpy as np
    import onnx_ir as ir

    from tfgraph.compiler import selftest
    from tfgraph.compiler.verify import run
    from tfgraph.passes.attention_lowering import LowerAttentionPass

    model = selftest._model("none", 0, 0)
    node = next(n for n in model.graph if n.op_type == "Attention")
    node.resize_inputs(3)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert LowerAttentionPass()(model).modified
    assert [n.op_type for n in model.graph] == ["MultiHeadAttention"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 9, selftest.HEADS * selftest.HEAD_SIZE)).astype(np.float32) for _ in range(3))
    want, _ = selftest._reference(q, k, v, np.ones((2, 9), np.int64), "none", 0, 0)
    np.testing.assert_allclose(run(model, {"q": q, "k": k, "v": v})["y"], want, atol=1e-5)
