"""Windowed attention on CPU: tfgraph's lowering vs dense fused attention and GQA's local window.

    python benchmarks/bench_window.py                      # S = 512 … 8192, batch 1 and 4 (~30 min)
    python benchmarks/bench_window.py --seq 512 2048 --batch 1 --rounds 20
    python benchmarks/bench_window.py --seq 8192 --batch 1 --variants "GQA causal (no window)" --against b8a320b \
        --no-memory --out benchmarks/results/window_cpu_b1_s8192   # the blocked form before/after, same rounds

One attention layer (12 heads × 64, causal sliding window of 256 keys, no padding), the
neutral ``tfgraph.Attention`` with the window found by ``classify-attention-masks``,
lowered by ``lower-attention`` into each variant:

* ``tfgraph cpu-fp32``: what the target does (an ``If`` on the sequence length: the
  blocked form with its tiles as one MultiHeadAttention batch from the crossover on,
  GroupQueryAttention ``local_window_size`` below);
* ``blocked (MHA tiles)`` / ``blocked (standard ops)``: the blocked form always;
* ``GQA local_window_size``: onnxruntime's fused op with the window (exact, dense work on CPU);
* ``GQA causal (no window)``: the best dense fused op, the cost reference (it ignores the window);
* ``MHA + dense band mask``: MultiHeadAttention with the exact (1, 1, S, S) mask;
* ``dense unfused``: the neutral op's standard-ONNX definition (S <= 2048 only).

Per (batch, S): all sessions built first, warm-up, then ``--rounds`` round-robin rounds
(start rotating), 2 intra-op threads; medians, ratios to tfgraph's, growth per doubling
of S; peak memory for batch 1: in a fresh process, the growth of the resident set's
high-water mark during the session's first run (reset through /proc/self/clear_refs).
Results: ``benchmarks/results/window_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common is used below; importing onnx_ir alone does not load it
import onnxruntime as ort

from tfgraph import ops
from tfgraph.passes import blocked_attention as blocked
from tfgraph.passes.attention_lowering import LowerAttentionPass
from tfgraph.targets.cpu import WINDOW_CROSSOVER

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

HEADS, HEAD_SIZE, WINDOW = 12, 64, 256
HIDDEN = HEADS * HEAD_SIZE
RESULTS = pathlib.Path(__file__).parent / "results"

VARIANTS = {
    "tfgraph cpu-fp32": dict(to="com.microsoft.MultiHeadAttention", window_to="auto",
                             window_kernel="com.microsoft.MultiHeadAttention", blocked_min_sequence=WINDOW_CROSSOVER),
    "blocked (MHA tiles)": dict(window_to="blocked", window_kernel="com.microsoft.MultiHeadAttention"),
    "blocked (standard ops)": dict(window_to="blocked", window_kernel="standard"),
    "GQA local_window_size": dict(window_to="auto", blocked_min_sequence=1 << 40),
    "GQA causal (no window)": "gqa-causal",
    "MHA + dense band mask": dict(to="com.microsoft.MultiHeadAttention"),
    "dense unfused": dict(to="function"),
}
DENSE_UNFUSED_MAX = 2048


def neutral_model(kind: str = "window") -> ir.Model:
    """q, k, v (B, S, 768) → tfgraph.Attention with the exact dense band mask as its bias."""
    q, k, v = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "sequence", HIDDEN]))
               for n in "qkv")
    nodes: list[ir.Node] = []
    left = None if kind == "causal" else WINDOW - 1
    bias = blocked.dense_mask(nodes, q, left=left, right=0, key_padding=None)
    attrs = {"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5, "mask_kind": kind}
    if kind == "window":
        attrs.update(window_left=WINDOW - 1, window_right=0)
    node = ir.node("Attention", [q, k, v, bias], attributes=attrs, domain=ops.DOMAIN)
    node.outputs[0].name = "y"
    nodes.append(node)
    model = ir.Model(ir.Graph([q, k, v], node.outputs, nodes=nodes, opset_imports={"": 18}), ir_version=9)
    ops.ensure_defined(model, "Attention")
    return model


def blocked_form_at(revision: str):
    """``passes/blocked_attention.py`` as it was at git ``revision``, as a module."""
    import importlib.util
    import tempfile

    root = pathlib.Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:passes/blocked_attention.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "blocked_attention_at.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"tfgraph.passes.blocked_attention_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(variant: str) -> bytes:
    options = VARIANTS[variant]
    if isinstance(options, tuple):  # ("at", revision): tfgraph cpu-fp32 with the blocked form of a git revision
        from tfgraph.passes import attention_lowering, attention_lowering_windows

        modules = (attention_lowering, attention_lowering_windows)  # both lower through the blocked form
        current = [m.blocked for m in modules]
        for m in modules:
            m.blocked = blocked_form_at(options[1])
        try:
            VARIANTS[variant] = VARIANTS["tfgraph cpu-fp32"]
            return build(variant)
        finally:
            VARIANTS[variant] = options
            for m, original in zip(modules, current):
                m.blocked = original
    if options == "gqa-causal":
        model = neutral_model("causal")
        LowerAttentionPass(causal_to="com.microsoft.GroupQueryAttention")(model)
    else:
        model = neutral_model()
        LowerAttentionPass(**options)(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    return ir.serde.serialize_model(model).SerializeToString()


def feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32) for n in "qkv"}


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_measuring_peak(variant: str, batch: int, seq: int) -> int:
    """In this process: build ``variant``'s session, reset the resident high-water mark
    (Linux ``/proc/self/clear_refs``), run once; the peak above the resident size before the run."""
    data, inputs = build(variant), feeds(batch, seq)
    s = harness.session(data, 2)
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    s.run(None, inputs)
    return _status("VmHWM") - before


def peak_memory(variant: str, batch: int, seq: int) -> int:
    """Peak memory (bytes) of one first run of ``variant``, measured in a fresh process."""
    code = "import sys; sys.path.insert(0, %r); import bench_window as b; print(b.run_measuring_peak(%r, %d, %d))" % (
        str(pathlib.Path(__file__).parent), variant, batch, seq)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these (tfgraph cpu-fp32 always)")
    parser.add_argument("--against", metavar="REV", help="also tfgraph cpu-fp32 with the blocked form of git REV "
                        "(passes/blocked_attention.py at REV), timed in the same rounds")
    parser.add_argument("--out", default=str(RESULTS / "window_cpu"))
    args = parser.parse_args()

    started = time.time()
    if args.variants:
        for name in [n for n in VARIANTS if n not in args.variants and n not in ("tfgraph cpu-fp32", "dense unfused")]:
            del VARIANTS[name]
    if args.against:
        VARIANTS[f"tfgraph cpu-fp32 @{args.against}"] = ("at", args.against)
    built = {name: build(name) for name in VARIANTS}
    rows = []
    # Exactness first: every exact variant against the dense unfused definition.
    check = feeds(2, 600)
    reference = harness.session(built["dense unfused"], args.threads).run(None, check)[0]
    errors = {}
    for name, data in built.items():
        if name == "GQA causal (no window)":
            continue
        got = harness.session(data, args.threads).run(None, check)[0]
        errors[name] = float(np.abs(got - reference).max())
    print("max abs error vs dense unfused (B=2, S=600):", errors, flush=True)

    for batch in args.batch:
        for seq in args.seq:
            names = [n for n in VARIANTS if not (n == "dense unfused" and (seq > DENSE_UNFUSED_MAX or args.variants))]
            sessions = {n: harness.session(built[n], args.threads) for n in names}
            inputs = feeds(batch, seq)
            times = harness.interleave({n: (lambda s=s: s.run(None, inputs)) for n, s in sessions.items()},
                                       args.rounds, args.warmup)
            ratio = harness.ratios(times, "tfgraph cpu-fp32")
            for n in names:
                rows.append({"batch": batch, "seq": seq, "variant": n, "median_ms": harness.median(times[n], ms=True),
                             "p90_ms": harness.p90(times[n], ms=True), "ratio_to_tfgraph": ratio[n]})
            del sessions
            print(f"B={batch} S={seq}: " + ", ".join(f"{n} {harness.median(times[n], ms=True):.1f} ms" for n in names),
                  flush=True)

    for row in rows:
        half = next((r for r in rows if r["variant"] == row["variant"] and r["batch"] == row["batch"]
                     and r["seq"] * 2 == row["seq"]), None)
        row["growth_per_doubling"] = row["median_ms"] / half["median_ms"] if half else None

    memory = {}
    if not args.no_memory:
        for seq in args.seq:
            for n in [v for v in ("tfgraph cpu-fp32", "GQA local_window_size", "GQA causal (no window)",
                                  "MHA + dense band mask") if v in VARIANTS]:
                memory[f"{n} @ S={seq}"] = peak_memory(n, 1, seq)
                print(f"peak memory {n} S={seq}: {memory[f'{n} @ S={seq}'] / 2**20:.0f} MiB", flush=True)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": harness.machine(),
        "onnxruntime": ort.__version__,
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "heads": HEADS, "head_size": HEAD_SIZE, "window": WINDOW, "crossover": WINDOW_CROSSOVER,
        "errors_vs_dense_unfused": errors, "minutes": (time.time() - started) / 60,
        "arguments": "".join(f" {a}" if a.startswith("-") or " " not in a else f' "{a}"' for a in sys.argv[1:]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "peak_memory_bytes": memory}, indent=2))
    out.with_suffix(".md").write_text(render(meta, rows, memory, args))
    print(f"wrote {out}.md/.json in {meta['minutes']:.1f} min")


def render(meta: dict, rows: list[dict], memory: dict, args) -> str:
    lines = [
        "# Windowed attention on CPU: tfgraph's lowering vs dense fused attention",
        "",
        f"- date: {meta['date']}; onnxruntime {meta['onnxruntime']}; {meta['threads']} intra-op threads; "
        f"{meta['rounds']} interleaved rounds after {meta['warmup']} warm-up; medians",
        f"- one attention layer: {HEADS} heads × {HEAD_SIZE}, causal sliding window of {WINDOW} keys, fp32, no padding;"
        f" cpu-fp32 switches to the blocked form at S ≥ {WINDOW_CROSSOVER}",
        "- max abs error vs the dense unfused definition (B=2, S=600): "
        + ", ".join(f"{k} {v:.1e}" for k, v in meta["errors_vs_dense_unfused"].items()),
        "- *ratio* = median / tfgraph cpu-fp32's median (> 1: slower than tfgraph); *growth* = median / median at S/2",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['usable_cores']} usable cores, ISA "
        f"{'/'.join(meta['machine']['isa']) or '?'}; load average at the end (1, 5, 15 min): "
        f"{', '.join(map(str, meta.get('load_average', [])))}",
        f"- reproduce: `python benchmarks/bench_window.py{meta.get('arguments', '')}` ({meta['minutes']:.0f} min here)",
        "",
        "| batch | S | variant | median ms | p90 ms | ratio | growth |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        growth = f"{r['growth_per_doubling']:.2f}" if r["growth_per_doubling"] else ""
        lines.append(f"| {r['batch']} | {r['seq']} | {r['variant']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['ratio_to_tfgraph']:.2f} | {growth} |")
    if memory:
        lines += ["", "Peak memory of the first run above the resident size before it (batch 1, fresh process):", "",
                  "| variant @ S | MiB |", "|---|---:|"]
        lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in memory.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
