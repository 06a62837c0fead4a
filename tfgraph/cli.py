"""The ``tfgraph`` command line: a thin layer over the library.

Exit codes: 0 ok; 1 verification failed (the compiled model's outputs diverged, or a
pass broke the model); 2 bad input or usage; 3 internal error (a bug in tfgraph or a
pass: please report it, rerun with TFGRAPH_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import sys
from typing import Any

EXIT_OK, EXIT_VERIFY, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    from rich.console import Console

    # A pipe or a log file has no width: rich's 80 columns would fold the summary's tables.
    return Console(highlight=False, **({} if sys.stdout.isatty() else {"width": 140}))


class _Progress:
    """Adapter from the library's ``progress(stage, done, total)`` callback to a rich progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    # Not on a terminal (a pipe, a CI log): a line when a phase starts, and one every few seconds within
    # a long phase, but only once the command has run a while, so quick runs and early errors print
    # nothing but their result.
    QUIET_S, EVERY_S = 2.0, 5.0

    def _log(self, group: str, line: str) -> None:
        import time

        now = time.monotonic()
        self._t0 = getattr(self, "_t0", now)
        last_group, last_time = getattr(self, "_last", (None, now))
        new_phase = group != last_group
        if not line or now - self._t0 < self.QUIET_S or (not new_phase and now - last_time < self.EVERY_S):
            if new_phase:
                self._last = (group, last_time)
            return
        self._last = (group, now)
        print(f"tfgraph: {line}", file=sys.stderr, flush=True)

    def _start(self):
        # Started on first use, so commands that fail early print nothing but their error.
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=_stderr_console(),
            transient=True,
        )
        self._progress.__enter__()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = stage if not stage.startswith("pass ") else "passes: " + stage[5:]
        group = "passes" if stage.startswith("pass ") else stage
        if not sys.stderr.isatty():
            self._log(group, label if group != "passes" else f"pass {done + 1}/{total}: {stage[5:]}" if done < total else "")
            return
        if self._progress is None:
            self._start()
        if self._task is None or self._task[0] != group:
            self._task = (group, self._progress.add_task(label, total=max(total, 1)))
        self._progress.update(self._task[1], description=label, completed=done, total=max(total, 1))


def _load_plugins(plugins: list[str]) -> None:
    """Import plugin modules (a ``.py`` file or a module name) so their passes/targets register."""
    from tfgraph.errors import BadInputError, first_line

    for plugin in plugins or ():
        path = pathlib.Path(plugin)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise BadInputError(f"{plugin}: plugin file not found")
                spec = importlib.util.spec_from_file_location(f"tfgraph_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except BadInputError:
            raise
        except SystemExit as e:
            raise BadInputError(f"plugin '{plugin}' called sys.exit({e.code}) while loading; a plugin module must only "
                                "define and register passes or targets") from None
        except Exception as e:
            raise BadInputError(f"cannot load plugin '{plugin}': {type(e).__name__}: {first_line(e)}") from None


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _print_compile_summary(manifest: dict, out: str | None, *, verbose: bool = False) -> None:
    from rich.table import Table

    console = _stdout_console()
    table = Table(title=f"tfgraph compile → {manifest['target']}", title_justify="left")
    for col, just in (("#", "right"), ("pass", "left"), ("modified", "center"), ("time", "right"),
                      ("nodes", "right"), ("params", "right"), ("max abs err", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for i, rec in enumerate(manifest["passes"], 1):
        ver = rec.get("verification")
        err = f"{max(v['max_abs'] for v in ver.values()):.2e}" if ver else "—"
        nodes = f"{rec['nodes_before']} → {rec['nodes_after']}" if rec["modified"] else str(rec["nodes_after"])
        params = _fmt_count(rec["params_after"])
        table.add_row(str(i), rec["name"], "yes" if rec["modified"] else "no", f"{rec['time_s'] * 1000:.1f} ms", nodes, params, err)
    if manifest["verification"].get("ran_on_instead"):  # the target's EPs are not installed here
        console.print(f"[bold yellow]{manifest['verification']['ran_on_instead']}[/bold yellow]")
    console.print(table)
    rules = [(rec["name"], rule, entry) for rec in manifest["passes"] for rule, entry in rec.get("rules", {}).items()]
    if rules and verbose:
        rule_table = Table(title="rules", title_justify="left")
        for col in ("pass", "rule", "matches", "nearest miss"):
            rule_table.add_column(col, no_wrap=col != "nearest miss")
        for pass_name, rule, entry in rules:
            miss = entry.get("near_miss")
            rule_table.add_row(pass_name, rule, str(entry["matches"]), f"{miss['status']}: {miss['reason']}" if miss and not entry["matches"] else "")
        console.print(rule_table)
    elif rules:
        matched = [f"{rule} {entry['matches']}" for _, rule, entry in rules if entry["matches"]]
        idle = len(rules) - len(matched)
        console.print(f"rules matched: {', '.join(matched) or 'none'}"
                      + (f" ({idle} rule(s) without a match; -v shows each with its nearest miss)" if idle else ""))
    approx = manifest.get("approximation")
    if approx:
        console.print(f"[bold red]approximation[/bold red]: attention {approx['attention']} on blocks {approx['blocks']}")
        for name, change in approx["output_change_vs_dense"].items():
            console.print(f"  {name}: cosine to dense {change['cosine']:.6f} (worst row {change['row_cosine_min']:.6f}), "
                          f"max abs {change['max_abs']:.3g}")
    att = manifest.get("attention")
    if att and att["found"]:
        console.print(f"attention: {att['fused']} of {att['found']} blocks fused {att['fused_ops']}")
    s = manifest["summary"]
    console.print(
        f"nodes {_fmt_int(s['nodes_before'])} → {_fmt_int(s['nodes_after'])}, parameters {_fmt_int(s['params_before'])} → "
        f"{_fmt_int(s['params_after'])}, weights {_fmt_bytes(s['bytes_before'])} → {_fmt_bytes(s['bytes_after'])}"
    )
    weights = manifest.get("weights")
    if weights:
        console.print(
            f"weights stored: {_fmt_bytes(weights['bytes_before'])} → {_fmt_bytes(weights['bytes_after'])} "
            f"({weights['bytes_after'] / max(weights['bytes_before'], 1):.2f}x), unique {_fmt_bytes(weights['unique_bytes'])}"
        )
    prec = manifest.get("precision")
    if prec:
        calib = prec["calibration"]
        console.print(f"precision {prec['precision']}: calibration {calib['source']} ({calib['samples']} samples, "
                      f"sha256 {calib['sha256'][:12]})")
        for name, acc in prec["accuracy_vs_fp32"].items():
            row = f", sentence-embedding cosine {acc['row_cosine_mean']:.5f} (worst {acc['row_cosine_min']:.5f})" if acc.get("embedding") else ""
            console.print(f"  {name} vs fp32: cosine {acc['cosine']:.5f}, max abs {acc['max_abs']:.3g}{row}")
        budget = prec.get("max_drop")
        if budget:
            console.print(f"  max-drop {budget['max_drop']:.4g}: score {budget['initial_score']:.5f} → {budget['final_score']:.5f}, "
                          f"reverted {len(budget['reverted'])} node(s) to float {budget['reverted']}")
        for entry in prec["passes"]:
            for kept in entry.get("kept_float32", []):
                console.print(f"  kept float32: {kept['node']} ({kept['op_type']}): {kept['reason']}")
    ver = manifest["verification"]
    if ver.get("skipped"):
        console.print("[yellow]verification skipped (--no-verify)[/yellow]")
    else:
        outputs = ", ".join(f"{k}: max abs {v['max_abs']:.2e}, max rel {v['max_rel']:.2e}" for k, v in ver["outputs"].items())
        shapes = ", ".join(f"{k}={'x'.join(map(str, v['shape']))}" for k, v in ver["inputs"].items())
        console.print(f"[green]verified[/green] on {', '.join(ver['session']['providers'])} ({shapes}): {outputs}; "
                      f"passes where |error| <= {ver['atol']:g} + {ver['rtol']:g}·|expected| everywhere "
                      "(max rel is over all elements, near-zero ones included)")
        unavailable = ver.get("providers_unavailable") or {}
        if unavailable and not ver.get("ran_on_instead"):  # said once, at the top
            console.print("[bold yellow]not verified on " + "; ".join(f"{k} ({v})" for k, v in unavailable.items())
                          + "[/bold yellow]")
    runtime_precision = manifest.get("runtime_precision")
    if runtime_precision:
        console.print(f"runtime precision: {runtime_precision['used']} ({runtime_precision['how']})")
    place = manifest.get("placement")
    if place:
        counts = ", ".join(f"{ep} {n}" for ep, n in place["nodes"].items())
        fallback = (f"; CPU fallback {place['fallback_count']} ({', '.join(f'{k} {v}' for k, v in place['fallback_ops'].items())})"
                    f", {place['unexpected_fallback']} unexpected" if place["fallback_count"] else "; no CPU fallback")
        label = "placement" if place["source"] == "onnxruntime session" else "expected placement, not run"
        console.print(f"{label} ({place['source']}): {counts}{fallback}")
        if place.get("unverified"):
            console.print(f"[yellow]{place['unverified']}[/yellow]")
    for note in manifest.get("notes") or ():
        console.print(f"note: {note}")
    if out:
        console.print(f"artifact: {out} ({', '.join(manifest.get('files', []))}, manifest.json)")


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _attention_impl(args: argparse.Namespace, *, allow_window: bool = True) -> str | None:
    """The export attention implementation among the ``--attention`` values (None: the default)."""
    from tfgraph.errors import BadInputError

    impls = [a for a in args.attention if a in ATTENTION_IMPLEMENTATIONS]
    others = [a for a in args.attention if a not in ATTENTION_IMPLEMENTATIONS]
    for value in others:
        if not value.startswith("window") or not allow_window:
            allowed = "sdpa, eager" + (" or window=N[,global=G]" if allow_window else "")
            raise BadInputError(f"--attention {value}: expected {allowed}")
    if len(set(impls)) > 1:
        raise BadInputError(f"--attention: choose one implementation, not {' and '.join(sorted(set(impls)))}")
    return impls[0] if impls else None


def _attention_approximation(args: argparse.Namespace) -> str | None:
    windows = [a for a in args.attention if a.startswith("window")]
    if len(windows) > 1:
        from tfgraph.errors import BadInputError

        raise BadInputError("--attention: give one window=N[,global=G]")
    return windows[0] if windows else None


@contextlib.contextmanager
def _native_stdout_to_stderr(enabled: bool):
    """Send what native libraries print on file descriptor 1 (the QNN EP prints a banner when it
    loads) to stderr while ``enabled``, so that ``--json`` output stays valid JSON."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_compile(args: argparse.Namespace) -> int:
    import tfgraph
    from tfgraph.verify import parse_shapes

    _load_plugins(args.plugin)
    if args.stages is not None:  # compiled in memory, partitioned, then written with its stages at once
        from tfgraph import pipeline_cli

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
    from tfgraph.export import export

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


def cmd_inspect(args: argparse.Namespace) -> int:
    import contextlib

    from tfgraph import analysis
    from tfgraph.compiler import resolve_model
    from tfgraph.verify import generate_inputs, parse_shapes

    with contextlib.ExitStack() as stack, _Progress(enabled=not args.json) as progress:
        model, source = resolve_model(
            args.model, stack, exporter=args.exporter, export_batch=args.batch, export_seq=args.seq,
            attention=_attention_impl(args, allow_window=False), progress=progress,
        )
        report: dict[str, Any] = {"source": source, **analysis.summarize(model)}
        if not args.no_flops:
            progress("estimate FLOPs", 0, 1)
            feeds = generate_inputs(model, parse_shapes(args.shape))
            report["flops"] = analysis.estimate_flops(model, feeds)
            progress("estimate FLOPs", 1, 1)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    from rich.table import Table

    console = _stdout_console()
    console.print(f"[bold]{args.model}[/bold]  ir_version {report['ir_version']}, opsets {report['opsets']}, producer {report['producer'] or '?'}")
    for kind in ("inputs", "outputs"):
        console.print(f"{kind}: " + ", ".join(f"{v['name']} {v['dtype']}[{', '.join(v['shape'])}]" for v in report[kind]))
    console.print(f"nodes {_fmt_int(report['nodes'])}, parameters {_fmt_int(report['parameters'])} ({_fmt_bytes(report['bytes'])})")
    if "flops" in report:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in report["flops"]["shapes"].items())
        console.print(f"matmul FLOPs at {shapes}: {report['flops']['total'] / 1e9:.3f} GFLOP")
    att = report["attention"]
    console.print(f"attention blocks: {att['unfused']} unfused (Softmax between MatMuls), {att['fused']} fused {att['fused_ops'] or ''}")
    dups = report["duplicate_initializers"]
    console.print(f"duplicate initializers: {len(dups)} groups, {_fmt_bytes(report['duplicate_bytes'])} stored more than once")
    for g in dups[:10]:
        console.print(f"  {_fmt_bytes(g['nbytes'])} {g['dtype']}{g['shape']}: {', '.join(g['names'])}")
    table = Table(title="ops", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in report["ops"].items():
        table.add_row(op, str(n))
    console.print(table)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Zero the least important heads/neurons (structured) or weights (magnitude) and write the model."""
    import contextlib

    from tfgraph import prune
    from tfgraph import ir as tir
    from tfgraph.compiler import resolve_model
    from tfgraph.errors import BadInputError
    from tfgraph.verify import load_inputs, parse_shapes

    out = pathlib.Path(args.output)
    if out.exists() and not args.force:
        raise BadInputError(f"{out}: exists; choose another path or pass --force to replace it")
    if not out.parent.exists():
        raise BadInputError(f"{out.parent}: folder does not exist")
    with contextlib.ExitStack() as stack, _Progress(enabled=not args.json and not args.quiet) as progress:
        model, source = resolve_model(
            args.model, stack, exporter=args.exporter, export_batch=args.batch, export_seq=args.seq,
            attention=_attention_impl(args, allow_window=False), progress=progress,
        )
        progress("prune", 0, 1)
        report: dict[str, Any] = {"output": str(out), "source": source}
        if args.heads or args.neurons:
            calibration = load_inputs(args.inputs, model) if args.inputs else None
            report["structured"] = prune.prune_structured(
                model, heads=args.heads, neurons=args.neurons, score=args.score, schedule=args.schedule,
                scope=args.scope, calibration=calibration, shapes=parse_shapes(args.shape), seed=args.seed,
            )
        if args.sparsity:
            report["magnitude"] = prune.magnitude_prune(model, args.sparsity)
        if "structured" not in report and "magnitude" not in report:
            raise BadInputError("nothing to prune: give --heads, --neurons and/or --sparsity")
        tir.save(model, out)
        progress("prune", 1, 1)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif not args.quiet:
        console = _stdout_console()
        s = report.get("structured")
        if s:
            console.print(
                f"pruned {s['heads_pruned']} of {s['heads_total']} attention heads ({s['attention_blocks']} blocks) and "
                f"{s['neurons_pruned']} of {s['neurons_total']} FFN neurons ({s['ffn_blocks']} blocks), score {s['score']}, "
                f"{len(s['schedule'])} step(s)"
            )
        m = report.get("magnitude")
        if m:
            console.print(f"magnitude: {m['parameters']:,} weights, sparsity {m['sparsity_before']:.1%} → {m['sparsity_after']:.1%} ({m['note']})")
        console.print(f"zeroed model → {out}; `tfgraph compile {out} -o DIR` removes the zeroed heads/neurons")
    return EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    from tfgraph.targets import list_targets

    _load_plugins(args.plugin)
    targets = list_targets()
    if args.self_test:
        return _targets_self_test(args, targets)
    if args.json:
        print(json.dumps([t.to_json() for t in targets], indent=2))
        return EXIT_OK
    from tfgraph import runtime

    console = _stdout_console()
    for t in targets:
        _, missing = runtime.usable(t.providers)
        console.print(f"[bold]{t.name}[/bold]  {t.description}")
        providers = ", ".join(
            f"{p.name}{' (plugin ' + p.plugin + ')' if p.plugin else ''}"
            + (f" {dict(p.options)}" if p.options else "")
            + (" [yellow]not here[/yellow]" if p.name in missing else " [green]here[/green]")
            for p in t.providers
        )
        console.print(f"  providers: {providers}")
        accuracy = f"min cosine {t.min_cosine:g} vs fp32" if t.min_cosine is not None else ""
        console.print(f"  precision {t.precision}; tolerance atol {t.tolerance.atol:g}, rtol {t.tolerance.rtol:g}"
                      + (f"; {accuracy}" if accuracy else ""))
        if t.quantization is not None:
            q = t.quantization
            console.print(f"  quantization: {q.mode}, activations {q.activation_type}"
                          f"{' symmetric' if q.activation_symmetric else ''}, weights {q.weight_type}"
                          f"{' per-channel' if q.per_channel else ' per-tensor'}, on {', '.join(q.placement)}")
        if t.attention:
            console.print(f"  attention: {t.attention}")
        console.print(f"  shapes {'static (--shape required)' if t.static_shapes else 'dynamic'}; "
                      f"opset {t.opset[0]}..{t.opset[1]}; ops: {t.op_table or 'runtime kernel registry'}"
                      + (f"; documented CPU fallbacks: {', '.join(t.allowed_fallbacks)}" if t.allowed_fallbacks else ""))
        console.print(f"  passes: {' → '.join(p.name for p in t.passes)}")
    return EXIT_OK


def _targets_self_test(args: argparse.Namespace, targets) -> int:
    """Numeric self-tests of every target whose providers run here: windowed attention against a
    numpy reference, and tiny BERT/GPT models through the whole pipeline (needs torch)."""
    import importlib.util

    from tfgraph import runtime
    from tfgraph.selftest import profile_self_test, window_self_test

    have_torch = importlib.util.find_spec("torch") is not None
    results, skipped = [], []
    for target in targets:
        if args.target and target.name != args.target:
            continue
        accelerators = [p for p in target.providers if p.name != runtime.CPU] or list(target.providers)
        _, missing = runtime.usable(accelerators)
        if missing:
            skipped.append({"target": target.name, "missing_providers": missing})
            continue
        results += window_self_test(target)
        if have_torch:
            results += profile_self_test(target)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "results": [r.to_json() for r in results], "skipped": skipped}, indent=2))
    else:
        from rich.table import Table

        table = Table(title="self-test: windowed attention vs a numpy band-mask reference; tiny BERT/GPT compiles "
                      "verified on the target's providers")
        for column in ("target", "case", "S", "max abs", "result"):
            table.add_column(column)
        for r in results:
            table.add_row(r.target, r.case, str(r.sequence), f"{r.max_abs:.2e}",
                          ("ok" if r.passed else "FAILED") + (f" {r.detail}" if r.detail else ""))
        _stdout_console().print(table)
        if not have_torch:
            _stdout_console().print("model compiles not run: torch is not installed (the 'export' extra)")
        for s in skipped:
            reasons = "; ".join(f"{k}: {v}" for k, v in s["missing_providers"].items())
            _stdout_console().print(f"{s['target']}: not run here ({reasons})")
    return EXIT_OK if passed else EXIT_VERIFY


def cmd_passes(args: argparse.Namespace) -> int:
    from tfgraph.passes import available_passes, get_pass_class
    from tfgraph.passes.registry import describe_annotation, option_types

    _load_plugins(args.plugin)
    rows = []
    for name in available_passes():
        cls = get_pass_class(name)
        options = [{"name": k, "type": describe_annotation(t), "default": None if d is inspect.Parameter.empty else d}
                   for k, (t, d) in option_types(cls).items() if k not in ("calibration", "progress")]
        rows.append({"name": name, "class": cls.__qualname__,
                     "doc": next(iter((cls.__doc__ or "").strip().splitlines()), ""), "options": options})
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
    else:
        for r in rows:
            print(f"{r['name']:<30} {r['doc']}")
            if r["options"]:
                print(" " * 31 + "options: " + ", ".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in r["options"]))
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
    from tfgraph import pipeline_cli

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
    importlib.import_module("tfgraph.generate_cli").add_command(sub)  # generate

    p = sub.add_parser("targets", help="list the registered targets")
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
    except Exception as e:  # a bug: say so in one line, traceback on request
        if os.environ.get("TFGRAPH_DEBUG"):
            raise
        message = " ".join(str(e).split())
        return _report_error("internal error", f"{type(e).__name__}: {message[:500]} (rerun with TFGRAPH_DEBUG=1 for "
                             "the traceback)", EXIT_INTERNAL, as_json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
