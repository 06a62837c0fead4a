"""Pipeline stages benchmark: stage balance and executor throughput.

1. Stage balance (slowest/mean) of the partitioner on BERT-base and GPT-2-size (`gpt-base`) for
   K = 2 and 4: the roofline estimate it optimizes, and the measured per-stage latency of each
   stage's onnxruntime session at the same shape (median of ``--runs`` interleaved rounds over the
   stages, ``benchmarks/harness.py``).
2. Throughput of one session vs the local and Ray executors (K stages, M micro-batches), in one
   interleaved run (``--rounds`` round-robin rounds, start rotating), with CPU-seconds per micro-batch
   next to wall time. CPU time counts the driver process and, for Ray, the stage actors' processes.

    python benchmarks/bench_pipeline.py [--models bert-base gpt-base] [--batch 8] [--seq 128]
    python benchmarks/bench_pipeline.py --models bert-base --ks 2 --runs 3 --rounds 3 --no-ray   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py


def _compiled(name: str, cache: pathlib.Path) -> pathlib.Path:
    import tfgraph

    out = cache / name
    if not (out / "manifest.json").is_file():
        tfgraph.compile(name, output=out, verify=False, force=True)
    return out


def balance(models, cache, ks, runs, out_rows):
    import onnxruntime as ort

    import tfgraph
    from tfgraph import ir as tir
    from tfgraph.compiler.verify import generate_inputs

    for name in models:
        art = _compiled(name, cache)
        model = tir.load(art / "model.onnx").model
        feeds = generate_inputs(model, {"batch": 2, "sequence": 128})
        for k in ks:
            t0 = time.perf_counter()
            pipe = tfgraph.partition(model, k, feeds=feeds)
            part_s = time.perf_counter() - t0
            sessions = [ort.InferenceSession(s.model.SerializeToString(), providers=["CPUExecutionProvider"]) for s in pipe.stages]
            env = dict(feeds)
            runners = {}
            for i, (stage, sess) in enumerate(zip(pipe.stages, sessions)):
                ins = {n: env[n] for n in stage.input_names}
                env.update(zip(stage.output_names, sess.run(stage.output_names, ins)))
                runners[i] = lambda sess=sess, stage=stage, ins=ins: sess.run(stage.output_names, ins)
            times = harness.interleave(runners, runs, warmup=1)
            measured = [harness.median(times[i], ms=True) for i in range(len(pipe.stages))]
            row = {
                "model": name, "K": k, "estimated_balance": pipe.balance, "estimated_compute_balance": pipe.compute_balance,
                "measured_balance": max(measured) / (sum(measured) / len(measured)), "stage_ms": measured,
                "stage_estimate_ms": [s.cost_s * 1e3 for s in pipe.stages], "cut_kib": [s.cut_bytes / 1024 for s in pipe.stages],
                "max_rel_err": pipe.info["verification"]["max_rel"], "partition_s": part_s,
            }
            print(json.dumps(row), flush=True)
            out_rows.append(row)


def throughput(name, cache, k, micro, batch, seq, rounds, with_ray, out_rows):
    import onnxruntime as ort

    from tfgraph import PipelineExecutor, ir as tir
    from tfgraph.compiler.stages import partition_artifact
    from tfgraph.compiler.verify import generate_inputs

    art = _compiled(name, cache)
    pipe_dir = cache / f"{name}-k{k}"
    if not (pipe_dir / "manifest.json").is_file():
        partition_artifact(art, k, pipe_dir, force=True)
    model = tir.load(art / "model.onnx").model
    feeds = generate_inputs(model, {"batch": batch, "sequence": seq})
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    variants = {"one session": (lambda: session.run(None, feeds), None, 1)}
    local = PipelineExecutor(pipe_dir, micro_batches=micro)
    variants[f"local K={k} M={micro}"] = (lambda: local.run(feeds), None, micro)
    ray_ex = None
    if with_ray:
        from tfgraph.deploy.executor import init_local_ray

        init_local_ray(num_cpus=os.cpu_count())
        ray_ex = PipelineExecutor(pipe_dir, executor="ray", micro_batches=micro, timeout_s=600)
        variants[f"ray K={k} M={micro}"] = (lambda: ray_ex.run(feeds), ray_ex, micro)
    stats = {v: {"wall": [], "cpu": []} for v in variants}

    def measured(fn, actors, m):
        """Wall seconds of ``fn`` alone (the actors' CPU query outside it) and CPU seconds per micro-batch."""
        cpu0 = time.process_time() + (actors.actor_cpu_seconds() if actors else 0.0)
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        return wall, (time.process_time() + (actors.actor_cpu_seconds() if actors else 0.0) - cpu0) / m

    def record(label, _round, _seconds, value):
        stats[label]["wall"].append(value[0])
        stats[label]["cpu"].append(value[1])

    harness.interleave({label: (lambda v=v: measured(*v)) for label, v in variants.items()}, rounds, warmup=1,
                       on_run=record)
    for label, (_, _, m) in variants.items():
        wall = harness.median(stats[label]["wall"])
        row = {"model": name, "variant": label, "batch": batch, "seq": seq, "wall_ms": wall * 1e3,
               "wall_p90_ms": harness.p90(stats[label]["wall"], ms=True),
               "sequences_per_s": batch / wall, "cpu_s_per_micro_batch": harness.median(stats[label]["cpu"]),
               "micro_batches": m, "rounds": rounds, "cores": os.cpu_count()}
        print(json.dumps(row), flush=True)
        out_rows.append(row)
    local.close()
    if ray_ex is not None:
        import ray

        ray_ex.close()
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bert-base", "gpt-base"])
    p.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--runs", type=int, default=20, help="interleaved rounds over the stages for the measured balance")
    p.add_argument("--throughput-model", default="bert-base")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20, help="interleaved throughput rounds")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tfgraph-bench-pipeline"))
    p.add_argument("--out", default="benchmarks/results/pipeline_cpu")
    args = p.parse_args(argv)
    if not args.no_ray:  # Ray reads these at import: loopback, private temp dir, no usage stats
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="tfgraph-bench-ray-"))
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows_balance, rows_tp = [], []
    balance(args.models, cache, args.ks, args.runs, rows_balance)
    throughput(args.throughput_model, cache, args.stages, args.micro_batches, args.batch, args.seq, args.rounds, not args.no_ray, rows_tp)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = harness.machine()
    out.with_suffix(".json").write_text(json.dumps({"balance": rows_balance, "throughput": rows_tp, "machine": machine,
                                                    "runs": args.runs, "rounds": args.rounds}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, ISA {'/'.join(machine['isa']) or '?'}, "
             f"load average {machine['load_average_1m']:.1f}; {args.runs} interleaved rounds over the stages, "
             f"{args.rounds} throughput rounds", "",
             "## Stage balance (slowest/mean; roofline estimate at b2 s128, and measured stage latency)", "",
             "| model | K | estimated | measured | stage ms (measured) | cut KiB | max rel err |", "|---|---|---|---|---|---|---|"]
    for r in rows_balance:
        lines.append(f"| {r['model']} | {r['K']} | {r['estimated_balance']:.3f} | {r['measured_balance']:.3f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['stage_ms'])} | {', '.join(f'{x:.0f}' for x in r['cut_kib'])} | {r['max_rel_err']:.1e} |")
    lines += ["", f"## Throughput ({args.throughput_model}, batch {args.batch}, seq {args.seq}, {os.cpu_count()} cores, interleaved rounds)", "",
              "| variant | wall ms | sequences/s | CPU s per micro-batch |", "|---|---|---|---|"]
    for r in rows_tp:
        lines.append(f"| {r['variant']} | {r['wall_ms']:.1f} | {r['sequences_per_s']:.2f} | {r['cpu_s_per_micro_batch']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
