"""Refactors keep artifacts: every profile compiles bert-small and gpt-small to the operator
histogram, attention counts and (within float noise) errors recorded in tests/data/golden_artifacts.json.

A change that is meant to change artifacts rewrites the record (``python tests/_golden.py --write``)
and says so in its commit; ``python tests/_golden.py --diff OLD NEW`` shows what moved."""

from __future__ import annotations

import json

import pytest

from _golden import GOLDEN, MODELS, compile_all, differences

pytestmark = pytest.mark.slow

RECORDED = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("target", sorted({key.split("/")[0] for key in RECORDED}))
def test_profile_compiles_to_the_recorded_artifacts(target):
    now = compile_all([target])
    recorded = {f"{target}/{m}": RECORDED[f"{target}/{m}"] for m in MODELS}
    assert not differences(recorded, now), "\n".join(differences(recorded, now))


def test_every_profile_is_recorded():
    import tfgraph

    assert {t.name for t in tfgraph.list_targets()} <= {key.split("/")[0] for key in RECORDED}


def test_differences_catch_a_changed_graph():
    """The comparison itself can fail: an operator more, an error 10x larger, a block unfused."""
    base = {"t/m": {"ops": {"ai.onnx::MatMul": 2}, "attention": {"found": 1, "fused": 1, "unfused": 0},
                    "max_abs": {"y": 1e-6}}}
    assert differences(base, base) == []
    more = {"t/m": {**base["t/m"], "ops": {"ai.onnx::MatMul": 3}}}
    worse = {"t/m": {**base["t/m"], "max_abs": {"y": 1e-3}}}
    unfused = {"t/m": {**base["t/m"], "attention": {"found": 1, "fused": 0, "unfused": 1}}}
    for changed in (more, worse, unfused):
        assert len(differences(base, changed)) == 1
