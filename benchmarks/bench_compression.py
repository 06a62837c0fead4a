#!/usr/bin/env python
"""Compression: weight bytes and CPU latency of structurally pruned-and-shrunk BERT-base, and the
output change pruning causes on real weights (MiniLM).

Part 1, BERT-base (HF ``transformers.BertModel(BertConfig())``, random init, seed 0, dynamo
export, SDPA attention): the unpruned export and the export with 30% and 50% of attention
heads and FFN neurons zeroed (``tfgraph.compiler.prune.prune_structured``, L2 score, global ranking)
are each compiled with ``tfgraph.compile(target="cpu-fp32")`` (which shrinks the zeroed
heads/neurons away: ``shrink-pruned``). Reported: stored weight bytes (manifest), their ratio
to the unpruned compile, the encoder-only ratio (without the embedding tables, which head and
neuron pruning does not touch), the max difference of each shrunk compile to its zeroed model,
and latency. All compiled models run in onnxruntime CPU with 2 intra-op threads, 1 inter-op
thread, ORT_ENABLE_ALL, sequential execution; each gets 3 warm-up runs, then ``--rounds``
round-robin rounds (rotating start); medians and ratios to the unpruned compile.

Part 2, all-MiniLM-L6-v2 (real weights): sentence embeddings of the unpruned model vs the
zeroed models (30% / 50% heads+neurons, L2 and activation scores; activation calibrated on
separate sentences), on real English sentences written below, tokenized with the local
MiniLM tokenizer. Cosine similarity per sentence (mean and min). No fine-tuning: this is the
raw damage pruning does.

Usage::

    python benchmarks/bench_compression.py                 # 20 rounds
    python benchmarks/bench_compression.py --rounds 3 --quick

Writes ``benchmarks/results/compression_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
from tfgraph.models import sentences

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compression_cpu.md"
THREADS = 2
WARMUP = 3

EVAL_SENTENCES = sentences.EVERYDAY
CALIBRATION_SENTENCES = sentences.EVERYDAY_CALIBRATION


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def embedding_bytes(model) -> int:
    """Bytes of Gather tables (embeddings): untouched by head/neuron pruning."""
    total = 0
    for node in model.graph:
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            total += node.inputs[0].const_value.nbytes
    return total


def bench_bert(workdir: pathlib.Path, fractions: list[float], rounds: int, shapes: list[tuple[int, int]]) -> dict:
    import onnx_ir as ir
    import torch
    import transformers

    import tfgraph
    from tfgraph.compiler import prune
    from tfgraph.compiler.export import export
    from tfgraph.ir import load
    from tfgraph.compiler.verify import run

    torch.manual_seed(0)
    folder = workdir / "hf-bert-base"
    transformers.BertModel(transformers.BertConfig()).eval().save_pretrained(folder)
    log("export bert-base (dynamo)")
    exported = export(str(folder), workdir / "bert-base.onnx")
    variants: dict[str, dict] = {}
    for fraction in [0.0] + fractions:
        tag = "unpruned" if fraction == 0 else f"pruned {int(fraction * 100)}%"
        source = exported
        info: dict = {"fraction": fraction}
        if fraction:
            model = load(exported).model
            start = time.perf_counter()
            report = prune.prune_structured(model, heads=fraction, neurons=fraction, score="l2")
            info["prune_s"] = time.perf_counter() - start
            info["prune"] = {k: report[k] for k in ("heads_total", "heads_pruned", "neurons_total", "neurons_pruned")}
            source = workdir / f"bert-base-{int(fraction * 100)}.onnx"
            ir.save(model, source, external_data=source.name + ".data")
        log(f"compile {tag}")
        out = workdir / f"compiled-{int(fraction * 100)}"
        start = time.perf_counter()
        artifact = tfgraph.compile(str(source), "cpu-fp32", output=out, force=True)
        info["compile_s"] = time.perf_counter() - start
        info["weights"] = artifact.manifest["weights"]
        compiled = load(out / "model.onnx").model
        info["embedding_bytes"] = embedding_bytes(compiled)
        info["num_heads"] = [n.attributes.get_int("num_heads") for n in compiled.graph if n.op_type == "Attention"]
        info["verification_max_abs"] = max(d["max_abs"] for d in artifact.manifest["verification"]["outputs"].values())
        info["path"] = str(out / "model.onnx")
        info["source"] = str(source)
        variants[tag] = info
    base = variants["unpruned"]
    for info in variants.values():
        info["bytes_ratio"] = info["weights"]["bytes_after"] / base["weights"]["bytes_after"]
        enc = info["weights"]["bytes_after"] - info["embedding_bytes"]
        info["encoder_bytes_ratio"] = enc / (base["weights"]["bytes_after"] - base["embedding_bytes"])

    timings = {}
    rng = np.random.default_rng(0)
    sessions = {tag: harness.session(info["path"], THREADS) for tag, info in variants.items()}
    for batch, seq in shapes:
        feeds = {
            "input_ids": rng.integers(0, 30522, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
        }
        names = {i.name for i in next(iter(sessions.values())).get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        # Shrunk compile vs its zeroed model (exactness at the benchmark shape).
        for tag, info in variants.items():
            if info["fraction"]:
                want = run(load(info["source"]).model, feeds)
                got = dict(zip([o.name for o in sessions[tag].get_outputs()], sessions[tag].run(None, feeds)))
                info.setdefault("shrunk_vs_zeroed_max_abs", {})[f"b{batch}s{seq}"] = max(
                    float(np.abs(got[k] - want[k]).max()) for k in want
                )
                info.setdefault("shrunk_vs_zeroed_max_rel", {})[f"b{batch}s{seq}"] = max(
                    float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want
                )
        log(f"timing b{batch} s{seq}, {rounds} rounds")
        runners = {tag: (lambda s=s: s.run(None, feeds)) for tag, s in sessions.items()}
        times = harness.interleave(runners, rounds, WARMUP)
        shape_key = f"b{batch}s{seq}"
        timings[shape_key] = {tag: {"median_ms": harness.median(t, ms=True), "p90_ms": harness.p90(t, ms=True)}
                              for tag, t in times.items()}
        for tag in timings[shape_key]:
            timings[shape_key][tag]["ratio"] = timings[shape_key][tag]["median_ms"] / timings[shape_key]["unpruned"]["median_ms"]
    for info in variants.values():
        info.pop("path")
        info.pop("source")
    return {"variants": variants, "timings": timings, "rounds": rounds, "warmup": WARMUP}


def bench_minilm(workdir: pathlib.Path, fractions: list[float]) -> dict:
    import transformers

    from tfgraph.compiler import prune
    from tfgraph.compiler.export import export
    from tfgraph.ir import load
    from tfgraph.models import minilm_path
    from tfgraph.compiler.verify import run

    log("export minilm (dynamo)")
    exported = export("minilm", workdir / "minilm.onnx")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))

    def tokens(sentences):
        t = tokenizer(sentences, padding=True, return_tensors="np")
        return {k: t[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    base_model = load(exported).model
    names = {v.name for v in base_model.graph.inputs}
    feeds = {k: v for k, v in tokens(EVAL_SENTENCES).items() if k in names}
    calibration = {k: v for k, v in tokens(CALIBRATION_SENTENCES).items() if k in names}
    reference = run(base_model, feeds)["sentence_embedding"]
    rows = []
    for score in ("l2", "activation"):
        for fraction in fractions:
            model = load(exported).model
            report = prune.prune_structured(model, heads=fraction, neurons=fraction, score=score,
                                            calibration=calibration if score == "activation" else None)
            emb = run(model, feeds)["sentence_embedding"]
            cos = np.sum(emb * reference, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
            rows.append({"score": score, "fraction": fraction, "heads_pruned": report["heads_pruned"],
                         "heads_total": report["heads_total"], "neurons_pruned": report["neurons_pruned"],
                         "neurons_total": report["neurons_total"], "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min())})
            log(f"minilm {score} {fraction}: cosine mean {cos.mean():.4f} min {cos.min():.4f}")
    return {"sentences": len(EVAL_SENTENCES), "calibration_sentences": len(CALIBRATION_SENTENCES), "rows": rows}


def render(report: dict) -> str:
    b = report["bert"]
    lines = [
        "# Compression: pruned-and-shrunk BERT-base on CPU (cpu-fp32)",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']['cpu']}, {report['machine']['usable_cores']} usable cores, "
        f"ISA {'/'.join(report['machine'].get('isa', [])) or '?'}; shared and noisy",
        f"- onnxruntime CPU, {THREADS} intra-op threads, ORT_ENABLE_ALL, {b['warmup']} warm-up runs, "
        f"{b['rounds']} interleaved round-robin rounds, medians",
        "- model: HF `BertModel(BertConfig())` random init (seed 0), dynamo export; pruning: "
        "`tfgraph.compiler.prune.prune_structured(heads=f, neurons=f, score='l2')` (global ranking), compiled with "
        "`tfgraph.compile(target='cpu-fp32')` (shrink-pruned removes the zeroed heads/neurons)",
        f"- command: `python benchmarks/bench_compression.py --rounds {b['rounds']}`",
        "",
        "| variant | heads kept | neurons kept | weight bytes | ratio | encoder-only ratio | "
        + " | ".join(f"{k} median ms (ratio)" for k in b["timings"]) + " | shrunk vs zeroed (max abs diff / max abs output) |",
        "|---|---|---|---|---|---|" + "---|" * len(b["timings"]) + "---|",
    ]
    for tag, info in b["variants"].items():
        p = info.get("prune")
        heads = f"{p['heads_total'] - p['heads_pruned']}/{p['heads_total']}" if p else "all"
        neurons = f"{p['neurons_total'] - p['neurons_pruned']}/{p['neurons_total']}" if p else "all"
        cells = " | ".join(f"{b['timings'][k][tag]['median_ms']:.1f} ({b['timings'][k][tag]['ratio']:.2f}x)" for k in b["timings"])
        err = info.get("shrunk_vs_zeroed_max_rel")
        err_s = ", ".join(f"{v:.1e}" for v in err.values()) if err else "—"
        lines.append(
            f"| {tag} | {heads} | {neurons} | {info['weights']['bytes_after'] / 2**20:.1f} MiB | {info['bytes_ratio']:.3f}x | "
            f"{info['encoder_bytes_ratio']:.3f}x | {cells} | {err_s} |"
        )
    lines += ["", "Heads per layer after shrinking (global ranking, so counts differ per layer):", ""]
    for tag, info in b["variants"].items():
        lines.append(f"- {tag}: {info['num_heads']}")
    m = report.get("minilm")
    if m:
        lines += [
            "",
            "## Output change of pruning itself: all-MiniLM-L6-v2 (real weights)",
            "",
            f"Sentence-embedding cosine of the zeroed model to the unpruned one on {m['sentences']} real English "
            f"sentences (activation score calibrated on {m['calibration_sentences']} other sentences); no fine-tuning.",
            "",
            "| score | pruned | heads pruned | neurons pruned | cosine mean | cosine min |",
            "|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['score']} | {int(r['fraction'] * 100)}% | {r['heads_pruned']}/{r['heads_total']} | "
                f"{r['neurons_pruned']}/{r['neurons_total']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="only b1 s128 and 30%%")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--workdir", default=None, help="where the temporary models go (default: the system temp folder)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    fractions = [0.3] if args.quick else [0.3, 0.5]
    shapes = [(1, 128)] if args.quick else [(1, 128), (4, 128)]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": harness.machine()}
    with tempfile.TemporaryDirectory(prefix="bench-compression-", dir=args.workdir) as tmp:
        workdir = pathlib.Path(tmp)
        report["bert"] = bench_bert(workdir, fractions, args.rounds, shapes)
        if not args.no_minilm:
            report["minilm"] = bench_minilm(workdir, [0.3, 0.5])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
