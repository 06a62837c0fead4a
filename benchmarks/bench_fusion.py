#!/usr/bin/env python
"""CPU latency of tfgraph vs. its peers, interleaved in one run.

For each model, both torch exporters (TorchScript and dynamo) are used, and for each
export four variants are built:

* ``raw``               the exported ONNX as is;
* ``ort-transformers``  ``onnxruntime.transformers.optimizer.optimize_model`` (fp32,
                        the model type's default ``opt_level``, CPU);
* ``onnxscript``        ``onnxscript.rewriter.ort_fusions.optimize_for_ort``;
* ``tfgraph``           ``tfgraph.compile(path, target="cpu-fp32")``.

Every variant runs in onnxruntime CPU with ``intra_op_num_threads=2``,
``inter_op_num_threads=1``, ``ORT_ENABLE_ALL`` and sequential execution. For each
(model, shape) all sessions of both exports are built first, each gets 3 warm-up runs,
then ``--rounds`` rounds run every variant once in round-robin order (the starting
variant rotates each round; ``benchmarks/harness.py``). A large fp32 MatMul (the harness's fp32
probe, ``harness.probe_runners``) runs as one more variant of the same rotation and gives the
machine's GEMM rate at that moment; each variant's matmul GFLOP/s
(``tfgraph.compiler.flops.estimate_flops`` on the raw TorchScript export) is reported as a fraction
of it. The harness's ceiling probes (``harness.probes``) run once at the start, for the record.

A peer that crashes, or whose model onnxruntime cannot load or run, is recorded with a
one-line error instead of a number.

Usage::

    python benchmarks/bench_fusion.py                      # required set, 20 rounds
    python benchmarks/bench_fusion.py --optional           # + minilm b8 s512
    python benchmarks/bench_fusion.py --quick --rounds 3   # smoke test
    python benchmarks/bench_fusion.py --models minilm --out benchmarks/results/x.md

Writes a markdown table to ``--out`` (default ``benchmarks/results/fusion_cpu.md``) and
the raw numbers as JSON beside it (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fusion_cpu.md"

EXPORTERS = ("torchscript", "dynamo")
VARIANTS = ("raw", "ort-transformers", "onnxscript", "tfgraph")
PEERS = ("raw", "ort-transformers", "onnxscript")
THREADS = 2
WARMUP = 3
GEMM_SHAPE = (2048, 2048, 2048)  # M, K, N

# (batch, sequence) per model; the optional ones run only with --optional.
SHAPES = {
    "minilm": [(1, 128), (8, 128), (1, 512), (8, 512)],
    "bert-base": [(1, 128), (8, 128)],
    "gpt2": [(1, 128), (8, 128)],
}
OPTIONAL_SHAPES = {("minilm", (8, 512))}  # only with --optional
QUICK_SHAPES = {"minilm": [(1, 128)], "bert-base": [(1, 128)], "gpt2": [(1, 128)]}
MODELS = tuple(SHAPES)

_LOG = sys.stderr  # replaced by a dup of the real stderr while noisy steps run


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=_LOG, flush=True)


def one_line(error: BaseException, where: bool = False) -> str:
    """The error as one line: type and first non-empty line of its message; with ``where``, the innermost frame."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if where and error.__traceback__ is not None:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        text += f" (in {pathlib.Path(frame.filename).name}:{frame.lineno} {frame.name})"
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def silenced(logfile: pathlib.Path):
    """Send stdout/stderr (Python and file descriptors 1/2) and warnings to ``logfile``."""
    global _LOG
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    real_err = os.fdopen(os.dup(2), "w")
    previous_log = _LOG
    with open(logfile, "a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        _LOG = real_err
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            _LOG = previous_log
            real_err.close()


# --- models ------------------------------------------------------------------------


def hf_folder(name: str, workdir: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A Hugging Face checkpoint folder for ``name`` and its config as a dict."""
    if name == "minilm":
        from tfgraph.models import minilm_path

        folder = minilm_path()
        return folder, json.loads((folder / "config.json").read_text())
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "bert-base":
        model = transformers.BertModel(transformers.BertConfig())
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    else:
        raise ValueError(name)
    model.eval()
    folder = workdir / f"hf-{name}"
    model.save_pretrained(folder)
    del model
    return folder, json.loads((folder / "config.json").read_text())


def model_dims(name: str, config: dict) -> tuple[str, int, int]:
    """(ORT optimizer model_type, num_heads, hidden_size)."""
    if name == "gpt2":
        return "gpt2", int(config["n_head"]), int(config["n_embd"])
    return "bert", int(config["num_attention_heads"]), int(config["hidden_size"])


def model_source(name: str) -> str:
    return {
        "minilm": "all-MiniLM-L6-v2 real weights (tfgraph.compiler.export.export('minilm'), SDPA attention, outputs "
        "last_hidden_state + sentence_embedding)",
        "bert-base": "HF transformers.BertModel(BertConfig()) random init (seed 0), save_pretrained, "
        "tfgraph.compiler.export.export(folder) (SDPA attention, output last_hidden_state)",
        "gpt2": "HF transformers.GPT2LMHeadModel(GPT2Config()) random init (seed 0), save_pretrained, "
        "tfgraph.compiler.export.export(folder) (SDPA attention, output logits, no KV cache)",
    }[name]


# --- variants ----------------------------------------------------------------------


def build_variants(name: str, exporter: str, source, workdir: pathlib.Path, dims: tuple[str, int, int], logfile) -> dict:
    """Export, then build the three other variants. Returns {variant: {"path"|"error", "build_s", ...}}."""
    import onnx_ir as ir

    import tfgraph
    from tfgraph.compiler.export import export

    out: dict[str, dict] = {}
    base = workdir / exporter
    base.mkdir(parents=True, exist_ok=True)
    raw = base / "raw.onnx"
    start = time.perf_counter()
    try:
        with silenced(logfile):
            export(str(source), raw, exporter=exporter)
        out["raw"] = {"path": str(raw), "build_s": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - every failure is a result
        err = one_line(e)
        for v in VARIANTS:
            out[v] = {"error": f"export failed: {err}", "build_s": None}
        return out
    log(f"  {name}/{exporter}: exported in {out['raw']['build_s']:.1f}s")

    model_type, heads, hidden = dims
    path = base / "ort-transformers.onnx"
    start = time.perf_counter()
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with silenced(logfile):
            opt = optimize_model(str(raw), model_type=model_type, num_heads=heads, hidden_size=hidden, use_gpu=False)
            opt.save_model_to_file(str(path), use_external_data_format=False)
            stats = opt.get_fused_operator_statistics()
        out["ort-transformers"] = {
            "path": str(path),
            "build_s": time.perf_counter() - start,
            "settings": {"model_type": model_type, "num_heads": heads, "hidden_size": hidden, "opt_level": "default (1)",
                         "use_gpu": False, "fp16": False},
            "fusions": {k: int(v) for k, v in stats.items() if v},
        }
        del opt
    except Exception as e:  # noqa: BLE001
        out["ort-transformers"] = {"error": f"optimizer crashed: {one_line(e, where=True)}", "build_s": time.perf_counter() - start}
    log(f"  {name}/{exporter}: ort-transformers {'ok' if 'path' in out['ort-transformers'] else out['ort-transformers']['error']}")

    path = base / "onnxscript.onnx"
    start = time.perf_counter()
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with silenced(logfile):
            model = ir.load(str(raw))
            result = optimize_for_ort(model)
            model, counts = result if isinstance(result, tuple) else (result, {})
            ir.save(model, str(path))
        out["onnxscript"] = {"path": str(path), "build_s": time.perf_counter() - start,
                             "fusions": {k: int(v) for k, v in dict(counts).items() if v}}
        del model
    except Exception as e:  # noqa: BLE001
        out["onnxscript"] = {"error": f"optimize_for_ort crashed: {one_line(e, where=True)}", "build_s": time.perf_counter() - start}
    log(f"  {name}/{exporter}: onnxscript {'ok' if 'path' in out['onnxscript'] else out['onnxscript']['error']}")

    folder = base / "tfgraph"
    start = time.perf_counter()
    try:
        with silenced(logfile):
            artifact = tfgraph.compile(str(raw), target="cpu-fp32", output=folder, force=True)
        manifest = artifact.manifest
        out["tfgraph"] = {
            "path": str(folder / "model.onnx"),
            "build_s": time.perf_counter() - start,
            "session_options": manifest.get("session_options"),
            "attention": manifest.get("attention"),
            "warnings": manifest.get("warnings"),
            "verification": {k: v for k, v in (manifest.get("verification") or {}).items() if k in ("passed", "outputs")},
        }
        del artifact
    except Exception as e:  # noqa: BLE001
        out["tfgraph"] = {"error": f"tfgraph.compile failed: {one_line(e, where=not isinstance(e, tfgraph.TfgraphError))}", "build_s": time.perf_counter() - start}
    log(f"  {name}/{exporter}: tfgraph {'ok' if 'path' in out['tfgraph'] else out['tfgraph']['error']}")
    return out


def fused_attention(path: str) -> int | None:
    import onnx_ir as ir

    from tfgraph.analysis import attention_blocks

    try:
        return int(attention_blocks(ir.load(path))["fused"])
    except Exception:  # noqa: BLE001
        return None


def make_feeds(sess, vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    feeds = {}
    for inp in sess.get_inputs():
        dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}.get(inp.type, np.int64)
        if inp.name == "input_ids":
            feeds[inp.name] = ids.astype(dtype)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones((batch, seq), dtype=dtype)
        elif "token_type" in inp.name:
            feeds[inp.name] = np.zeros((batch, seq), dtype=dtype)
        elif "position" in inp.name:
            feeds[inp.name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        else:
            raise ValueError(f"unexpected model input {inp.name!r}")
    return feeds


def feeds_for(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ValueError(f"model wants inputs {missing} the raw export does not have")
    return {n: feeds[n] for n in names}


def max_abs_err(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, ref in reference.items():
        got = outputs.get(name)
        if got is None:
            return float("nan")
        if got.shape != ref.shape:
            return float("inf")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
        if np.isnan(got).sum() != np.isnan(ref).sum():
            return float("nan")
    return worst


# --- timing --------------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1e3
    return {"median_ms": harness.median(arr), "p90_ms": harness.p90(arr), "min_ms": float(arr.min()),
            "samples_ms": [round(float(x), 4) for x in arr]}


# --- per model ---------------------------------------------------------------------


def bench_model(name: str, shapes: list[tuple[int, int]], rounds: int, workdir: pathlib.Path, logfile,
                result: dict, checkpoint) -> dict:
    """Fill ``result`` for model ``name``; ``checkpoint()`` is called after every finished (model, shape)."""
    import onnx_ir as ir

    from tfgraph.compiler.flops import estimate_flops

    log(f"{name}: preparing the Hugging Face folder")
    with silenced(logfile):
        folder, config = hf_folder(name, workdir)
    vocab = int(config["vocab_size"])
    dims = model_dims(name, config)
    source = "minilm" if name == "minilm" else folder
    result.update({"model": name, "source": model_source(name), "ort_model_type": dims[0],
                   "num_heads": dims[1], "hidden_size": dims[2], "builds": {}, "shapes": []})
    built: dict[tuple[str, str], dict] = {}
    for exporter in EXPORTERS:
        variants = build_variants(name, exporter, source, workdir / name, dims, logfile)
        for variant, info in variants.items():
            built[(exporter, variant)] = info
        result["builds"][exporter] = variants

    # Sessions: one per (exporter, variant); a load failure is a result.
    sessions: dict[tuple[str, str], Any] = {}
    fused: dict[tuple[str, str], int | None] = {}
    for key, info in built.items():
        if "path" not in info:
            continue
        fused[key] = fused_attention(info["path"])
        info["fused_attention"] = fused[key]
        try:
            with silenced(logfile):
                sessions[key] = harness.session(info["path"], THREADS)
        except Exception as e:  # noqa: BLE001
            info["error"] = f"onnxruntime cannot load it: {one_line(e)}"
    gemm = harness.probe_runners(THREADS, GEMM_SHAPE, kinds=("fp32",))  # {"probe:fp32": A @ B, B a constant weight}
    gemm_flops = 2.0 * GEMM_SHAPE[0] * GEMM_SHAPE[1] * GEMM_SHAPE[2]
    log(f"{name}: {len(sessions)} sessions built")

    for batch, seq in shapes:
        label = f"b{batch} s{seq}"
        log(f"{name} {label}: accuracy + FLOPs")
        any_sess = next(iter(sessions.values()), None)
        if any_sess is None:
            break
        feed_source = sessions.get(("torchscript", "raw")) or sessions.get(("dynamo", "raw")) or any_sess
        feeds = make_feeds(feed_source, vocab, batch, seq, seed=1000 * batch + seq)
        shape_result: dict[str, Any] = {"batch": batch, "seq": seq, "variants": {}}

        # Reference: each exporter's raw export, unoptimized (ORT_DISABLE_ALL).
        references: dict[str, dict[str, np.ndarray]] = {}
        for exporter in EXPORTERS:
            info = built[(exporter, "raw")]
            if "path" not in info:
                continue
            try:
                with silenced(logfile):
                    ref_sess = harness.session(info["path"], THREADS, optimization="ORT_DISABLE_ALL")
                    names = [o.name for o in ref_sess.get_outputs()]
                    references[exporter] = dict(zip(names, ref_sess.run(None, feeds_for(ref_sess, feeds))))
                del ref_sess
            except Exception as e:  # noqa: BLE001
                info.setdefault("reference_error", one_line(e))
        if len(references) == 2:
            shape_result["raw_torchscript_vs_raw_dynamo_max_abs"] = max_abs_err(references["dynamo"], references["torchscript"])

        # FLOPs of the matrix products, from the raw exports.
        flops: dict[str, int] = {}
        for exporter in EXPORTERS:
            info = built[(exporter, "raw")]
            if "path" in info:
                try:
                    with silenced(logfile):
                        model = ir.load(info["path"])
                        flops[exporter] = int(estimate_flops(model, feeds_for(feed_source, feeds))["total"])
                    del model
                except Exception as e:  # noqa: BLE001
                    shape_result.setdefault("flops_errors", {})[exporter] = one_line(e)
        shape_result["matmul_flops"] = flops
        model_flops = flops.get("torchscript") or flops.get("dynamo")
        shape_result["matmul_flops_used"] = model_flops
        gc.collect()

        runners: dict[str, Any] = {}
        for (exporter, variant), sess in sessions.items():
            key = f"{exporter}/{variant}"
            entry: dict[str, Any] = {"exporter": exporter, "variant": variant, "fused_attention": fused.get((exporter, variant))}
            shape_result["variants"][key] = entry
            try:
                mine = feeds_for(sess, feeds)
                names = [o.name for o in sess.get_outputs()]
                outputs = dict(zip(names, sess.run(None, mine)))
                ref = references.get(exporter)
                entry["max_abs_err"] = max_abs_err(outputs, ref) if ref is not None else None
                del outputs
                runners[key] = (lambda s=sess, f=mine: s.run(None, f))
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"onnxruntime fails to run it: {one_line(e)}"
        for (exporter, variant), info in built.items():
            key = f"{exporter}/{variant}"
            if key not in shape_result["variants"]:
                shape_result["variants"][key] = {"exporter": exporter, "variant": variant, "error": info.get("error"),
                                                 "fused_attention": info.get("fused_attention")}
        del references
        gc.collect()
        runners.update(gemm)

        log(f"{name} {label}: timing {len(runners)} runners x {rounds} rounds")
        start = time.perf_counter()
        times = harness.interleave(runners, rounds, WARMUP)
        shape_result["timing_s"] = time.perf_counter() - start
        gemm_gflops = harness.probe_rates(times, GEMM_SHAPE)["fp32_gflops"]
        g = stats(times.pop("probe:fp32"))
        shape_result["gemm"] = {**g, "shape_mkn": list(GEMM_SHAPE), "gflops_median": gemm_gflops,
                                "gflops_best": gemm_flops / (g["min_ms"] * 1e-3) / 1e9}
        for key, samples in times.items():
            entry = shape_result["variants"][key]
            entry.update(stats(samples))
            if model_flops:
                rate = model_flops / (entry["median_ms"] * 1e-3) / 1e9
                entry["gflops"] = rate
                entry["fraction_of_gemm"] = rate / gemm_gflops
        peers = [(e["median_ms"], k) for k, e in shape_result["variants"].items()
                 if e["variant"] in PEERS and "median_ms" in e]
        if peers:
            best_ms, best_key = min(peers)
            shape_result["best_peer"] = {"variant": best_key, "median_ms": best_ms}
            for e in shape_result["variants"].values():
                if "median_ms" in e:
                    e["ratio_vs_best_peer"] = e["median_ms"] / best_ms
        result["shapes"].append(shape_result)
        checkpoint()
        summary = ", ".join(f"{k}={e['median_ms']:.1f}" for k, e in shape_result["variants"].items() if "median_ms" in e)
        log(f"{name} {label}: gemm {gemm_gflops:.0f} GFLOP/s; {summary}")
    del sessions, gemm
    gc.collect()
    return result


# --- report --------------------------------------------------------------------------


def versions() -> dict:
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    import tfgraph

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "tfgraph", "passes", "targets",
                                "models"], capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " (+ uncommitted changes in tfgraph/passes/targets/models)"
    return {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnx_ir": onnx_ir.__version__,
            "tfgraph": tfgraph.__version__, "tfgraph_commit": commit}


def fmt_ms(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_err(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (np.isnan(x) or np.isinf(x)):
        return str(x)
    return "0" if x == 0 else f"{x:.1e}"


def machine_text(m: dict) -> str:
    """The machine line, from ``harness.machine()`` or the older form (cpu_model, logical_cores, simd)."""
    isa = m.get("isa", m.get("simd", []))
    logical = f" ({m['logical_cores']} logical)" if "logical_cores" in m else ""
    load = f", load average {m['load_average_1m']:.1f} at the start" if m.get("load_average_1m") is not None else ""
    return f"{m.get('cpu', m.get('cpu_model'))}, {m['usable_cores']} usable cores{logical}, ISA {'/'.join(isa) or '?'}{load}"


def render(report: dict) -> str:
    m = report["machine"]
    v = report["versions"]
    rates = [s["gemm"]["gflops_median"] for r in report["results"] for s in r["shapes"] if "gemm" in s]
    lines = [
        "# Attention fusion on CPU: tfgraph vs. peers",
        "",
        f"- date: {report['date']}",
        f"- machine: {machine_text(m)}; shared and noisy",
        f"- versions: onnxruntime {v['onnxruntime']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"onnx {v['onnx']}, onnxscript {v['onnxscript']}, onnx-ir {v['onnx_ir']}, tfgraph {v['tfgraph']} @ {v['tfgraph_commit']}",
        f"- sessions: CPUExecutionProvider, intra_op_num_threads={THREADS}, inter_op_num_threads=1, ORT_ENABLE_ALL, "
        "sequential",
        f"- GEMM ({'x'.join(map(str, GEMM_SHAPE))} fp32 MatMul, constant B, interleaved with every block): "
        + (f"median {np.median(rates):.0f} GFLOP/s (blocks range {min(rates):.0f}–{max(rates):.0f})" if rates else "n/a"),
        *([f"- ceilings at the start (`harness.probes`, {'x'.join(map(str, report['probes']['shape_mkn']))}): fp32 GEMM "
           f"{report['probes']['fp32_gflops']:.0f} GFLOP/s, int8 GEMM {report['probes']['int8_gops']:.0f} GOP/s, "
           f"copy {report['probes']['copy_gbs']:.1f} GB/s"] if report.get("probes") else []),
        f"- method: per (model, shape) all {len(EXPORTERS) * len(VARIANTS)} sessions + GEMM built first, {WARMUP} warm-up "
        f"runs each, then {report['rounds']} round-robin rounds (start rotates); median and p90 of the rounds",
        f"- total runtime: {report['total_runtime_s'] / 60:.1f} min",
        f"- reproduce: `{report['command']}`",
        "",
        "Columns: *ratio* = median / best peer's median, the best peer being the fastest of raw, ort-transformers "
        "and onnxscript over **both** exporters for that (model, shape) (marked **best**; < 1 means faster than every "
        "peer). *fused attn* = Attention/MultiHeadAttention/GroupQueryAttention ops in the model file "
        "(`tfgraph.analysis.attention_blocks`). *max abs err* = vs. the same exporter's raw export run unoptimized "
        "(ORT_DISABLE_ALL) on the same inputs, all outputs. *GEMM frac* = matmul GFLOP/s of the model "
        "(`estimate_flops` of the raw TorchScript export) / the GEMM GFLOP/s of the same block.",
        "",
    ]
    for r in report["results"]:
        if "source" in r:
            lines.append(f"- **{r['model']}**: {r['source']}; ORT optimizer model_type={r['ort_model_type']}, "
                         f"num_heads={r['num_heads']}, hidden_size={r['hidden_size']}")
    lines += [
        "",
        "| model | exporter | shape | variant | median ms | p90 ms | ratio vs best peer | fused attn | max abs err | GEMM frac |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for s in r["shapes"]:
            shape = f"b{s['batch']} s{s['seq']}"
            best = s.get("best_peer", {}).get("variant")
            for exporter in EXPORTERS:
                for variant in VARIANTS:
                    key = f"{exporter}/{variant}"
                    e = s["variants"].get(key)
                    if e is None:
                        continue
                    fa = "–" if e.get("fused_attention") is None else str(e["fused_attention"])
                    name = f"**{variant}**" if variant == "tfgraph" else variant
                    if "median_ms" not in e:
                        err = (e.get("error") or "not run").replace("|", "\\|")
                        lines.append(f"| {r['model']} | {exporter} | {shape} | {name} | FAILED: {err} | | | {fa} | | |")
                        continue
                    ratio = f"{e['ratio_vs_best_peer']:.2f}" + (" **best**" if key == best else "")
                    frac = f"{e['fraction_of_gemm']:.2f}" if "fraction_of_gemm" in e else "–"
                    lines.append(
                        f"| {r['model']} | {exporter} | {shape} | {name} | {fmt_ms(e['median_ms'])} | {fmt_ms(e['p90_ms'])} "
                        f"| {ratio} | {fa} | {fmt_err(e.get('max_abs_err'))} | {frac} |"
                    )
    lines += ["", "## GEMM rate and best peer per block", "",
              "| model | shape | matmul GFLOP | GEMM GFLOP/s (median) | best peer | tfgraph/best (torchscript) | tfgraph/best (dynamo) |",
              "|---|---|---:|---:|---|---:|---:|"]
    for r in report["results"]:
        for s in r["shapes"]:
            g = s.get("gemm", {})
            tf = []
            for exporter in EXPORTERS:
                e = s["variants"].get(f"{exporter}/tfgraph", {})
                tf.append(f"{e['ratio_vs_best_peer']:.2f}" if "ratio_vs_best_peer" in e else "failed")
            bp = s.get("best_peer", {})
            lines.append(
                f"| {r['model']} | b{s['batch']} s{s['seq']} | "
                f"{(s.get('matmul_flops_used') or 0) / 1e9:.1f} | {g.get('gflops_median', float('nan')):.0f} | "
                f"{bp.get('variant', '–')} ({fmt_ms(bp['median_ms']) if bp else '–'} ms) | {tf[0]} | {tf[1]} |"
            )
    failures = []
    for r in report["results"]:
        for exporter, variants in r["builds"].items():
            for variant, info in variants.items():
                if info.get("error"):
                    failures.append(f"- {r['model']} / {exporter} / {variant}: {info['error']}")
    for model, error in report.get("crashes", {}).items():
        failures.append(f"- {model}: the benchmark itself crashed: {error}")
    lines += ["", "## Failures", ""] + (failures or ["none"])
    lines += ["", "## Automatic notes", ""] + (notes(report) or ["none"])
    lines += ["", "## Build time (s): export, then each tool on that export", "",
              "| model | exporter | export | ort-transformers | onnxscript | tfgraph compile (verify on) |", "|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        for exporter, variants in r["builds"].items():
            cells = [f"{variants.get(v, {}).get('build_s'):.1f}" if variants.get(v, {}).get("build_s") is not None else "–"
                     for v in VARIANTS]
            lines.append(f"| {r['model']} | {exporter} | " + " | ".join(cells) + " |")
    lines += ["", "## Fusions reported by the tools", ""]
    for r in report["results"]:
        for exporter, variants in r["builds"].items():
            parts = []
            for variant in ("ort-transformers", "onnxscript"):
                f = variants.get(variant, {}).get("fusions")
                if f:
                    parts.append(f"{variant}: " + ", ".join(f"{k}={v}" for k, v in sorted(f.items())))
            att = variants.get("tfgraph", {}).get("attention")
            if att:
                parts.append(f"tfgraph: found={att.get('found')} fused={att.get('fused')} unfused={att.get('unfused')}")
            lines.append(f"- {r['model']} / {exporter}: " + ("; ".join(parts) or "–"))
    return "\n".join(lines) + "\n"


def notes(report: dict) -> list[str]:
    """Things in the numbers a reader should not miss: contended blocks, GEMM fractions over 1, large errors."""
    out = []
    blocks = [(r["model"], s) for r in report["results"] for s in r["shapes"] if "gemm" in s]
    if not blocks:
        return out
    top = max(s["gemm"]["gflops_median"] for _, s in blocks)
    for model, s in blocks:
        g = s["gemm"]
        spread = [e["p90_ms"] / e["median_ms"] for e in s["variants"].values() if "median_ms" in e]
        if g["gflops_median"] < 0.75 * top or (spread and np.median(spread) > 1.5):
            out.append(
                f"- {model} b{s['batch']} s{s['seq']}: contended block (GEMM median {g['gflops_median']:.0f} GFLOP/s vs "
                f"{top:.0f} in the best block; typical p90/median {np.median(spread):.2f}): other processes shared the "
                "CPU, ratios within this block are less reliable"
            )
    over = [(model, s, k, e) for model, s in blocks for k, e in s["variants"].items() if e.get("fraction_of_gemm", 0) > 1]
    if over:
        worst = max(over, key=lambda x: x[3]["fraction_of_gemm"])
        best_gemm = max(s["gemm"]["gflops_best"] for _, s in blocks)
        out.append(
            f"- {len(over)} rows have GEMM frac > 1 (up to {worst[3]['fraction_of_gemm']:.2f}, {worst[0]} "
            f"b{worst[1]['batch']} s{worst[1]['seq']} {worst[2]}: {worst[3]['gflops']:.0f} GFLOP/s): the models' "
            f"transformer-shaped matmuls run faster than the {'x'.join(map(str, GEMM_SHAPE))} MatMul on this CPU "
            f"(its best single run over all blocks: {best_gemm:.0f} GFLOP/s), so that MatMul is a reference, not a peak"
        )
    for r in report["results"]:
        for s in r["shapes"]:
            for k, e in s["variants"].items():
                err = e.get("max_abs_err")
                if err is not None and not (err <= 1e-3):
                    out.append(f"- {r['model']} b{s['batch']} s{s['seq']} {k}: max abs err {err} > 1e-3")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=20, help="timed round-robin rounds per (model, shape) (default 20)")
    parser.add_argument("--quick", action="store_true", help="one shape per model (b1 s128), for a smoke test")
    parser.add_argument("--optional", action="store_true",
                        help="also run the optional shapes (minilm b8 s512; adds ~15 min on a 2-core machine)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown output; JSON goes beside it")
    parser.add_argument("--workdir", default=None, help="where exports and variants go (default: a temp folder)")
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the markdown from the JSON beside --out, without running anything")
    args = parser.parse_args(argv)
    if args.render_only:
        out = pathlib.Path(args.out)
        out.write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnxruntime", "transformers",
                 "onnx_ir", "onnxruntime.transformers", "fusion_base", "onnx_model", "onnx_model_bert",
                 "onnx_model_gpt2"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    command = "python benchmarks/bench_fusion.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command.strip(),
        "rounds": args.rounds,
        "warmup": WARMUP,
        "threads": THREADS,
        "machine": harness.machine(),
        "versions": versions(),
        "results": [],
    }
    log("ceiling probes (harness.probes)")
    report["probes"] = harness.probes(THREADS, rounds=10)
    with tempfile.TemporaryDirectory(prefix="bench-fusion-", dir=args.workdir) as tmp:
        workdir = pathlib.Path(tmp)
        logfile = out.with_suffix(".log")
        logfile.write_text("")
        log(f"noise from exporters/optimizers goes to {logfile}")
        for name in models:
            shapes = QUICK_SHAPES[name] if args.quick else SHAPES[name]
            if not args.optional:
                shapes = [s for s in shapes if (name, s) not in OPTIONAL_SHAPES]
            def checkpoint() -> None:
                report["total_runtime_s"] = time.perf_counter() - started
                out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
                out.write_text(render(report))

            entry: dict[str, Any] = {"model": name, "shapes": [], "builds": {}}
            report["results"].append(entry)
            try:
                bench_model(name, shapes, args.rounds, workdir, logfile, entry, checkpoint)
            except Exception as e:  # noqa: BLE001 - keep the other models' results
                log(f"{name}: benchmark crashed: {one_line(e)}")
                traceback.print_exc(file=_LOG)
                report.setdefault("crashes", {})[name] = one_line(e)
            import shutil

            shutil.rmtree(workdir / name, ignore_errors=True)
            shutil.rmtree(workdir / f"hf-{name}", ignore_errors=True)
            checkpoint()
    report["total_runtime_s"] = time.perf_counter() - started
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.write_text(render(report))
    log(f"wrote {out} and {out.with_suffix('.json')} in {report['total_runtime_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
