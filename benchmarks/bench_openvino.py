"""MiniLM on OpenVINO: tfgraph's openvino-* artifacts vs plain OpenVINO running the raw export.

For each exporter, exports the built-in real all-MiniLM-L6-v2 (``tfgraph export minilm``), compiles it
for openvino-fp32 / -bf16 / -int8, and times OpenVINO CPU on each artifact against OpenVINO on the raw
export in the same precision (``INFERENCE_PRECISION_HINT`` f32 or bf16; int8 against the raw export in
f32, the precision that export runs in). Runs are interleaved (alternating order per round) after
warm-up; medians and ratios (artifact / raw) are printed as a Markdown table.

The runtime is the OpenVINO EP plugin where it lists a device, else plain OpenVINO (this AMD host:
see targets/openvino.py).

    python benchmarks/bench_openvino.py --runs 20 [--exporters dynamo torchscript] [--out results.md]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py


def _feeds(compiled, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        name = port.get_any_name()
        if "mask" in name:
            feeds[name] = np.ones((batch, seq), np.int64)
        elif "type" in name:
            feeds[name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[name] = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    return feeds


def bench(pairs: dict, shapes, runs: int, warmup: int = 3) -> dict:
    """pairs: label -> compiled OpenVINO model; returns {(label, batch): [seconds...]}."""
    times = {}
    for batch, seq in shapes:
        requests = {label: m.create_infer_request() for label, m in pairs.items()}
        feeds = {label: _feeds(m, batch, seq) for label, m in pairs.items()}
        runners = {label: (lambda req=req, f=feeds[label]: req.infer(f)) for label, req in requests.items()}
        for label, samples in harness.interleave(runners, runs, warmup).items():
            times[(label, batch)] = samples
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--exporters", nargs="+", default=["dynamo"])
    parser.add_argument("--profiles", nargs="+", default=["openvino-fp32", "openvino-bf16", "openvino-int8"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--work", default=None, help="folder for exports and artifacts (default: a temp folder)")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args(argv)

    import openvino as ov

    import tfgraph
    from tfgraph.compiler.export import export
    from tfgraph.targets import get_target
    from tfgraph.targets import openvino as ovt

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-ov-"))
    work.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    shapes = [(b, args.seq) for b in args.batches]
    machine = harness.machine()
    lines = [
        f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, ISA {'/'.join(machine['isa']) or '?'}, "
        f"load average {machine['load_average_1m']:.1f}",
        "",
        f"OpenVINO {ov.__version__} CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}, "
        f"capabilities {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}), {args.runs} interleaved runs "
        f"after 3 warm-up, s{args.seq}; ratio = tfgraph artifact / raw export, same precision hint",
        "",
        "| exporter | profile | precision run | batch | raw export ms | tfgraph ms | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    spread: list[float] = []
    for exporter in args.exporters:
        raw = work / f"minilm-{exporter}.onnx"
        if not raw.exists():
            export("minilm", raw, exporter=exporter)
        for profile in args.profiles:
            target = get_target(profile)
            out = work / f"minilm-{exporter}-{profile}"
            if not (out / "model.onnx").exists():
                tfgraph.compile(raw, profile, output=out, force=True)
            config = ovt.openvino_config(target)
            pairs = {
                "raw": core.compile_model(str(raw), "CPU", config),
                "tfgraph": core.compile_model(str(out / "model.onnx"), "CPU", config),
            }
            ran = pairs["tfgraph"].get_property("INFERENCE_PRECISION_HINT").to_string()
            times = bench(pairs, shapes, args.runs)
            for batch, _ in shapes:
                raw_t, ours_t = times[("raw", batch)], times[("tfgraph", batch)]
                a, b = harness.median(raw_t, ms=True), harness.median(ours_t, ms=True)
                spread.append(max(harness.p90(t) / harness.median(t) for t in (raw_t, ours_t)))
                row = f"| {exporter} | {profile} | {ran} | {batch} | {a:.1f} | {b:.1f} | {b / a:.3f} |"
                lines.append(row)
                print(row, flush=True)
    if spread:
        lines += ["", f"Noise: p90/median of the rows' timings {min(spread):.2f}–{max(spread):.2f} (median {np.median(spread):.2f})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
