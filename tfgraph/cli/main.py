"""The ``tfgraph`` command line: a thin layer over the library.

Exit codes: 0 ok; 1 verification failed (the compiled model's outputs diverged, or a
pass broke the model); 2 bad input or usage; 3 internal error (a bug in tfgraph or a
pass: please report it, rerun with TFGRAPH_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import sys

from tfgraph.cli.common import (  # noqa: F401 - re-exported: the CLI's shared pieces
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_VERIFY,
    _attention_approximation,
    _attention_impl,
    _fmt_bytes,
    _load_plugins,
    _native_stdout_to_stderr,
    _pass_options,
    _Progress,
    _stderr_console,
    _stdout_console,
)
from tfgraph.cli.info import cmd_inspect, cmd_passes, cmd_prune, cmd_targets
from tfgraph.cli.summary import _print_compile_summary



def cmd_compile(args: argparse.Namespace) -> int:
    import tfgraph
    from tfgraph.compiler.verify import parse_shapes

    _load_plugins(args.plugin)
    if args.stages is not None:  # compiled in memory, partitioned, then written with its stages at once
        from tfgraph.cli import pipeline as pipeline_cli

        pipeline_cli.check_stages(args)
    # Native libraries' banners (the QNN EP prints one when it loads) go to stderr: stdout holds the summary.
    with _Progress(enabled=not args.json and not args.quiet) as progress, _native_stdout_to_stderr(True):
        artifact = tfgraph.compile(
            args.model,
            target=args.target,
            output=None if args.stages is not None else args.output,
            force=args.force,
            verify=not args.no_verify,
            strict=args.strict,
            inputs=args.inputs,
            shapes=parse_shapes(args.shape),
            seed=args.seed,
            extra_passes=args.passes or (),
            pass_options=_pass_options(args.set),
            exporter=args.exporter,
            export_batch=args.batch,
            export_seq=args.seq,
            attention=_attention_impl(args),
            approximate_attention=_attention_approximation(args),
            progress=progress,
            calibration=args.calibration,
            tokenizer=args.tokenizer,
            max_drop=args.max_drop,
            task=args.task,
        )
        if args.stages is not None:
            pipeline_cli.add_stages(artifact, args, progress)
    written = pathlib.Path(args.output) / "manifest.json"
    if artifact.path is None or not written.is_file():
        raise RuntimeError(f"the compile returned without writing {written}")
    if args.json:
        print(json.dumps({"output": str(artifact.path), **artifact.manifest}, indent=2))
    elif not args.quiet:
        _print_compile_summary(artifact.manifest, str(artifact.path), verbose=args.verbose or args.strict)
        if args.stages is not None:
            pipeline_cli.print_pipeline(artifact.manifest)
    for warning in artifact.manifest["warnings"]:
        _stderr_console().print(f"[bold yellow]WARNING: {warning}[/bold yellow]")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from tfgraph.errors import BadInputError
    from tfgraph.compiler.export import export

    out = pathlib.Path(args.output)
    if out.exists() and not args.force:
        raise BadInputError(f"{out}: exists; choose another path or pass --force to replace it")
    if not out.parent.exists():
        raise BadInputError(f"{out.parent}: folder does not exist")
    with _Progress(enabled=not args.json and not args.quiet) as progress:
        progress(f"export {args.model} ({args.exporter})", 0, 1)
        path = export(args.model, out, exporter=args.exporter, batch=args.batch, seq=args.seq, attention=_attention_impl(args, allow_window=False),
                      task=args.task)
        progress(f"export {args.model} ({args.exporter})", 1, 1)
    info = {"output": str(path), "model": args.model, "exporter": args.exporter, "bytes": path.stat().st_size}
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        _stdout_console().print(f"exported {args.model} with the {args.exporter} exporter → {path} ({_fmt_bytes(info['bytes'])})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from tfgraph._version import __version__

    parser = _Parser(
        prog="tfgraph",
        description="ONNX graph-rewriting compiler for Transformer models.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error",
    )
    parser.add_argument("--version", action="version", version=f"tfgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def task_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=("text-generation",), help="text-generation: a causal LM with its KV cache "
                       "(past/present key-values; compile verifies a prompt and decode steps; `tfgraph generate` runs it)")

    def export_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch exporter for built-in/HF models (default: dynamo)")
        p.add_argument("--batch", type=int, default=2, help="batch size of the example inputs used to export (axes stay dynamic)")
        p.add_argument("--seq", type=int, default=16, help="sequence length of the example inputs used to export (axes stay dynamic)")
        p.add_argument("--attention", action="append", default=[], metavar="sdpa|eager|window=N[,global=G]",
                       help="attention implementation of Hugging Face models when exporting (sdpa, the transformers "
                            "default, or eager); for compile also window=N[,global=G]: restrict attention to a local "
                            "window (an approximation, reported with its output change); repeatable")

    p = sub.add_parser("compile", help="compile a model for a target and write a verified artifact")
    p.add_argument("model", help="an .onnx file, a built-in model name (see `tfgraph export --help`), or a local Hugging Face folder")
    p.add_argument("--target", "-t", default="cpu-fp32", help="target profile (see `tfgraph targets`; default cpu-fp32)")
    p.add_argument("--output", "-o", required=True, help="artifact folder to create")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip numeric verification (on by default)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) when attention blocks are left unfused or nodes fall back to CPU beyond what the target documents")
    p.add_argument("--inputs", help=".npz file of input arrays to verify on (default: generated from the input signature)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS", help="input shape (input_ids=2x128) or symbolic dimension (sequence=128) for generated inputs; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    p.add_argument("--pass", dest="passes", action="append", metavar="NAME[:K=V,...]", help="run a registered pass after the target's pipeline; repeatable")
    p.add_argument("--set", action="append", metavar="PASS:K=V[,K=V]", help="change options of the target's own passes "
                   "(-t cpu-int4-gptq --set gptq:act_order=true,symmetric=true; see `tfgraph targets` and `tfgraph passes`); repeatable")
    p.add_argument("--plugin", action="append", metavar="FILE.py|MODULE", help="import a module that registers passes or targets; repeatable")
    export_options(p)
    task_option(p)
    p.add_argument("--calibration", metavar="FILE.npz|FILE.txt",
                   help="calibration data for reduced-precision targets: an .npz of feeds or a text file of sentences "
                        "(one per line, tokenized with the model's tokenizer); default: --inputs, else generated (warned)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for --calibration sentences (default: the model's own)")
    p.add_argument("--max-drop", type=float, metavar="D",
                   help="accuracy budget: revert the most harmful quantized nodes to float until 1 - cosine to fp32 <= D "
                        "(default: the target's, cpu-int8 0.005)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the summary")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also print every rewrite rule with its nearest miss (always in the manifest)")
    from tfgraph.cli import pipeline as pipeline_cli

    pipeline_cli.add_compile_options(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("export", help="export a built-in model or a local Hugging Face folder to ONNX")
    p.add_argument("model", help="built-in model name or Hugging Face folder")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    export_options(p)
    task_option(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="op histogram, parameters, FLOPs, attention blocks and duplicate weights of a model")
    p.add_argument("model", help="an .onnx file or a built-in model name")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS", help="shape for the FLOP estimate (default batch 2, sequence 16)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP estimate (it runs the model once)")
    export_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="zero the least important attention heads / FFN neurons (or weights) of a model")
    p.add_argument("model", help="an .onnx file, a built-in model name, or a local Hugging Face folder")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write (the input with pruned parts zeroed)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to prune (e.g. 0.3)")
    p.add_argument("--neurons", type=float, default=0.0, help="fraction of FFN neurons to prune (e.g. 0.3)")
    p.add_argument("--score", choices=("l1", "l2", "activation"), default="l2", help="importance score (default l2 of the weights)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="rank across all layers or within each layer")
    p.add_argument("--schedule", default=None, help="gradual: a step (0.1 → 10%%, 20%%, … target) or fractions (0.1,0.2,0.3)")
    p.add_argument("--sparsity", type=float, default=0.0, help="unstructured magnitude pruning to this sparsity (report only)")
    p.add_argument("--inputs", help=".npz calibration inputs for --score activation (default: generated)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS", help="shape of generated calibration inputs; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of generated calibration inputs")
    export_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_prune)

    pipeline_cli.add_commands(sub)  # run, serve, export-triton
    importlib.import_module("tfgraph.cli.generate").add_command(sub)  # generate

    p = sub.add_parser("targets", help="list the registered targets (their phases and passes)")
    p.add_argument("name", nargs="?", metavar="TARGET", help="show only this target")
    p.add_argument("--json", action="store_true")
    p.add_argument("--self-test", action="store_true",
                   help="run each target's numeric self-tests (windowed attention) on its own providers; exit 1 on a failure")
    p.add_argument("--target", "-t", help="only this target (with --self-test)")
    p.add_argument("--plugin", action="append", metavar="FILE.py|MODULE", default=[],
                   help="import a module that registers passes or targets; repeatable")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("passes", help="list the registered passes")
    p.add_argument("--plugin", action="append", metavar="FILE.py|MODULE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of exiting, so ``--json`` can report it as JSON."""

    def error(self, message: str):  # noqa: D401
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _report_error(label: str, message: str, code: int, as_json: bool, **extra) -> int:
    print(f"tfgraph: {label}: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "kind": label, "exit_code": code, **extra}, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        if not as_json:
            parser.print_usage(sys.stderr)
        return _report_error("usage error", str(e), EXIT_BAD_INPUT, as_json)
    from tfgraph.errors import TfgraphError

    try:
        return args.func(args)
    except TfgraphError as e:
        from tfgraph.errors import PassFailedError, StrictError

        label = ("strict check failed" if isinstance(e, StrictError) else "pass failed" if isinstance(e, PassFailedError)
                 else "verification failed" if e.exit_code == EXIT_VERIFY else "error")
        extra = {"pass": e.pass_name} if getattr(e, "pass_name", None) else {}
        return _report_error(label, str(e), e.exit_code, as_json, **extra)
    except KeyboardInterrupt:
        return _report_error("interrupted", "interrupted", 130, as_json)
    except BrokenPipeError:  # the reader went away (`tfgraph passes | head`): stop quietly, as git does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug: say so in one line, traceback on request
        if os.environ.get("TFGRAPH_DEBUG"):
            raise
        message = " ".join(str(e).split())
        return _report_error("internal error", f"{type(e).__name__}: {message[:500]} (rerun with TFGRAPH_DEBUG=1 for "
                             "the traceback)", EXIT_INTERNAL, as_json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
