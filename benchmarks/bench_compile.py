"""Compile time and peak memory of real-size models (issue 20): ``tfgraph.compile`` of MiniLM, BERT-base
and GPT-2 base on cpu-fp32 and cpu-int8, verification on, export excluded (a pre-exported ``.onnx``)
and included (the built-in name, exported inside the compile), each in a fresh process.

With ``--against REV`` the same runs are made on the code of another revision (a ``git worktree`` of
REV, imported in the child process instead of this tree), interleaved with this tree's runs so both
see the same machine load, and the report puts them side by side.

    python benchmarks/bench_compile.py [--models minilm,bert-base,gpt-base] [--targets cpu-fp32,cpu-int8]
        [--modes excluded,included] [--against REV] [--exports DIR] [--timeout 1200]
        [--out benchmarks/results/compile_cpu]

Per run: ``compile_s`` (the ``tfgraph.compile`` call), ``process_s`` (the child process: imports and
writing the artifact too), ``peak_rss`` (the child's peak resident memory: ``ru_maxrss``, or the
manifest's ``compile.peak_rss_bytes`` where that is larger: the compile resets the kernel's high-water
mark between its steps to measure each), the model's weight bytes, node counts and the verification's
max abs error. cpu-int8 calibrates on 32 real sentences (``tfgraph.models.sentences``: CALIBRATION +
the first 16 of HELD_OUT), tokenized with MiniLM's tokenizer (the built-in BERT/GPT have none; the
ids fall inside every model's vocabulary). Exports are made once, with this tree, and shared by both
revisions. Writes ``<out>.json`` and ``<out>.md`` (CPU model and flags, load average, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


# --- child: one compile in a fresh process, on the code of ``root`` ------------------------------------
def _use_tree(root: pathlib.Path) -> None:
    """Import ``tfgraph`` (and its mapped subpackages: passes/, targets/, models/) from ``root``."""
    import importlib.util
    import tomllib

    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}

    class TreeFinder:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            folder = mapping.get(fullname)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, TreeFinder)


def child(root: str, model: str, target: str, calibration: str, tokenizer: str, out_json: str) -> None:
    import resource

    _use_tree(pathlib.Path(root))
    import tfgraph

    assert pathlib.Path(tfgraph.__file__).resolve().is_relative_to(pathlib.Path(root).resolve()), tfgraph.__file__
    extra = {"calibration": calibration, "tokenizer": tokenizer} if target.endswith("int8") else {}
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        start = time.perf_counter()
        artifact = tfgraph.compile(model, target, output=pathlib.Path(tmp) / "out", **extra)
        compile_s = time.perf_counter() - start
    manifest = artifact.manifest
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cost = manifest.get("compile")
    result = {
        "compile_s": compile_s,
        "ru_maxrss_bytes": peak,
        "peak_rss_bytes": max(peak, cost["peak_rss_bytes"]) if cost else peak,
        "weight_bytes": manifest["summary"]["bytes_before"],
        "nodes_before": manifest["summary"]["nodes_before"],
        "nodes_after": manifest["summary"]["nodes_after"],
        "max_abs": {k: v["max_abs"] for k, v in manifest["verification"]["outputs"].items()},
        "passes_modified": [r["name"] for r in manifest["passes"] if r["modified"]],
        "compile": cost,
    }
    pathlib.Path(out_json).write_text(json.dumps(result))


# --- parent ------------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count(), "model": platform.processor() or "?"}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["simd_flags"] = [f for f in SIMD_FLAGS if f in flags]
            break
    return info


def run_one(root: pathlib.Path, model: str, target: str, calibration: str, tokenizer: str, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", str(root), model, target, calibration,
           tokenizer, out_json]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s"}
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(pathlib.Path(out_json).read_text())
    os.unlink(out_json)
    return {"status": "ok", "process_s": process_s, **result}


def export_models(models: list[str], folder: pathlib.Path) -> dict[str, pathlib.Path]:
    from tfgraph.compiler.export import export

    paths = {}
    for name in models:
        path = folder / f"{name}.onnx"
        if not path.exists():
            print(f"exporting {name} → {path}", file=sys.stderr)
            export(name, path)
        paths[name] = path
    return paths


def calibration_file(folder: pathlib.Path) -> tuple[str, str]:
    from tfgraph.models import minilm_path
    from tfgraph.models.sentences import CALIBRATION, HELD_OUT

    path = folder / "calibration32.txt"
    sentences = list(CALIBRATION) + list(HELD_OUT[:32 - len(CALIBRATION)])
    assert len(sentences) == 32
    path.write_text("\n".join(sentences) + "\n")
    return str(path), str(minilm_path())


def worktree(rev: str) -> pathlib.Path:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-compile-rev-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True)
    return folder


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_report(results: list[dict], meta: dict, out: pathlib.Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    revs = meta["revisions"]
    lines = [
        "# Compile time and peak memory (issue 20)",
        "",
        f"CPU: {meta['cpu']['model']} ({meta['cpu']['logical_cpus']} logical CPUs, {', '.join(meta['cpu'].get('simd_flags', []))}); "
        f"load average {meta['load_start']} at start, {meta['load_end']} at end (a shared machine: other jobs ran).",
        f"Versions: {meta['versions']}.",
        f"Revisions: {', '.join(f'{k} = {v}' for k, v in revs.items())}.",
        "",
        "Command: `python benchmarks/bench_compile.py " + " ".join(meta["argv"]) + "`. Each run a fresh process: "
        "`tfgraph.compile(MODEL, TARGET, output=...)` with verification on (the default); *excluded*: MODEL is the "
        "exported `.onnx` (exported once, shared by both revisions), *included*: the built-in name (exported inside "
        "the compile). compile s = the `compile` call; process s = the whole child process (imports too); peak = the "
        "child's peak RSS; ×w = peak / the input model's weight bytes. cpu-int8 calibrates on 32 sentences.",
        "",
    ]
    names = list(revs)
    head = "| model | target | export | weights MiB | " + " | ".join(
        f"{n} compile s | {n} process s | {n} peak MiB (×w)" for n in names) + " | nodes after | max abs err |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    keys = []
    for r in results:
        key = (r["model"], r["target"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        row = {r["revision"]: r for r in results if (r["model"], r["target"], r["mode"]) == key}
        first = next((r for r in row.values() if r.get("status") == "ok"), None)
        weights = first["weight_bytes"] if first else 0
        cells = []
        for n in names:
            r = row.get(n)
            if r is None or r.get("status") != "ok":
                cells.append(f"{(r or {}).get('status', '—')} | | ")
                continue
            cells.append(f"{r['compile_s']:.1f} | {r['process_s']:.1f} | {mib(r['peak_rss_bytes'])} "
                         f"({r['peak_rss_bytes'] / max(weights, 1):.2f})")
        nodes = " / ".join(str(row[n]["nodes_after"]) for n in names if row.get(n, {}).get("status") == "ok")
        err = " / ".join(f"{max(row[n]['max_abs'].values()):.2e}" for n in names if row.get(n, {}).get("status") == "ok")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mib(weights)} | " + " | ".join(cells) + f" | {nodes} | {err} |")
    phases = [r for r in results if r.get("status") == "ok" and r.get("compile")]
    if phases:
        lines += ["", "## Where the time and memory go (this tree's manifest `compile` section)", "",
                  "| model | target | export | " + " | ".join(["load", "reference", "rewrite", "precision", "final_check"])
                  + " | phases (time s, sessions, peak MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in phases:
            steps = {e["name"]: e for e in r["compile"]["steps"]}
            cells = [f"{steps[n]['time_s']:.1f} s, {mib(steps[n]['peak_rss_bytes'])}" if n in steps else "—"
                     for n in ("load", "reference", "rewrite", "precision", "final_check")]
            ph = "; ".join(f"{e['name']} {e['time_s']:.1f} s, {e.get('sessions', 0)}, {mib(e['peak_rss_bytes'])}"
                           for e in r["compile"]["phases"])
            lines.append(f"| {r['model']} | {r['target']} | {r['mode']} | " + " | ".join(cells) + f" | {ph} |")
    md = out.with_suffix(".md")
    notes = md.read_text().partition(NOTES)[2] if md.exists() and NOTES in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{NOTES}{notes}" if notes else ""))


NOTES = "<!-- notes: kept when the tables above are rewritten -->"


def versions() -> str:
    import importlib.metadata as md

    found = [f"python {platform.python_version()}"]
    for name in ("onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy", "torch", "transformers"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,gpt-base")
    parser.add_argument("--targets", default="cpu-fp32,cpu-int8")
    parser.add_argument("--modes", default="excluded,included")
    parser.add_argument("--against", default=None, help="a git revision to compare with (run from a worktree)")
    parser.add_argument("--exports", default=str(pathlib.Path(tempfile.gettempdir()) / "tfgraph-bench-compile"))
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_cpu"))
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.exports)
    folder.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    paths = export_models(models, folder) if "excluded" in args.modes else {}
    calibration, tokenizer = calibration_file(folder)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    trees, revisions, cleanup = {}, {}, None
    if args.against:
        cleanup = trees["before"] = worktree(args.against)
        revisions["before"] = args.against
    trees["after"] = ROOT
    revisions["after"] = f"this tree ({head}{' + uncommitted changes' if dirty else ''})"
    meta = {"cpu": cpu_info(), "load_start": [round(x, 2) for x in os.getloadavg()], "versions": versions(),
            "revisions": revisions, "argv": sys.argv[1:] if argv is None else argv}
    results = []
    try:
        for model in models:
            for target in args.targets.split(","):
                for mode in args.modes.split(","):
                    source = str(paths[model]) if mode == "excluded" else model
                    for name in (["before", "after"] if args.against else ["after"]):
                        print(f"{name}: {model} {target} export {mode}", file=sys.stderr, flush=True)
                        r = run_one(trees[name], source, target, calibration, tokenizer, args.timeout)
                        results.append({"model": model, "target": target, "mode": mode, "revision": name, **r})
                        print(f"  {r.get('status')} compile {r.get('compile_s', 0):.1f} s, peak "
                              f"{r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB", file=sys.stderr, flush=True)
                        meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
                        write_report(results, meta, pathlib.Path(args.out))
    finally:
        if cleanup is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(cleanup)], capture_output=True)
    print(pathlib.Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:8])
    else:
        main()
