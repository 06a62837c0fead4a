"""The compile summary a person reads (``--json`` prints the manifest instead)."""

from __future__ import annotations

from tfgraph.cli.common import _fmt_bytes, _fmt_count, _fmt_int, _stdout_console


def _print_compile_summary(manifest: dict, out: str | None, *, verbose: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _stdout_console()
    table = Table(title=f"tfgraph compile → {manifest['target']}", title_justify="left")
    for col, just in (("#", "right"), ("pass", "left"), ("modified", "center"), ("time", "right"),
                      ("nodes", "right"), ("params", "right"), ("max abs err", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for i, rec in enumerate(manifest["passes"], 1):
        ver = rec.get("verification")
        # An exact pass is checked at the end of its phase: its error shows on the phase's last check.
        err = f"{max(v['max_abs'] for v in ver.values()):.2e}" if ver else "(phase)" if rec.get("verification_deferred") else "—"
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
        # escaped: an If over two forms is named "If[then|else]", which rich would read as markup
        console.print(f"attention: {att['fused']} of {att['found']} blocks fused {escape(str(att['fused_ops']))}")
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
                          f"reverted {len(budget['reverted'])} node(s)"
                          + (f" to {budget.get('reverted_weights') or 'float'}: {escape(', '.join(budget['reverted']))}"
                             if budget["reverted"] else ""))
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
        vs_input = ver.get("vs_input")
        if vs_input:  # passes changed the outputs on purpose: the end-to-end change, against the input model
            console.print("against the input model: " + ", ".join(f"{k}: max abs {v['max_abs']:.2e}" for k, v in vs_input.items())
                          + " (reduced precision or pruning changes the outputs on purpose; see precision/passes)")
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
        # Only an operator table predicts; a session or the EP's own runtime assigned the nodes.
        label = "expected placement, not run" if place["source"].startswith("op table") else "placement"
        console.print(f"{label} ({place['source']}): {counts}{fallback}")
        if place.get("unverified"):
            console.print(f"[yellow]{place['unverified']}[/yellow]")
    cost = manifest.get("compile")
    if cost:  # what the compile took, per target phase (time, onnxruntime sessions built, peak memory)
        weights = max(manifest["summary"]["bytes_before"], 1)
        steps = ", ".join(f"{e['name']} {e['time_s']:.1f} s" for e in cost["steps"] if e["name"] != "rewrite")
        console.print(f"compile {cost['time_s']:.1f} s, peak RSS {_fmt_bytes(cost['peak_rss_bytes'])} "
                      f"({cost['peak_rss_bytes'] / weights:.1f}x the input weights); {steps}")
        if cost["phases"]:
            console.print("  phases: " + "; ".join(
                f"{e['name']} {e['time_s']:.1f} s (checks {e.get('checks_s', 0):.1f} s, {e.get('sessions', 0)} session(s), "
                f"peak {_fmt_bytes(e['peak_rss_bytes'])})" for e in cost["phases"]))
    for note in manifest.get("notes") or ():
        console.print(f"note: {note}")
    if out:
        console.print(f"artifact: {out} ({', '.join(manifest.get('files', []))}, manifest.json)")
