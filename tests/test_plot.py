"""benchmarks/plot.py: every chart is written as a PNG and plots exactly the committed results."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXPECTED = ["window_attention_latency", "int8_accuracy_latency", "attention_fusion_coverage", "pipeline_stage_balance"]


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "benchmarks" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json(name):
    return json.loads((RESULTS / name).read_text())


def test_main_writes_every_png(plot, tmp_path, capsys):
    report = plot.main(["--out", str(tmp_path), "--json"])
    assert report["skipped"] == {}
    assert sorted(report["written"]) == sorted(EXPECTED)
    assert json.loads(capsys.readouterr().out) == report
    for name in EXPECTED:
        path = tmp_path / f"{name}.png"
        assert report["written"][name] == str(path)
        data = path.read_bytes()
        assert len(data) > 10_000
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 800 <= width <= 1600 and 400 <= height <= 1000  # legible at README width


def test_missing_results_are_skipped(plot, tmp_path):
    report = plot.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "plots")])
    assert report["written"] == {} and set(report["skipped"]) == set(EXPECTED)


def test_window_series_matches_results(plot):
    panels = plot.window_series(RESULTS)["panels"]
    expected = {}
    for line in (RESULTS / "window_cpu_sweep.txt").read_text().splitlines():
        m = re.match(r"B=(\d+) S=(\d+): (.*)", line)
        for part in m.group(3).split(", ") if m else []:
            variant, ms = part.rsplit(" ", 2)[0], float(part.rsplit(" ", 2)[1])
            expected[(int(m.group(1)), int(m.group(2)), variant)] = ms
    for row in _json("window_cpu_b4_s8192.json")["rows"]:
        expected[(row["batch"], row["seq"], row["variant"])] = row["median_ms"]
    plotted = {(int(p.split()[1]), s, v): ms for p, vs in panels.items() for v, pts in vs.items() for s, ms in pts}
    assert plotted == {k: v for k, v in expected.items() if k[2] in plot.WINDOW_VARIANTS}
    assert plotted[(4, 8192, "tfgraph cpu-fp32")] == pytest.approx(527.2517854973557)
    assert {"GQA local_window_size", "GQA causal (no window)"} <= set(panels["batch 1"])


def test_precision_series_matches_results(plot):
    data = _json("precision_cpu.json")
    panels = plot.precision_series(RESULTS)["panels"]
    assert len(panels) == sum(len(m["timings"]) for m in data["models"].values())
    for model, entry in data["models"].items():
        for shape, timings in entry["timings"].items():
            panel = panels[f"{model}, {shape}"]
            assert panel["fp32_ms"] == timings["fp32 (tfgraph cpu-fp32)"]["median_ms"]
            assert set(panel["points"]) == set(plot.INT8_VARIANTS)
            for variant, point in panel["points"].items():
                assert point == {"latency_ms": timings[variant]["median_ms"],
                                 "cosine": entry["variants"][variant]["cosine_mean"]}


def test_fusion_series_matches_results(plot):
    data = _json("fusion_cpu.json")
    panels = plot.fusion_series(RESULTS)["panels"]
    for r in data["results"]:
        for exporter, builds in r["builds"].items():
            for tool in ("ort-transformers", "onnxscript", "tfgraph"):
                point = panels[exporter][r["model"]][tool]
                assert point["fused"] == builds[tool].get("fused_attention")
                assert point["found"] == builds["tfgraph"]["attention"]["found"]
                assert point["error"] == builds[tool].get("error")


def test_pipeline_series_matches_results(plot):
    data = _json("pipeline_cpu.json")
    panels = plot.pipeline_series(RESULTS)["panels"]
    assert len(panels) == len(data["balance"])
    for b in data["balance"]:
        panel = panels[f"{b['model']}, K={b['K']}"]
        assert panel["measured_ms"] == b["stage_ms"] and panel["estimated_ms"] == b["stage_estimate_ms"]
        assert panel["measured_balance"] == b["measured_balance"]
        assert panel["estimated_balance"] == b["estimated_balance"]
