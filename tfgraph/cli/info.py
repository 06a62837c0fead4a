"""The commands that look rather than compile: ``inspect``, ``prune``, ``targets``, ``passes``."""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
from typing import Any

from tfgraph.cli.common import (EXIT_OK, EXIT_VERIFY, _attention_impl, _fmt_bytes, _fmt_int, _load_plugins, _Progress,
                                _stdout_console)


def cmd_inspect(args: argparse.Namespace) -> int:
    import contextlib

    from tfgraph import analysis
    from tfgraph.compiler import flops
    from tfgraph.compiler.sources import resolve_model
    from tfgraph.compiler.verify import generate_inputs, parse_shapes

    with contextlib.ExitStack() as stack, _Progress(enabled=not args.json) as progress:
        model, source = resolve_model(
            args.model, stack, exporter=args.exporter, export_batch=args.batch, export_seq=args.seq,
            attention=_attention_impl(args, allow_window=False), progress=progress,
        )
        report: dict[str, Any] = {"source": source, **analysis.summarize(model)}
        if not args.no_flops:
            progress("estimate FLOPs", 0, 1)
            feeds = generate_inputs(model, parse_shapes(args.shape))
            report["flops"] = flops.estimate_flops(model, feeds)
            progress("estimate FLOPs", 1, 1)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    from rich.table import Table

    console = _stdout_console()
    console.print(f"[bold]{args.model}[/bold]  ir_version {report['ir_version']}, opsets {report['opsets']}, producer {report['producer'] or '?'}")
    for kind in ("inputs", "outputs"):
        # markup=False: rich would read "[batch, sequence]" as a style tag and drop it.
        console.print(f"{kind}: " + ", ".join(f"{v['name']} {v['dtype']}[{', '.join(v['shape'])}]" for v in report[kind]),
                      markup=False)
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

    from tfgraph.compiler import prune
    from tfgraph import ir as tir
    from tfgraph.compiler.sources import resolve_model
    from tfgraph.errors import BadInputError
    from tfgraph.compiler.verify import load_inputs, parse_shapes

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
    wanted = args.name or args.target
    if wanted:
        from tfgraph.targets import get_target

        targets = [get_target(wanted)]  # an unknown name: BadInputError listing the known ones (exit 2)
    if args.self_test:
        return _targets_self_test(args, targets)
    if args.json:
        print(json.dumps([t.to_json() for t in targets], indent=2))
        return EXIT_OK
    from tfgraph.deploy import runtime

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
        console.print("  phases:")
        for phase in t.phases:
            console.print(f"    {phase.name}: {' → '.join(p.name for p in phase.passes)}", highlight=False)
    return EXIT_OK


def _targets_self_test(args: argparse.Namespace, targets) -> int:
    """Numeric self-tests of every target whose providers run here: windowed attention against a
    numpy reference, and tiny BERT/GPT models through the whole pipeline (needs torch)."""
    import importlib.util

    from tfgraph.deploy import runtime
    from tfgraph.compiler.selftest import profile_self_test, window_self_test

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
