"""Charts of the committed benchmark results (benchmarks/results/) for the README.

    python benchmarks/plot.py                  # writes benchmarks/results/plots/*.png
    python benchmarks/plot.py --out DIR --json # elsewhere; print what was written

Every number plotted is read from a committed results file; ``series()`` returns exactly
what each chart draws (tests/test_plot.py compares it with the files). A chart whose
input file is missing is skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(path: Path):
    return json.loads(path.read_text())


# --- series: what each chart plots, straight from the results files -------------------------

WINDOW_VARIANTS = ["tfgraph cpu-fp32", "GQA local_window_size", "GQA causal (no window)", "MHA + dense band mask"]


def window_series(results: Path) -> dict:
    """Median ms per (batch, variant, S): the printed sweep lines plus the S=8192 batch-4 run."""
    panels: dict = {}

    def add(batch, seq, variant, ms):
        if variant in WINDOW_VARIANTS:
            panels.setdefault(f"batch {batch}", {}).setdefault(variant, []).append([seq, ms])

    for line in (results / "window_cpu_sweep.txt").read_text().splitlines():
        m = re.match(r"B=(\d+) S=(\d+): (.*)$", line)
        if m:
            for name, ms in re.findall(r"\s*([^,]+?) ([\d.]+) ms", m.group(3)):
                add(int(m.group(1)), int(m.group(2)), name, float(ms))
    extra = _load(results / "window_cpu_b4_s8192.json")
    for row in extra["rows"]:
        add(row["batch"], row["seq"], row["variant"], row["median_ms"])
    for variants in panels.values():
        for points in variants.values():
            points.sort()
    meta = extra["meta"]
    note = (f"machine: {_machine(meta['machine'])}; onnxruntime {meta['onnxruntime']}, {meta['threads']} threads, "
            f"{meta['rounds']} interleaved rounds, medians; {meta['heads']} heads x {meta['head_size']}, "
            f"window {meta['window']}, fp32")
    return {"panels": panels, "window": meta["window"], "note": note,
            "sources": ["window_cpu_sweep.txt", "window_cpu_b4_s8192.json"]}


def _machine(m) -> str:
    """A results file's machine: a string, ``harness.machine()`` (cpu, isa) or the older (cpu_model, simd)."""
    if isinstance(m, str):
        return m
    return f"{m.get('cpu', m.get('cpu_model'))} ({'/'.join(m.get('isa', m.get('simd', [])))})"


INT8_VARIANTS = ["tfgraph cpu-int8", "ort dynamic (defaults)", "ort dynamic MatMul per-channel",
                 "ort static QDQ per-channel"]


def precision_series(results: Path) -> dict:
    """Per model and shape: each int8 recipe's (median ms, sentence cosine mean); fp32's ms."""
    data = _load(results / "precision_cpu.json")
    panels = {}
    for model, entry in data["models"].items():
        for shape, timings in entry["timings"].items():
            panels[f"{model}, {shape}"] = {
                "fp32_ms": timings["fp32 (tfgraph cpu-fp32)"]["median_ms"],
                "points": {v: {"latency_ms": timings[v]["median_ms"], "cosine": entry["variants"][v]["cosine_mean"]}
                           for v in INT8_VARIANTS if v in timings and v in entry["variants"]}}
    m = data["machine"]
    isa = "/".join(m["isa"]) + ("" if any("vnni" in i or "amx" in i for i in m["isa"]) else ", no VNNI/AMX")
    note = (f"{data['date'][:10]}; machine: {m['cpu']} ({isa}), "
            f"{m['usable_cores']} usable cores; {data['rounds']} interleaved rounds, medians")
    return {"panels": panels, "note": note, "sources": ["precision_cpu.json"]}


FUSION_TOOLS = {"ort-transformers": "onnxruntime transformers optimizer",
                "onnxscript": "onnxscript optimize_for_ort", "tfgraph": "tfgraph cpu-fp32"}


def fusion_series(results: Path) -> dict:
    """Per exporter, architecture and tool: fused attention ops and the export's attention blocks."""
    data = _load(results / "fusion_cpu.json")
    panels: dict = {}
    for r in data["results"]:
        for exporter, builds in r["builds"].items():
            found = builds["tfgraph"]["attention"]["found"]
            panels.setdefault(exporter, {})[r["model"]] = {
                tool: {"fused": builds[tool].get("fused_attention"), "found": found,
                       "error": builds[tool].get("error")} for tool in FUSION_TOOLS}
    m = data["machine"]
    note = (f"{data['date'][:10]}; machine: {_machine(m)}, {m['usable_cores']} usable "
            f"cores; onnxruntime {data['versions']['onnxruntime']}, onnxscript {data['versions']['onnxscript']}")
    return {"panels": panels, "note": note, "sources": ["fusion_cpu.json"]}


def pipeline_series(results: Path) -> dict:
    """Per (model, K): measured and roofline-estimated ms of each stage, and both balances."""
    data = _load(results / "pipeline_cpu.json")
    panels = {f"{b['model']}, K={b['K']}": {
        "measured_ms": b["stage_ms"], "estimated_ms": b["stage_estimate_ms"],
        "measured_balance": b["measured_balance"], "estimated_balance": b["estimated_balance"]}
        for b in data["balance"]}
    cores = {t["cores"] for t in data.get("throughput", []) if "cores" in t}
    note = "machine: shared CPU" + (f", {cores.pop()} cores" if len(cores) == 1 else "") + \
        "; estimate: roofline at b2 s128 (cost model); measured: stage latency"
    return {"panels": panels, "note": note, "sources": ["pipeline_cpu.json"]}


CHARTS = {"window_attention_latency": window_series, "int8_accuracy_latency": precision_series,
          "attention_fusion_coverage": fusion_series, "pipeline_stage_balance": pipeline_series}


def series(results: Path = RESULTS) -> tuple[dict, dict]:
    """(chart name -> plotted data, chart name -> why skipped)."""
    out, skipped = {}, {}
    for name, fn in CHARTS.items():
        try:
            out[name] = fn(results)
        except FileNotFoundError as e:
            skipped[name] = f"no results file: {Path(e.filename).name}"
    return out, skipped


# --- drawing ----------------------------------------------------------------------------------

def _finish(fig, plt, title, data, path):
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.text(0.01, 0.005, data["note"] + "\ndata: " + ", ".join("benchmarks/results/" + s for s in data["sources"]),
             fontsize=8, color="0.35", va="bottom")
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def draw_window(plt, data, path):
    styles = {"tfgraph cpu-fp32": dict(color="C0", marker="o", lw=2.5),
              "GQA local_window_size": dict(color="C1", marker="s"),
              "GQA causal (no window)": dict(color="C3", marker="^"),
              "MHA + dense band mask": dict(color="0.55", marker="x", ls="--")}
    fig, axes = plt.subplots(1, len(data["panels"]), figsize=(11, 4.8), sharey=True, layout="constrained")
    for ax, (panel, variants) in zip(axes, sorted(data["panels"].items())):
        for variant, points in variants.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=variant, **styles[variant])
        ax.set(xscale="log", yscale="log", title=panel, xlabel="sequence length S (tokens, log scale)")
        seqs = sorted({s for pts in variants.values() for s, _ in pts})
        ax.set_xticks(seqs, labels=[str(s) for s in seqs], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median latency (ms, log scale)")
    axes[0].legend(fontsize=9)
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    _finish(fig, plt, f"Windowed attention (window {data['window']}): tfgraph vs GroupQueryAttention, CPU",
            data, path)


def draw_precision(plt, data, path):
    styles = {"tfgraph cpu-int8": ("C0", "o"), "ort dynamic (defaults)": ("C1", "s"),
              "ort dynamic MatMul per-channel": ("C2", "D"), "ort static QDQ per-channel": ("C3", "^")}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.2), layout="constrained")
    for ax, (panel, d) in zip(axes.flat, data["panels"].items()):
        for variant, p in d["points"].items():
            color, marker = styles[variant]
            ax.scatter(p["latency_ms"], 1 - p["cosine"], s=80, color=color, marker=marker, label=variant, zorder=3)
        ax.axvline(d["fp32_ms"], color="0.4", ls=":", lw=1.5, label="fp32 latency")
        ax.set(yscale="log", title=panel, xlabel="median latency (ms)", ylabel="1 − cosine to fp32 (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=9, loc="center right")
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    _finish(fig, plt, "int8 on CPU: accuracy vs latency against onnxruntime's quantizers\n"
            "(lower left is better; accuracy: sentence-embedding / output cosine to fp32)", data, path)


def draw_fusion(plt, data, path):
    fig, axes = plt.subplots(1, len(data["panels"]), figsize=(11, 4.6), sharey=True, layout="constrained")
    width = 0.8 / len(FUSION_TOOLS)
    for ax, (exporter, models) in zip(axes, data["panels"].items()):
        for i, (tool, label) in enumerate(FUSION_TOOLS.items()):
            for j, (model, tools) in enumerate(models.items()):
                t = tools[tool]
                pct = 100 * (t["fused"] or 0) / t["found"]
                x = j + (i - 1) * width
                ax.bar(x, pct, width, color=f"C{i}", label=label if j == 0 else None,
                       hatch="//" if t["error"] else None, edgecolor="white" if t["error"] else None)
                text = f"{t['fused'] or 0}/{t['found']}"
                if t["error"]:  # the tool failed: say how, inside the (hatched or empty) bar
                    why = "optimizer crashed" if "crash" in t["error"] else "output does not load"
                    ax.text(x, pct / 2 if pct else 2, f"{text} fused, {why}" if pct else why, rotation=90,
                            ha="center", va="center" if pct else "bottom", fontsize=8,
                            bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
                else:
                    ax.text(x, pct + 1.5, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(models)), labels=list(models))
        ax.set(title=f"{exporter} export", ylim=(0, 140), xlabel="architecture (Hugging Face, SDPA attention)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("attention blocks fused (%)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    _finish(fig, plt, "Attention fusion coverage: fused attention ops / attention blocks in the export", data, path)


def draw_pipeline(plt, data, path):
    fig, axes = plt.subplots(1, len(data["panels"]), figsize=(12, 4.2), sharey=True, layout="constrained")
    for ax, (panel, d) in zip(axes, data["panels"].items()):
        k = len(d["measured_ms"])
        for off, key, label, color in ((-0.2, "estimated_ms", "estimated (roofline)", "C7"),
                                       (0.2, "measured_ms", "measured", "C0")):
            mean = sum(d[key]) / k
            ax.bar([i + off for i in range(k)], [v / mean for v in d[key]], 0.4, color=color, label=label)
        ax.axhline(1.0, color="0.3", lw=1, ls=":")
        ax.set_xticks(range(k), labels=[str(i) for i in range(k)])
        ax.set(title=f"{panel}\nbalance est. {d['estimated_balance']:.3f}, meas. {d['measured_balance']:.3f}",
               xlabel="stage")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("stage time ÷ mean stage time")
    axes[0].legend(fontsize=9, loc="lower left")
    fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
    _finish(fig, plt, "Pipeline stage balance (slowest ÷ mean; 1.0 = perfectly balanced)", data, path)


DRAW = {"window_attention_latency": draw_window, "int8_accuracy_latency": draw_precision,
        "attention_fusion_coverage": draw_fusion, "pipeline_stage_balance": draw_pipeline}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "plots", help="output folder (default: %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder to read")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    data, skipped = series(args.results)
    written = {}
    for name, d in data.items():
        path = args.out / f"{name}.png"
        DRAW[name](plt, d, path)
        written[name] = str(path)
    report = {"written": written, "skipped": skipped}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, path in written.items():
            print(f"wrote {path}")
        for name, why in skipped.items():
            print(f"skipped {name}: {why}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
