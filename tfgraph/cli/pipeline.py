"""Command-line parts for pipelines: ``compile --stages K``, ``run``, ``serve``, ``export-triton``.

Kept apart from :mod:`tfgraph.cli.main` (which registers them) so the main CLI stays small.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from tfgraph.errors import BadInputError

EXIT_OK = 0


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def add_compile_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline stages")
    g.add_argument("--stages", type=int, default=None, metavar="K", help="split the compiled model into K pipeline stages of balanced cost")
    g.add_argument("--profile", action="store_true", help="cost nodes by an onnxruntime profile instead of the roofline model")
    g.add_argument("--link-bandwidth", type=float, default=10.0, metavar="GB/S", help="bandwidth between stages for the transfer of a cut (default 10 GB/s)")
    g.add_argument("--max-stage-params", type=float, default=None, metavar="MB", help="cap on each stage's parameter memory (MB)")
    g.add_argument("--stage-shape", action="append", metavar="NAME=DIMS", help="shape at which stage costs are estimated (default sequence=128)")


def check_stages(args: argparse.Namespace) -> None:
    from tfgraph.deploy.artifact import check_output_dir

    if args.stages < 1:
        raise BadInputError(f"--stages {args.stages}: expected a positive number of stages")
    if args.link_bandwidth <= 0:
        raise BadInputError("--link-bandwidth must be positive")
    check_output_dir(args.output, force=args.force)


def add_stages(artifact, args: argparse.Namespace, progress) -> None:
    """Partition the compiled (in-memory) artifact and write it with its stages to ``args.output``."""
    from tfgraph.compiler.stages import partition, write_pipeline_artifact
    from tfgraph.compiler.verify import parse_shapes

    progress(f"partition into {args.stages} stages", 0, 2)
    shapes = {"sequence": 128, **parse_shapes(args.stage_shape)}
    pipeline = partition(
        artifact.model, args.stages, shapes=shapes, cost="profile" if args.profile else "roofline",
        link_bandwidth=args.link_bandwidth * 1e9,
        max_stage_param_bytes=int(args.max_stage_params * 1e6) if args.max_stage_params else None,
    )
    progress(f"partition into {args.stages} stages", 1, 2)
    write_pipeline_artifact(artifact, pipeline, args.output, force=args.force)
    progress(f"partition into {args.stages} stages", 2, 2)


def print_pipeline(manifest: dict) -> None:
    from rich.table import Table

    pipe = manifest.get("pipeline")
    if not pipe:
        return
    table = Table(title=f"pipeline: {pipe['num_stages']} stages, slowest/mean {pipe['balance']:.3f} ({pipe['cost']['model']} cost)", title_justify="left")
    for col in ("stage", "file", "nodes", "cost", "cut out", "transfer", "params", "inputs"):
        table.add_column(col)
    for s in pipe["stages"]:
        table.add_row(str(s["index"]), s["file"], f"{s['nodes']} (+{s['recomputed_nodes']})", f"{s['cost_s'] * 1e3:.2f} ms",
                      f"{s['cut_bytes'] / 1024:.1f} KiB", f"{s['transfer_s'] * 1e3:.3f} ms", f"{s['param_bytes'] / 2**20:.1f} MiB",
                      ", ".join(v["name"] for v in s["inputs"])[:60])
    _console().print(table)
    ver = pipe.get("verification")
    if ver:
        _console().print(f"chained stages vs whole model: max relative error {ver['max_rel']:.2e}")


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from tfgraph.deploy.executor import PipelineExecutor

    path = pathlib.Path(args.artifact)
    inputs = pathlib.Path(args.inputs)
    if not inputs.is_file():
        raise BadInputError(f"{inputs}: inputs file not found")
    try:
        with np.load(inputs, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except Exception as e:
        raise BadInputError(f"{inputs}: not a readable .npz file ({type(e).__name__})") from None
    if args.output and pathlib.Path(args.output).exists() and not args.force:
        raise BadInputError(f"{args.output}: exists; pass --force to replace it")
    with PipelineExecutor(path, executor=args.executor, micro_batches=args.micro_batches) as executor:
        from tfgraph.deploy.serve import RequestError, signature, validate

        specs, _, _ = signature(path)
        try:
            feeds = validate(feeds, specs, max_batch=1 << 30, max_elements=1 << 40)
        except RequestError as e:
            raise BadInputError(str(e)) from None
        start = time.perf_counter()
        outputs = executor.run(feeds)
        wall = time.perf_counter() - start
        stats = dict(executor.stats)
    if args.output:
        np.savez(args.output, **outputs)
    report = {
        "artifact": str(path), "executor": args.executor, "micro_batches": stats.get("micro_batches"), "wall_s": wall,
        "stages": len(executor.specs), "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "output_file": args.output,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        c = _console()
        c.print(f"ran {path} on {report['stages']} stage(s), {args.executor} executor, {report['micro_batches']} micro-batch(es) in {wall * 1e3:.1f} ms")
        for k, v in report["outputs"].items():
            c.print(f"  {k}: {v['dtype']}{v['shape']}")
        if args.output:
            c.print(f"outputs → {args.output}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from tfgraph.deploy.artifact import read_manifest
    from tfgraph.deploy.serve import serve

    read_manifest(args.artifact)
    if not (0 <= args.port < 65536):
        raise BadInputError(f"--port {args.port}: out of range")
    if not args.read_timeout > 0:
        raise BadInputError(f"--read-timeout {args.read_timeout}: expected a positive number of seconds")
    _console(stderr=True).print(f"serving {args.artifact} on http://{args.host}:{args.port} (POST /infer, GET /health, GET /metadata)")
    serve(args.artifact, host=args.host, port=args.port, read_timeout_s=args.read_timeout, executor=args.executor,
          micro_batches=args.micro_batches, max_batch=args.max_batch, max_latency_ms=args.max_latency_ms,
          max_request_bytes=int(args.max_request_mb * 2**20))
    return EXIT_OK


def cmd_export_triton(args: argparse.Namespace) -> int:
    from tfgraph.deploy.triton import export_triton, validate_repository

    info = export_triton(args.artifact, args.output, name=args.name, force=args.force,
                         instance_kind=args.instance_kind, max_batch_size=args.max_batch_size)
    info["validated_configs"] = len(validate_repository(args.output))
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        _console().print(f"Triton repository → {info['repository']}: models {', '.join(info['models'])}"
                         + (f" (ensemble '{info['ensemble']}')" if info["ensemble"] else "")
                         + f"; {info['instance_kind']}, max_batch_size {info['max_batch_size']}"
                         + f"; {info['validated_configs']} config.pbtxt parsed with Triton's ModelConfig schema")
    return EXIT_OK


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run an artifact (single model or pipeline) on inputs with the local or Ray executor")
    p.add_argument("artifact", help="artifact folder (from `tfgraph compile`, with or without --stages)")
    p.add_argument("--inputs", required=True, help=".npz file of input arrays keyed by input name")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="local threads (default) or Ray actors (tfgraph[ray])")
    p.add_argument("--micro-batches", type=int, default=1, metavar="M", help="split the batch into M micro-batches")
    p.add_argument("--output", "-o", help=".npz file for the outputs")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve an artifact over HTTP (JSON or .npz; batching; validation)")
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--micro-batches", type=int, default=1, metavar="M")
    p.add_argument("--max-batch", type=int, default=8, help="rows per batch and per request (default 8)")
    p.add_argument("--max-latency-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5 ms)")
    p.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body (default 16 MiB)")
    p.add_argument("--read-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's headers, and again its body, before a 408 (default 10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository (stages + ensemble)")
    p.add_argument("artifact")
    p.add_argument("--output", "-o", required=True, help="repository folder to create")
    p.add_argument("--name", help="model name (default: the artifact folder's name)")
    p.add_argument("--instance-kind", choices=("auto", "cpu", "gpu"), default="auto",
                   help="Triton instance group kind (default auto: KIND_GPU for CUDA/TensorRT targets, else KIND_CPU)")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="Triton max_batch_size (default: 8 when inputs and outputs share a dynamic batch axis, else 0; "
                        "0 turns batching off)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_export_triton)
