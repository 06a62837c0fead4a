#!/usr/bin/env python
"""Per-profile placement reports: tiny BERT- and GPT-style models compiled for every registered
target, with where their nodes run and how the result was verified.

For each target and model (built-ins exported with TorchScript and dynamo): verification passed or
the error, the providers it was verified on, the placement source (real session, standalone
runtime, or operator table), node counts per EP, CPU fallbacks by op (and how many the profile
does not document), the attention ops, and the accuracy against fp32 for precision targets.

Usage::

    python benchmarks/placement_report.py                       # all targets, bert-small + gpt-small
    python benchmarks/placement_report.py --targets npu-a16w8 --models bert-small

Writes ``benchmarks/results/placement.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="*", default=None)
    parser.add_argument("--models", nargs="*", default=["bert-small", "gpt-small"])
    parser.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "placement.md")
    args = parser.parse_args(argv)

    import tfgraph
    from tfgraph.errors import TfgraphError
    from tfgraph.compiler.export import export

    targets = args.targets or [t.name for t in tfgraph.list_targets()]
    work = pathlib.Path(tempfile.mkdtemp(prefix="placement-"))
    rows = []
    for model in args.models:
        for exporter in args.exporters:
            path = export(model, work / f"{model}-{exporter}.onnx", exporter=exporter)
            for target in targets:
                profile = tfgraph.get_target(target)
                shapes = {"batch": 1, "sequence": 16} if profile.static_shapes else None
                start = time.perf_counter()
                row = {"target": target, "model": model, "exporter": exporter}
                try:
                    manifest = tfgraph.compile(str(path), target=target, shapes=shapes).manifest
                except TfgraphError as e:
                    row["error"] = str(e).splitlines()[0][:300]
                    rows.append(row)
                    print(json.dumps(row))
                    continue
                place = manifest["placement"]
                acc = (manifest.get("precision") or {}).get("accuracy_vs_fp32") or {}
                row.update({
                    "verified": manifest["verification"]["passed"],
                    "verified_on": manifest["verification"]["session"]["providers"],
                    "source": place["source"],
                    "nodes": place["nodes"],
                    "fallback_ops": place["fallback_ops"],
                    "unexpected_fallback": place["unexpected_fallback"],
                    "attention": manifest["attention"]["fused_ops"],
                    "cosine_vs_fp32": min((a["cosine"] for a in acc.values()), default=None),
                    "seconds": round(time.perf_counter() - start, 1),
                })
                rows.append(row)
                print(json.dumps(row))

    lines = [
        "# Placement reports per profile",
        "",
        f"{datetime.date.today()}; `python benchmarks/placement_report.py`; tiny built-in models (2 layers), "
        "static-shape targets at batch 1, sequence 16. *source*: `onnxruntime session` = the real EP's node "
        "assignment; `openvino … query_model` = plain OpenVINO (the OpenVINO EP plugin lists no device on this AMD "
        "CPU); `op table …` = the checked-in CUDA/TensorRT operator tables (no GPU here).",
        "",
        "| target | model | exporter | verified on | placement source | nodes per EP | CPU fallback (unexpected) | attention | cosine vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target']} | {r['model']} | {r['exporter']} | **failed**: {r['error']} | | | | | |")
            continue
        fallback = ", ".join(f"{k} {v}" for k, v in r["fallback_ops"].items()) or "none"
        cos = f"{r['cosine_vs_fp32']:.5f}" if r["cosine_vs_fp32"] is not None else "—"
        lines.append(
            f"| {r['target']} | {r['model']} | {r['exporter']} | {', '.join(r['verified_on'])}"
            f"{'' if r['verified'] else ' (FAILED)'} | {r['source']} | "
            f"{', '.join(f'{k} {v}' for k, v in r['nodes'].items())} | {fallback} ({r['unexpected_fallback']}) | "
            f"{', '.join(f'{k} {v}' for k, v in r['attention'].items())} | {cos} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")
    return 0 if all("error" not in r and r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
