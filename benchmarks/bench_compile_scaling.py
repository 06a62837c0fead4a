"""Compile time against graph size: synthetic chains of n ``Add`` nodes (issue 15, item 18).

Two chains, neither of which constant folding can collapse: ``const`` adds a distinct small
initializer at each step (x + c1 + c2 + ...), ``input`` adds the graph input again (x + x + x ...).
Each size is compiled for cpu-fp32 with ``tfgraph compile`` in a fresh process, verification on and
off, and the script reports per size: the wall time of the command (process start, load, reference
run, passes, instruments, save), the sum of the manifest's per-pass times (``passes[*].time_s``) and
the slowest passes; and per pair of sizes n → 10n the ratio t(10n)/t(n) next to the n·log n ratio
10·log(10n)/log(n) (linear is 10, quadratic 100). Fixed costs (process start ~5 s, imports) make
the wall-time ratio of small sizes understate growth; the pass-time ratio has less of them.

    python benchmarks/bench_compile_scaling.py [--sizes 1000,10000,100000] [--kinds const,input]
        [--verify both|on|off] [--timeout 1800] [--out benchmarks/results/compile_scaling]

Writes ``<out>.json`` and ``<out>.md`` (CPU model and flags, load average, package versions). A run
that exceeds ``--timeout`` is recorded as such, with the time it was given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

ROOT = pathlib.Path(__file__).resolve().parents[1]


def chain_model(n: int, kind: str) -> onnx.ModelProto:
    nodes, inits = [], []
    current = "x"
    for i in range(n):
        if kind == "const":
            inits.append(numpy_helper.from_array(np.full((4,), (i % 97 + 1) * 1e-3, np.float32) + i * 1e-6, f"c{i}"))
            other = f"c{i}"
        else:
            other = "x"
        nodes.append(helper.make_node("Add", [current, other], [f"v{i}"], name=f"add{i}"))
        current = f"v{i}"
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tfgraph", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_compile(model: pathlib.Path, out: pathlib.Path, verify: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "tfgraph", "compile", str(model), "-t", "cpu-fp32", "-o", str(out), "--force",
           "--quiet", *([] if verify else ["--no-verify"])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": "timeout", "wall_s": round(time.perf_counter() - start, 2), "timeout_s": timeout}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": f"exit {proc.returncode}", "wall_s": round(wall, 2), "stderr": stderr.strip()[-500:]}
    manifest = json.loads((out / "manifest.json").read_text())
    passes = manifest["passes"]
    by_name: dict[str, float] = {}
    for p in passes:
        by_name[p["name"]] = by_name.get(p["name"], 0.0) + p["time_s"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {
        "status": "ok",
        "wall_s": round(wall, 2),
        "passes_s": round(sum(p["time_s"] for p in passes), 2),
        "top_passes": {k: round(v, 3) for k, v in top},
        "modified_passes": sum(1 for p in passes if p["modified"]),
    }


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for a in rows:
        for b in rows:
            if (b["kind"], b["verify"]) != (a["kind"], a["verify"]) or b["nodes"] != 10 * a["nodes"]:
                continue
            if a["status"] != "ok" or b["status"] != "ok":
                continue
            n = a["nodes"]
            out.append({
                "kind": a["kind"], "verify": a["verify"], "from": n, "to": b["nodes"],
                "wall_ratio": round(b["wall_s"] / a["wall_s"], 2),
                "passes_ratio": round(b["passes_s"] / a["passes_s"], 2),
                "nlogn_ratio": round(10 * math.log(10 * n) / math.log(n), 2),
            })
    return out


def markdown(result: dict) -> str:
    cpu, load = result["cpu"], result["load_average"]
    lines = [
        "# Compile time against graph size (cpu-fp32, chains of Add)",
        "",
        f"CPU: {cpu.get('cpu', cpu.get('model'))} ({cpu.get('usable_cores', cpu.get('logical_cpus'))} usable CPUs, "
        f"{', '.join(cpu.get('isa', cpu.get('simd_flags', [])))}); "
        f"load average {load['start']} at start, {load['end']} at end (a shared machine: other jobs ran).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".",
        "",
        f"Command per row: `{result['command']}` in a fresh process; wall = the whole command, "
        "passes = sum of the manifest's `passes[*].time_s`.",
        "",
        "| chain | nodes | verify | status | wall s | passes s | slowest passes (s) |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for r in result["runs"]:
        top = ", ".join(f"{k} {v:.2f}" for k, v in r.get("top_passes", {}).items())
        status = r["status"] if r["status"] != "timeout" else f"timeout ({r['timeout_s']:.0f} s)"
        lines.append(f"| {r['kind']} | {r['nodes']:,} | {'on' if r['verify'] else 'off'} | {status} | {r['wall_s']:.1f} | "
                     f"{r.get('passes_s', float('nan')):.2f} | {top} |")
    lines += ["", "| chain | verify | n → 10n | wall t(10n)/t(n) | passes t(10n)/t(n) | n·log n ratio |",
              "|---|---|---|---:|---:|---:|"]
    for q in result["ratios"]:
        lines.append(f"| {q['kind']} | {'on' if q['verify'] else 'off'} | {q['from']:,} → {q['to']:,} | "
                     f"{q['wall_ratio']} | {q['passes_ratio']} | {q['nlogn_ratio']} |")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--kinds", default="const,input")
    parser.add_argument("--verify", choices=("both", "on", "off"), default="both")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_scaling"))
    parser.add_argument("--note", action="append", default=[], help="a line added to the report")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.verify]
    result = {
        "cpu": harness.machine(), "versions": versions(), "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "command": "tfgraph compile MODEL -t cpu-fp32 -o OUT --force --quiet [--no-verify]", "runs": [],
        "notes": list(args.note),
    }
    work = pathlib.Path(tempfile.mkdtemp(prefix="tfgraph-scaling-"))
    try:
        for kind in kinds:
            for n in sizes:
                model = work / f"chain_{kind}_{n}.onnx"
                onnx.save(chain_model(n, kind), model)
                for verify in modes:
                    row = {"kind": kind, "nodes": n, "verify": verify,
                           **run_compile(model, work / "out", verify, args.timeout)}
                    result["runs"].append(row)
                    top = ", ".join(f"{k} {v:.2f}" for k, v in row.get("top_passes", {}).items())
                    print(f"{kind:6s} n={n:>7,} verify={'on ' if verify else 'off'} {row['status']:8s} "
                          f"wall {row['wall_s']:8.1f} s  passes {row.get('passes_s', float('nan')):8.2f} s  {top}",
                          flush=True)
                shutil.rmtree(work / "out", ignore_errors=True)
                model.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratios"] = ratios(result["runs"])
    for q in result["ratios"]:
        print(f"{q['kind']:6s} verify={'on ' if q['verify'] else 'off'} {q['from']:>7,} -> {q['to']:>7,}: "
              f"wall x{q['wall_ratio']}, passes x{q['passes_ratio']} (n log n: x{q['nlogn_ratio']}, linear x10)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
