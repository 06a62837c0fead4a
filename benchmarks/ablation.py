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
import pathlib
import sys
import tempfile

import tfgraph
from tfgraph.compiler.verify import generate_inputs, parse_shapes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py


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
            args.target: harness.session(f"{tmp}/base/model.onnx", args.threads),
            f"{args.target} {' '.join('-' + d for d in args.drop)} + {' + '.join(args.passes)}": harness.session(
                f"{tmp}/extra/model.onnx", args.threads
            ),
        }
        names = list(variants)
        seconds = harness.interleave({n: (lambda s=s: s.run(None, feeds)) for n, s in variants.items()},
                                     args.rounds, args.warmup)
    times = {name: [t * 1000 for t in ts] for name, ts in seconds.items()}
    medians = {name: harness.median(t) for name, t in times.items()}
    ratio = harness.ratios(seconds, names[0])
    machine = harness.machine()
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    print(f"model {args.model} ({args.exporter}), inputs {shapes}, {args.rounds} interleaved rounds, {args.threads} threads")
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, ISA {'/'.join(machine['isa']) or '?'}, "
          f"load {machine['load_average_1m']:.1f}")
    for name in names:
        print(f"  {name:<60} median {medians[name]:8.2f} ms   p90 {harness.p90(times[name]):8.2f} ms   ratio {ratio[name]:.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "inputs": shapes, "medians_ms": medians, "times_ms": times,
                       "machine": machine}, f, indent=2)


if __name__ == "__main__":
    main()
