#!/usr/bin/env python
"""Precision on CPU: tfgraph cpu-int8 vs onnxruntime's quantizers, fp16 accuracy on CPU.

Models: all-MiniLM-L6-v2 (bundled real weights; dynamo export) and BERT-base (HF
``BertModel(BertConfig())``, random init, seed 0, dynamo export). Variants, all from the same export:

- ``fp32``: ``tfgraph.compile(target="cpu-fp32")``
- ``tfgraph cpu-int8``: ``tfgraph.compile(target="cpu-int8")`` calibrated/budgeted on the
  calibration sentences below (MiniLM) or generated token ids (BERT-base)
- ``tfgraph cpu-int8 (before ...)``: the recipe before issue 20 (packed Q/K/V as DynamicQuantizeMatMul +
  Split + MultiHeadAttention, no outlier-channel pass, max-drop reverts), a profile defined here
- ``ort dynamic (defaults)``: ``quantize_dynamic`` with defaults on the fp32 compile
- ``ort dynamic MatMul per-channel``: ``quantize_dynamic(op_types_to_quantize=["MatMul"], per_channel=True)``
- ``ort static QDQ per-channel``: ``quantize_static(QuantFormat.QDQ, per_channel=True)`` (u8 activations,
  s8 weights, min-max), calibrated on the same data
- ``tfgraph fp16`` (MiniLM only, accuracy): cpu-fp32 + ``convert-float16``; onnxruntime CPU computes
  many fp16 ops in fp32 behind inserted Casts, so its latency says nothing about fp16 hardware.

All onnxruntime quantizer calls pass ``extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}``
(it crashes on these graphs without it). Accuracy: MiniLM sentence-embedding cosine (per sentence,
mean and min) on held-out real sentences; BERT-base cosine of last_hidden_state on random token ids.
Latency: onnxruntime CPU, 2 intra-op threads, ORT_ENABLE_ALL, warm-up, then round-robin rounds
(rotating start, ``benchmarks/harness.py``), medians and per-round paired ratios (to fp32 and to
``quantize_dynamic`` defaults). Ceilings measured in the same run, before and after each shape's
rounds (``harness.probes``): fp32 GEMM, int8 GEMM (MatMulInteger u8×s8 1024×768×3072), copy bandwidth;
each variant's share of the int8 GEMM rate = linear-layer GEMM work / latency / int8 probe rate.
``--profile RUNS`` adds onnxruntime's per-op-type profile of fp32, cpu-int8 (now and before) and the
defaults. Size: bytes of the model files.

Usage::

    python benchmarks/bench_precision.py --rounds 20 --profile 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from tfgraph.models import sentences

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "precision_cpu.md"
THREADS = 2
WARMUP = 2

CALIBRATION = sentences.CALIBRATION
EVAL = sentences.HELD_OUT


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def session(path: pathlib.Path):
    return harness.session(path, THREADS)


def linear_ops(path: pathlib.Path, tokens: int) -> float:
    """Integer-GEMM work of one forward: 2 x tokens x K x N summed over the linear layers (MatMul/Gemm
    with a constant 2-D weight, the packed Attention's Q/K/V weight) of the fp32 model; the attention
    core (QK^T, PV) is not counted."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Attention") and len(node.input) > 1 and len(shapes.get(node.input[1], ())) == 2:
            k, n = shapes[node.input[1]]
            total += 2 * tokens * k * n
    return float(total)


def size(path: pathlib.Path) -> int:
    total = path.stat().st_size
    for extra in path.parent.iterdir():
        if extra != path and extra.name.startswith(path.stem) and extra.suffix in (".data", ".bin", ""):
            total += extra.stat().st_size
    return total


def interleave(sessions: dict, feeds: dict, rounds: int) -> dict[str, list[float]]:
    return harness.interleave({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds, WARMUP)


class Reader:
    """onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def ort_variants(fp32_path: pathlib.Path, work: pathlib.Path, calib_batches) -> dict[str, dict]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    out: dict[str, dict] = {}
    recipes = {
        "ort dynamic (defaults)": lambda p: quantize_dynamic(str(fp32_path), str(p), extra_options=extra),
        "ort dynamic MatMul per-channel": lambda p: quantize_dynamic(
            str(fp32_path), str(p), op_types_to_quantize=["MatMul"], per_channel=True, extra_options=extra),
        "ort static QDQ per-channel": lambda p: quantize_static(
            str(fp32_path), str(p), Reader(calib_batches), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra),
    }
    for name, make in recipes.items():
        path = work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        start = time.perf_counter()
        try:
            make(path)
            out[name] = {"path": path, "build_s": time.perf_counter() - start}
        except Exception as e:  # report, do not hide
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            log(f"{name} failed: {out[name]['error']}")
    if "path" in out.get(ORT_DEFAULTS, {}):
        masked = work / "ort_defaults_masked.onnx"
        if with_mask_index(out[ORT_DEFAULTS]["path"], masked):
            out[ORT_MASKED] = {"path": masked}
    return out


ORT_MASKED = "ort dynamic (defaults) + mask_index"
NOTES_MARKER = "<!-- analysis: kept when the tables are rewritten -->"


def with_mask_index(src: pathlib.Path, dst: pathlib.Path) -> bool:
    """``quantize_dynamic`` turns the packed Attention into QAttention and drops its attention bias (a padded
    batch then attends to its padding); this copy feeds ``attention_mask`` to every QAttention as its 2-D
    ``mask_index``: the defaults recipe with correct padding, to time the mask's kernel cost."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    if "attention_mask" not in {i.name for i in model.graph.input}:
        return False
    nodes = [n for n in model.graph.node if n.op_type == "QAttention"]
    if not nodes:
        return False
    for n in nodes:
        while len(n.input) < 6:
            n.input.append("")
        n.input[5] = "attention_mask_int32"
    model.graph.node.insert(0, helper.make_node("Cast", ["attention_mask"], ["attention_mask_int32"], to=TensorProto.INT32))
    onnx.save(model, str(dst))
    return True


def previous_int8_target():
    """cpu-int8 as it was before issue 20 (packed Q/K/V as DynamicQuantizeMatMul + Split +
    MultiHeadAttention, no outlier-channel pass): a profile defined here for the comparison."""
    import dataclasses

    from tfgraph.passes.registry import PassSpec
    from tfgraph.targets.cpu import CPU_INT8, CPU_INT8_SCHEME
    from tfgraph.targets.profile import Phase

    phases = tuple(Phase(ph.name, (PassSpec("quantize", CPU_INT8_SCHEME.to_options()),)) if ph.name == "precision" else ph
                   for ph in CPU_INT8.phases)
    return dataclasses.replace(CPU_INT8, name="bench-cpu-int8-before", phases=phases)


INT8 = "tfgraph cpu-int8"
BEFORE = "tfgraph cpu-int8 (before: DQMM+MHA, budget reverts)"
ORT_DEFAULTS = "ort dynamic (defaults)"


def bench_model(tag, source, work, calibration, eval_batches, shapes, rounds, embedding_output, fp16=False, max_drop=None,
                profile_runs=0):
    import tfgraph
    from tfgraph.compiler.verify import run
    from tfgraph.ir import load

    variants: dict[str, dict] = {}
    log(f"{tag}: compile cpu-fp32")
    tfgraph.compile(str(source), "cpu-fp32", output=work / "fp32", force=True, verify=False)
    fp32_path = work / "fp32" / "model.onnx"
    variants["fp32 (tfgraph cpu-fp32)"] = {"path": fp32_path}
    for name, target, folder in ((INT8, "cpu-int8", "int8"), (BEFORE, previous_int8_target(), "int8_before")):
        log(f"{tag}: compile {name}")
        start = time.perf_counter()
        artifact = tfgraph.compile(str(source), target, output=work / folder, force=True, calibration=calibration,
                                   max_drop=max_drop)
        prec = artifact.manifest["precision"]
        variants[name] = {"path": work / folder / "model.onnx", "build_s": time.perf_counter() - start,
                          "reverted": prec["max_drop"]["reverted"] if prec["max_drop"] else [],
                          "budget_score": prec["score"], "passes": prec["passes"]}
    if fp16:
        log(f"{tag}: compile cpu-fp32 + convert-float16")
        try:
            art16 = tfgraph.compile(str(source), fp16_target(), output=work / "fp16", force=True, calibration=calibration)
            fp16_pass = art16.manifest["precision"]["passes"][0]
            variants["tfgraph fp16 (accuracy only)"] = {
                "path": work / "fp16" / "model.onnx",
                "kept_float32": len(fp16_pass["kept_float32"]),
                "kept_reasons": fp16_pass["kept_float32"],
                "converted": fp16_pass["converted_nodes"],
                "verified": art16.manifest["verification"]["passed"],
            }
        except Exception as e:
            variants["tfgraph fp16 (accuracy only)"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            log(f"fp16 failed: {variants['tfgraph fp16 (accuracy only)']['error']}")
    log(f"{tag}: onnxruntime quantizers")
    calib_feeds = calibration.batches if hasattr(calibration, "batches") else None
    variants.update(ort_variants(fp32_path, work, calib_feeds))

    # accuracy
    base = load(source).model
    ref = [run(base, b)[embedding_output] for b in eval_batches]
    for name, info in variants.items():
        if "path" not in info:
            continue
        info["bytes"] = size(info["path"])
        s = session(info["path"])
        got = [s.run([embedding_output], b)[0] for b in eval_batches]
        rows = np.concatenate([
            ((g.reshape(len(g), -1) * r.reshape(len(r), -1)).sum(1)
             / (np.linalg.norm(g.reshape(len(g), -1), axis=1) * np.linalg.norm(r.reshape(len(r), -1), axis=1)))
            for g, r in zip(got, ref)])
        info["cosine_mean"] = float(rows.mean())
        info["cosine_min"] = float(rows.min())
        info["finite"] = bool(all(np.isfinite(g).all() for g in got))
        log(f"{tag} {name}: cosine {rows.mean():.5f} (min {rows.min():.5f}), {info['bytes'] / 2**20:.1f} MiB")

    timings, profiles = {}, {}
    rng = np.random.default_rng(0)
    timed = {k: v for k, v in variants.items() if "path" in v and "fp16" not in k}
    for batch, seq in shapes:
        feeds = {"input_ids": rng.integers(1000, 30000, (batch, seq), dtype=np.int64),
                 "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}
        sessions = {k: session(v["path"]) for k, v in timed.items()}
        names = {i.name for i in next(iter(sessions.values())).get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        key = f"b{batch} s{seq}"
        log(f"{tag}: timing {key} (+ ceiling probes in the same run)")
        probe = harness.probes(THREADS, rounds=max(5, rounds // 2))
        times = interleave(sessions, feeds, rounds)
        probe_after = harness.probes(THREADS, rounds=max(5, rounds // 2))
        int8_rate = (probe["int8_gops"] + probe_after["int8_gops"]) / 2 * 1e9
        fp32_rate = (probe["fp32_gflops"] + probe_after["fp32_gflops"]) / 2 * 1e9
        ops = linear_ops(fp32_path, batch * seq)
        vs_fp32 = harness.paired_ratios(times, "fp32 (tfgraph cpu-fp32)")
        vs_ort = harness.paired_ratios(times, ORT_DEFAULTS) if ORT_DEFAULTS in times else {}
        timings[key] = {
            k: {"median_ms": harness.median(v, ms=True), "p90_ms": harness.p90(v, ms=True), "ratio": vs_fp32[k],
                "vs_ort_defaults": vs_ort.get(k), "int8_share": ops / harness.median(v) / int8_rate,
                "fp32_share": ops / harness.median(v) / fp32_rate}
            for k, v in times.items()}
        timings[key]["_probes"] = {"before": probe, "after": probe_after, "linear_gop": ops / 1e9}
        log(f"{tag} {key}: " + ", ".join(f"{k} {timings[key][k]['median_ms']:.1f} ms" for k in times)
            + f"; int8 probe {int8_rate / 1e9:.0f} GOP/s")
        del sessions
        if profile_runs:
            profiles[key] = harness.op_profiles(
                {k: v["path"] for k, v in timed.items() if k in ("fp32 (tfgraph cpu-fp32)", INT8, BEFORE, ORT_DEFAULTS, ORT_MASKED)},
                feeds, runs=profile_runs, threads=THREADS)
    for info in variants.values():
        info.pop("path", None)
    return {"variants": variants, "timings": timings, "profiles": profiles}


def fp16_target():
    """cpu-fp32 + convert-float16, with an fp16 tolerance: a profile defined here, not registered
    (fp16 on onnxruntime CPU is no faster than fp32; the CUDA fp16 profile is separate work)."""
    import dataclasses

    from tfgraph.passes.registry import PassSpec
    from tfgraph.targets import Tolerance
    from tfgraph.targets.cpu import CPU_FP32

    from tfgraph.targets.profile import Phase

    return dataclasses.replace(
        CPU_FP32, name="bench-cpu-fp16", precision="fp16", min_cosine=None,
        phases=CPU_FP32.phases + (Phase("precision", (PassSpec("convert-float16"),)),
                                  Phase("finish", (PassSpec("dedup-initializers"), PassSpec("remove-dead")))),
        tolerance=Tolerance(atol=2e-2, rtol=2e-2))


def fp16_only(source, work, calib, evals, out: pathlib.Path) -> int:
    import tfgraph
    from tfgraph.ir import load
    from tfgraph.compiler.verify import run

    art = tfgraph.compile(str(source), fp16_target(), output=work / "fp16", force=True, calibration=calib)
    base = load(source).model
    s = session(work / "fp16" / "model.onnx")
    rows = []
    for b in evals:
        ref = run(base, b)["sentence_embedding"]
        got = s.run(["sentence_embedding"], b)[0]
        rows.append((ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)))
    rows = np.concatenate(rows)
    fp16_pass = art.manifest["precision"]["passes"][0]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "cosine_mean": float(rows.mean()), "cosine_min": float(rows.min()),
              "verification_passed": art.manifest["verification"]["passed"],
              "accuracy_on_calibration": art.manifest["precision"]["accuracy_vs_fp32"],
              "converted_nodes": fp16_pass["converted_nodes"], "kept_float32": fp16_pass["kept_float32"],
              "clamped_constants": fp16_pass["clamped_constants"], "bytes": size(work / "fp16" / "model.onnx"),
              "note": "onnxruntime CPU computes many fp16 ops in fp32 behind inserted Casts: accuracy, not speed"}
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("cosine_mean", "cosine_min", "verification_passed", "converted_nodes", "bytes")}))
    return 0


def machine() -> dict:
    m = harness.machine()
    m["load_average_1m_at_start"] = m.pop("load_average_1m")
    return m


def _profile_table(profiles: dict) -> list[str]:
    """Per op type, ms per run (share of kernel time), for each profiled variant."""
    lines = []
    for shape, per_variant in profiles.items():
        ops = []
        for prof in per_variant.values():
            for op, d in prof["ops"].items():
                if d["share"] >= 0.005 and op not in ops:
                    ops.append(op)
        names = list(per_variant)
        lines += [f"Where the time goes, {shape} (onnxruntime profiler, kernel time per run, ms (share)):", "",
                  "| op type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for op in ops:
            cells = []
            for n in names:
                d = per_variant[n]["ops"].get(op)
                cells.append(f"{d['ms_per_run']:.1f} ({d['share'] * 100:.0f}%) x{d['nodes']}" if d else "—")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        lines.append("| total | " + " | ".join(f"{per_variant[n]['total_ms_per_run']:.1f}" for n in names) + " |")
        lines.append("")
    return lines


def render(report: dict) -> str:
    m = report["machine"]
    isa = ", ".join(m["isa"]) or "none listed"
    lines = [
        "# Precision on CPU: tfgraph cpu-int8 vs onnxruntime quantizers",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']} (ISA: {isa}), {m['usable_cores']} usable cores, {m.get('versions', {})}; "
        f"**shared and under contention** (1-minute load average {m['load_average_1m_at_start']:.1f} at start on "
        f"{m['usable_cores']} cores): absolute latencies are noisy, the ratios are per-round paired medians",
        f"- onnxruntime CPU, {THREADS} intra-op threads, ORT_ENABLE_ALL, {WARMUP} warm-up runs, "
        f"{report['rounds']} interleaved rounds (rotating start), medians; `x fp32` and `x ort` are medians of the "
        "per-round ratios to tfgraph cpu-fp32 and to `quantize_dynamic` defaults",
        f"- command: `{report.get('command', 'python benchmarks/bench_precision.py')}`",
        "- int8 share: linear-layer GEMM work (2·tokens·K·N over the fp32 model's MatMul/packed-Attention weights; "
        "attention core not counted) / median latency / the int8 GEMM probe measured in the same run "
        "(onnxruntime MatMulInteger u8×s8, M×K×N = 1024×768×3072, 2 threads, before and after the timing rounds)",
        "- MiniLM accuracy: sentence-embedding cosine to the fp32 export on "
        f"{len(EVAL)} held-out real sentences (calibration/budget on {len(CALIBRATION)} others); "
        "BERT-base (random init): cosine of last_hidden_state rows on random token ids",
        "- fp16 row: onnxruntime CPU runs many fp16 ops in fp32 behind inserted Casts; accuracy only, not timed",
        "",
    ]
    for tag, res in report["models"].items():
        shapes = list(res["timings"])
        lines += [f"## {tag}", ""]
        for s in shapes:
            pr = res["timings"][s]["_probes"]
            lines.append(f"- {s} ceilings (same run, before / after): int8 MatMulInteger {pr['before']['int8_gops']:.0f} / "
                         f"{pr['after']['int8_gops']:.0f} GOP/s, fp32 MatMul {pr['before']['fp32_gflops']:.0f} / "
                         f"{pr['after']['fp32_gflops']:.0f} GFLOP/s, DynamicQuantizeMatMul {pr['before']['dqmm_gops']:.0f} GOP/s, "
                         f"copy {pr['before']['copy_gbs']:.1f} GB/s; linear work {pr['linear_gop']:.1f} GOP per run")
        lines += ["",
                  "| variant | size MiB | cosine mean | cosine min | "
                  + " | ".join(f"{s} ms (x fp32, x ort) | {s} int8 share" for s in shapes) + " | notes |",
                  "|---|---|---|---|" + "---|---|" * len(shapes) + "---|"]
        for name, info in res["variants"].items():
            if "error" in info:
                lines.append(f"| {name} | — | — | — | " + " | ".join("— | —" for _ in shapes) + f" | failed: {info['error']} |")
                continue
            cells = []
            for s in shapes:
                t = res["timings"][s].get(name)
                if t is None:
                    cells.append("— | —")
                    continue
                vs = f", {t['vs_ort_defaults']:.3f}x" if t.get("vs_ort_defaults") is not None else ""
                cells.append(f"{t['median_ms']:.1f} ({t['ratio']:.2f}x{vs}) | {t['int8_share'] * 100:.0f}%")
            notes = []
            if info.get("reverted") is not None and "cpu-int8" in name:
                notes.append(f"max-drop reverted {len(info['reverted'])} node(s)")
            if "kept_float32" in info:
                notes.append(f"{info['converted']} nodes fp16, {info['kept_float32']} kept fp32")
            if not info.get("finite", True):
                notes.append("NaN/Inf!")
            lines.append(f"| {name} | {info['bytes'] / 2**20:.1f} | {info['cosine_mean']:.5f} | {info['cosine_min']:.5f} | "
                         f"{' | '.join(cells)} | {'; '.join(notes)} |")
        lines.append("")
        lines += _profile_table(res.get("profiles", {}))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-bert", action="store_true")
    parser.add_argument("--fp16-only", action="store_true",
                        help="only MiniLM fp16 accuracy (cpu-fp32 + convert-float16), to precision_fp16_cpu.json")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS",
                        help="also profile fp32, cpu-int8 (now and before) and ort defaults per op type over RUNS runs")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from tfgraph.compiler.calibration import CalibrationSet, tokenize
    from tfgraph.compiler.export import export
    from tfgraph.ir import load
    from tfgraph.models import minilm_path

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "rounds": args.rounds, "models": {},
              "command": "python benchmarks/bench_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    names = ("input_ids", "attention_mask", "token_type_ids")
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        work = pathlib.Path(tmp)
        log("export minilm (dynamo)")
        source = export("minilm", work / "minilm.onnx")
        tok = lambda s: tokenize(s, minilm_path(), names)  # noqa: E731
        calib = CalibrationSet([tok(CALIBRATION[i:i + 8]) for i in range(0, len(CALIBRATION), 8)], "CALIBRATION sentences")
        evals = [tok(EVAL[i:i + 8]) for i in range(0, len(EVAL), 8)]
        (work / "minilm").mkdir()
        if args.fp16_only:
            return fp16_only(source, work / "minilm", calib, evals, args.output.with_name("precision_fp16_cpu.json"))
        report["models"]["all-MiniLM-L6-v2 (real weights)"] = bench_model(
            "minilm", source, work / "minilm", calib, evals, [(1, 128), (8, 128)], args.rounds, "sentence_embedding", fp16=True,
            profile_runs=args.profile)
        if not args.no_bert:
            torch.manual_seed(0)
            folder = work / "hf-bert-base"
            transformers.BertModel(transformers.BertConfig()).eval().save_pretrained(folder)
            log("export bert-base (dynamo)")
            source = export(str(folder), work / "bert-base.onnx")
            rng = np.random.default_rng(1)

            def random_batch(b, s):
                return {"input_ids": rng.integers(1000, 30000, (b, s), dtype=np.int64),
                        "attention_mask": np.ones((b, s), np.int64), "token_type_ids": np.zeros((b, s), np.int64)}

            inputs = {v.name for v in load(source).model.graph.inputs}
            calib = CalibrationSet([{k: v for k, v in random_batch(4, 64).items() if k in inputs} for _ in range(2)],
                                   "random token ids")
            evals = [{k: v for k, v in random_batch(4, 64).items() if k in inputs}]
            (work / "bert").mkdir()
            report["models"]["BERT-base (random init)"] = bench_model(
                "bert", source, work / "bert", calib, evals, [(1, 128), (8, 128)], args.rounds, "last_hidden_state",
                max_drop=0.99, profile_runs=args.profile)  # random weights: raw int8 accuracy, no revert budget
    args.output.parent.mkdir(parents=True, exist_ok=True)
    notes = ""
    if args.output.exists() and NOTES_MARKER in args.output.read_text():  # hand-written analysis below the tables
        notes = args.output.read_text().split(NOTES_MARKER, 1)[1]
    args.output.write_text(render(report) + NOTES_MARKER + notes)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
