"""Ablation: latency of a target's artifact with and without extra passes, measured side by side.

    python benchmarks/ablation.py MODEL --pass pack-projections [--pass ...] --shape batch=1 --shape sequence=128
    python benchmarks/ablation.py minilm --drop lower-attention --pass pack-projections \
        --pass lower-attention:to=com.microsoft.Attention --shape batch=1 --shape sequence=512

MODEL is anything ``tfgraph compile`` takes. Variants: the target's artifact, and the
artifact of a variant pipeline: the target's passes without those named by ``--drop``,
with the ``--pass`` passes inserted before its final cleanup pass. Sessions use 2 intra-op
threads; after warm-up, rounds run every variant once in rotating order; medians and
ratios are printed (and written as JSON with ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import onnxruntime as ort

import tfgraph
from tfgraph.compiler.verify import generate_inputs, parse_shapes


def _session(path_or_bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--target", default="cpu-fp32")
    parser.add_argument("--pass", dest="passes", action="append", required=True)
    parser.add_argument("--drop", action="append", default=[], help="pass names to remove from the variant's pipeline")
    parser.add_argument("--shape", action="append")
    parser.add_argument("--exporter", default="dynamo")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        from tfgraph.passes import PassSpec
        from tfgraph.targets.profile import phases

        target = tfgraph.get_target(args.target)
        kept = tuple(p for p in target.passes if p.name not in args.drop)
        variant = tfgraph.Target(
            name=f"{target.name}-variant",
            description="ablation variant",
            providers=target.providers,
            precision=target.precision,
            phases=phases(rewrite=kept[:-1] + tuple(PassSpec.parse(p) for p in args.passes) + kept[-1:]),
            tolerance=target.tolerance,
            session_options=target.session_options,
        )
        base = tfgraph.compile(args.model, target, output=f"{tmp}/base", exporter=args.exporter)
        tfgraph.compile(args.model, variant, output=f"{tmp}/extra", exporter=args.exporter)
        feeds = generate_inputs(base.model, parse_shapes(args.shape))
        variants = {
            args.target: _session(f"{tmp}/base/model.onnx", args.threads),
            f"{args.target} {' '.join('-' + d for d in args.drop)} + {' + '.join(args.passes)}": _session(
                f"{tmp}/extra/model.onnx", args.threads
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for name in names:
            for _ in range(args.warmup):
                variants[name].run(None, feeds)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name].run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians[names[0]]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    print(f"model {args.model} ({args.exporter}), inputs {shapes}, {args.rounds} interleaved rounds, {args.threads} threads")
    for name in names:
        print(f"  {name:<60} median {medians[name]:8.2f} ms   ratio {medians[name] / reference:.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "inputs": shapes, "medians_ms": medians, "times_ms": times}, f, indent=2)


if __name__ == "__main__":
    main()
