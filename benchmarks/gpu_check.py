#!/usr/bin/env python
"""GPU conformance run of the CUDA profiles, in one command: placement, numerics and latency on a real GPU.

For each model (BERT-base, GPT-2 and a Llama-style decoder, built from Hugging Face configs with
random weights, seeded) and each exporter (TorchScript, dynamo), every CUDA profile
(``cuda-fp16``, ``cuda-int8``; ``--targets`` adds ``tensorrt-*`` where TensorRT is installed) is
compiled here and checked:

* **placement** from a real CUDA session (``session.record_ep_graph_assignment_info``, as the QNN
  path does): nodes per EP, the nodes onnxruntime left on the CPU (the CUDA EP keeps int64 shape
  arithmetic there on purpose; anything else is a failure);
* **numerics** against the fp32 export run on the CPU EP: max abs error and cosine per shape,
  checked against the profile's tolerance / ``min_cosine``;
* **latency** with IO binding (inputs and outputs on the device), every variant interleaved round
  by round with a rotating start: ``tfgraph-<target>``, the fp32 export (``raw-fp32``), onnxruntime's
  transformers optimizer + fp16 (``ort-fp16``: built from a TorchScript export with eager attention,
  the form that optimizer fuses — the baseline of ../shared/MEASUREMENTS.md; plain fp16 conversion
  where the optimizer has no model type) and torch SDPA fp16 (``torch-sdpa-fp16``, CUDA events);
* ``tfgraph targets --self-test`` on the CUDA EP;
* the issue's criteria: cuda-fp16 BERT-base <= 0.9x ort-fp16 at b8 s128 and b32 s512; cuda-int8
  <= 0.8x cuda-fp16 latency on a decoder's longest b1 prefill, weights <= 0.55x.

Without the CUDA EP it fails at once (exit 2) and says why; ``--list`` prints the plan anywhere.
Results go to ``benchmarks/results/gpu_<device>.md`` (``--out``) and, row by row as they are
measured, to the ``.json`` beside it, so a run cut short keeps what it measured.

The one command, on a GPU host lent to a session (``tfgraph`` installed there without
dependencies: the image has onnx, onnx-ir, onnxscript, torch and transformers)::

    bash ../shared/gpu/prepare-ort-gpu.sh        # here, once: packs onnxruntime-gpu into .gpu-part*
    # device run, carry [".gpu-part1", ".gpu-part2", ...]:
    mkdir -p /tmp/ort && cp .gpu-part*/* /tmp/ort/ && source /tmp/ort/ort-gpu-env.sh && \
      pip install -q --no-deps --no-build-isolation --target /tmp/tfg . && export PYTHONPATH=/tmp/tfg:$PYTHONPATH && \
      python3 benchmarks/gpu_check.py --out $OUT/gpu_h100.md

``--models bert-base`` / ``--quick`` (BERT-base, TorchScript, b8 s128 only) fit a short lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
EXIT_NO_CUDA = 2


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model built from a transformers config (random weights, seeded) and how its baselines see it."""

    config: str
    model_class: str
    kwargs: dict
    ort_model_type: str | None  # onnxruntime.transformers.optimizer model type; None: plain fp16 conversion
    decoder: bool


MODELS = {
    # BertConfig's defaults are BERT-base: 12 layers, 768 hidden, 12 heads.
    "bert-base": ModelSpec("BertConfig", "BertModel", {}, "bert", False),
    # GPT2Config's defaults are GPT-2 small (124M).
    "gpt2": ModelSpec("GPT2Config", "GPT2LMHeadModel", {}, "gpt2", True),
    # A Llama-style decoder (RoPE, RMSNorm, SwiGLU, 4 query heads per KV head), ~170M parameters.
    "llama": ModelSpec("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False), None, True),
}
DEFAULT_MODELS = tuple(MODELS)
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_TARGETS = ("cuda-fp16", "cuda-int8")
ENCODER_SHAPES = ("1x128", "8x128", "32x512")
DECODER_SHAPES = ("1x128", "8x128", "1x1024")  # 1x1024: the longest b1 prefill (no KV-cache decode yet)
# Ops the CUDA EP runs on the CPU on purpose (int64 shape arithmetic is cheaper there than a device round trip).
SHAPE_OPS = frozenset({"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Range", "Equal", "Where",
                       "Expand", "ConstantOfShape", "Reshape", "Add", "Sub", "Mul", "Div", "Less", "Greater",
                       "LessOrEqual", "And", "Not", "ReduceSum", "CumSum", "Max", "Min"})


def _shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a shape is BATCHxSEQUENCE, e.g. 8x128")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=list(EXPORTERS))
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="tfgraph targets to compile")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=None,
                        help=f"BxS shapes (default {' '.join(ENCODER_SHAPES)} for encoders, {' '.join(DECODER_SHAPES)} for decoders)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch SDPA fp16 baseline")
    parser.add_argument("--no-self-test", action="store_true", help="leave out `tfgraph targets --self-test`")
    parser.add_argument("--quick", action="store_true", help="BERT-base, TorchScript, b8 s128, 10 rounds")
    parser.add_argument("--list", action="store_true", help="print the plan and exit (runs without a GPU)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="report .md (default benchmarks/results/gpu_<device>.md)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if args.quick:
        args.models, args.exporters, args.shapes, args.rounds = ["bert-base"], ["torchscript"], [(8, 128)], 10
    from tfgraph.targets import list_targets

    unknown = [t for t in args.targets if t not in {target.name for target in list_targets()}]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; see `tfgraph targets`")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """One entry per (model, exporter): the targets and shapes it is measured at."""
    entries = []
    for name in args.models:
        spec = MODELS[name]
        shapes = args.shapes or [_shape(s) for s in (DECODER_SHAPES if spec.decoder else ENCODER_SHAPES)]
        for exporter in args.exporters:
            entries.append({"model": name, "exporter": exporter, "targets": list(args.targets),
                            "shapes": [f"{b}x{s}" for b, s in shapes], "decoder": spec.decoder,
                            "baselines": ["raw-fp32", "ort-fp16"] + ([] if args.no_torch else ["torch-sdpa-fp16"])})
    return entries


def cuda_problem() -> str | None:
    """None when onnxruntime's CUDA EP can run here, else why not (one line)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime is not importable ({e})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                f"{', '.join(ort.get_available_providers())}); run on a CUDA host with onnxruntime-gpu "
                "(../shared/gpu/prepare-ort-gpu.sh packs it; see this script's docstring)")
    return None


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def report_path(device: str, out: pathlib.Path | None) -> pathlib.Path:
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") or "gpu"
    return out or REPO / "benchmarks" / "results" / f"gpu_{slug}.md"


# --- criteria and report (no GPU needed) -----------------------------------------------------------
def _median(rows: list[dict], **match) -> float | None:
    found = [r["median_ms"] for r in rows if r.get("median_ms") is not None and all(r.get(k) == v for k, v in match.items())]
    return min(found) if found else None


def criteria(rows: list[dict], compiles: list[dict]) -> list[dict]:
    """The issue's 'done when' figures from measured rows (a criterion lacking its rows is 'not measured')."""
    out = []
    for shape in ("b8 s128", "b32 s512"):
        ours, base = _median(rows, model="bert-base", shape=shape, variant="tfgraph-cuda-fp16"), \
            _median(rows, model="bert-base", shape=shape, variant="ort-fp16")
        ratio = ours / base if ours and base else None
        out.append({"criterion": f"cuda-fp16 BERT-base {shape} <= 0.9x ort-fp16 (best exporter)",
                    "value": ratio, "passed": None if ratio is None else ratio <= 0.9})
    for model in ("gpt2", "llama"):
        shapes = sorted({r["shape"] for r in rows if r.get("model") == model and r["shape"].startswith("b1 ")},
                        key=lambda s: int(s.split("s")[-1]))
        if not shapes:
            continue
        int8, fp16 = (_median(rows, model=model, shape=shapes[-1], variant=f"tfgraph-{t}") for t in ("cuda-int8", "cuda-fp16"))
        ratio = int8 / fp16 if int8 and fp16 else None
        out.append({"criterion": f"cuda-int8 {model} {shapes[-1]} (longest b1 prefill) <= 0.8x cuda-fp16 latency",
                    "value": ratio, "passed": None if ratio is None else ratio <= 0.8})
        sizes = {c["target"]: c["bytes"] for c in compiles if c.get("model") == model and "bytes" in c}
        ratio = sizes["cuda-int8"] / sizes["cuda-fp16"] if {"cuda-int8", "cuda-fp16"} <= set(sizes) else None
        out.append({"criterion": f"cuda-int8 {model} weights <= 0.55x cuda-fp16", "value": ratio,
                    "passed": None if ratio is None else ratio <= 0.55})
    return out


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def write_report(result: dict, out: pathlib.Path) -> pathlib.Path:
    """``result``: device, versions, settings, compiles, rows, self_test, criteria → markdown + JSON."""
    lines = [f"# CUDA profiles on {result['device']}", "",
             f"{result['date']}, onnxruntime {result['versions'].get('onnxruntime')}, torch {result['versions'].get('torch')}; "
             f"{result['settings']['rounds']} interleaved rounds after {result['settings']['warmup']} warm-up, IO binding; "
             "accuracy against the fp32 export on the CPU EP. `python benchmarks/gpu_check.py`", "",
             "## Compiles and placement (real CUDA session)", "",
             "| model | exporter | target | compile | nodes per EP | CPU nodes (non-shape) | weights MiB | verified |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["compiles"]:
        if "error" in c:
            lines.append(f"| {c['model']} | {c['exporter']} | {c['target']} | error: {c['error']} | | | | |")
            continue
        nodes = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in c["nodes"].items())
        lines.append(f"| {c['model']} | {c['exporter']} | {c['target']} | {c['seconds']:.0f} s | {nodes} | "
                     f"{c['cpu_nodes']} ({c['cpu_non_shape']}) | {c['bytes'] / 2**20:.1f} | {c['verified']} |")
    lines += ["", "## Latency and accuracy", "",
              "| model | exporter | shape | variant | median ms | ÷ ort-fp16 | max abs | cosine | within tolerance |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | {r['shape']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        acc = r.get("accuracy") or {}
        lines.append(f"| {r['model']} | {r['exporter']} | {r['shape']} | {r['variant']} | {_fmt(r['median_ms'])} | "
                     f"{_fmt(r.get('ratio_vs_ort_fp16'), '.2f')} | {_fmt(acc.get('max_abs'), '.2e')} | "
                     f"{_fmt(acc.get('cosine'), '.6f')} | {r.get('within_tolerance', '—')} |")
    lines += ["", "## Criteria (issue 17)", "", "| criterion | measured | passed |", "|---|---|---|"]
    for c in result["criteria"]:
        lines.append(f"| {c['criterion']} | {_fmt(c['value'], '.2f')} | "
                     f"{'not measured' if c['passed'] is None else 'yes' if c['passed'] else 'NO'} |")
    if result.get("self_test") is not None:
        lines += ["", "## `tfgraph targets --self-test` on the CUDA EP", ""]
        lines += [f"- {t['target']}: exit {t['exit']}, {t['summary']}" for t in result["self_test"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out


# --- on the GPU ----------------------------------------------------------------------------------------
def build_checkpoint(name: str, folder: pathlib.Path) -> pathlib.Path:
    import torch
    import transformers

    spec = MODELS[name]
    config = getattr(transformers, spec.config)(**spec.kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        getattr(transformers, spec.model_class)(config).eval().save_pretrained(folder)
    return folder


def ort_fp16(path: pathlib.Path, out: pathlib.Path, spec: ModelSpec, folder: pathlib.Path) -> pathlib.Path:
    import onnx

    if spec.ort_model_type is None:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(out))
        return out
    from onnxruntime.transformers.optimizer import optimize_model

    config = json.loads((folder / "config.json").read_text())
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    optimized = optimize_model(str(path), model_type=spec.ort_model_type, num_heads=heads, hidden_size=hidden, use_gpu=True)
    optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(str(out))
    return out


class Runner:
    """One CUDA session with IO binding: inputs copied to the device once, outputs kept there."""

    def __init__(self, path: str, feeds: dict[str, np.ndarray]):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        names = {i.name for i in self.session.get_inputs()}
        for name, array in feeds.items():
            if name in names:
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for output in self.session.get_outputs():
            self.binding.bind_output(output.name, "cuda")

    def __call__(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter() - start

    def outputs(self) -> list[np.ndarray]:
        return [o.numpy() for o in self.binding.get_outputs()]


class TorchRunner:
    """The Hugging Face model itself in fp16 with SDPA attention on CUDA, timed with CUDA events."""

    def __init__(self, folder: pathlib.Path, spec: ModelSpec, feeds: dict[str, np.ndarray]):
        import torch
        import transformers

        self.torch = torch
        self.model = getattr(transformers, spec.model_class).from_pretrained(
            str(folder), dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
        self.feeds = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}

    def __call__(self) -> float:
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        with self.torch.inference_mode():
            start.record()
            self.result = self.model(**self.feeds)
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def outputs(self) -> list[np.ndarray]:
        return [self.result[0].float().cpu().numpy()]


def accuracy(got: np.ndarray, want: np.ndarray) -> dict:
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    cosine = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    return {"max_abs": float(np.abs(got - want).max()), "cosine": cosine, "finite": bool(np.isfinite(got).all())}


def bench(makers: dict, rounds: int, warmup: int) -> dict[str, dict]:
    """Interleaved medians: every variant once per round, the starting one rotating."""
    runners, results = {}, {}
    for name, make in makers.items():
        try:
            runners[name] = make()
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            results[name] = {"error": str(e).splitlines()[0][:300]}
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    samples: dict[str, list[float]] = {n: [] for n in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            samples[name].append(runners[name]())
    for name, runner in runners.items():
        results[name] = {"median_ms": statistics.median(samples[name]) * 1e3, "outputs": runner.outputs()}
    return results


def self_tests(targets: list[str]) -> list[dict]:
    found = []
    for target in targets:
        run = subprocess.run([sys.executable, "-m", "tfgraph", "targets", "--self-test", "--target", target, "--json"],
                             capture_output=True, text=True, timeout=900)
        summary = (run.stdout.strip().splitlines() or run.stderr.strip().splitlines() or [""])[-1][:300]
        found.append({"target": target, "exit": run.returncode, "summary": summary, "stdout": run.stdout[-20000:]})
    return found


def _compile_row(name, exporter, target, artifact, seconds) -> dict:
    place = artifact.manifest["placement"]
    cpu = place["fallback"]  # the first 50 nodes onnxruntime left on the CPU
    return {"model": name, "exporter": exporter, "target": target, "seconds": seconds, "nodes": place["nodes"],
            "placement_source": place["source"], "cpu_nodes": place["fallback_count"],
            "cpu_non_shape": sorted({n["op_type"] for n in cpu if n["op_type"] not in SHAPE_OPS}) or "none",
            "bytes": artifact.manifest["summary"]["bytes_after"], "verified": artifact.manifest["verification"]["passed"]}


def run(args: argparse.Namespace, out: pathlib.Path) -> dict:
    import onnxruntime as ort
    import torch

    import tfgraph
    from tfgraph.compiler.export import export
    from tfgraph.ir import load as ir_load
    from tfgraph.targets import get_target
    from tfgraph.compiler.verify import generate_inputs

    result = {"device": device_name(), "date": str(datetime.date.today()),
              "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "tfgraph": tfgraph.__version__},
              "settings": {"rounds": args.rounds, "warmup": args.warmup, "plan": plan(args)},
              "compiles": [], "rows": [], "criteria": [], "self_test": None}
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for entry in plan(args):
        name, exporter, spec = entry["model"], entry["exporter"], MODELS[entry["model"]]
        folder = work / name
        if not folder.is_dir():
            build_checkpoint(name, folder)
        path = export(folder, work / f"{name}-{exporter}.onnx", exporter=exporter)
        baseline = work / f"{name}-ort-fp16.onnx"
        if not baseline.is_file():  # ORT's optimizer fuses TorchScript exports of eager attention only
            source = export(folder, work / f"{name}-ts-eager.onnx", exporter="torchscript", attention="eager")
            try:
                ort_fp16(source, baseline, spec, folder)
            except Exception as e:  # noqa: BLE001 - the baseline is missing from the rows, said so
                print(f"{name}: onnxruntime optimizer + fp16 failed: {str(e).splitlines()[0]}")
        variants = {"raw-fp32": str(path), **({"ort-fp16": str(baseline)} if baseline.is_file() else {})}
        for target in entry["targets"]:
            start = time.perf_counter()
            try:
                artifact = tfgraph.compile(str(path), target=target, output=work / f"{name}-{exporter}-{target}", force=True)
            except Exception as e:  # noqa: BLE001 - a failed compile is a finding
                result["compiles"].append({"model": name, "exporter": exporter, "target": target, "error": str(e)[:300]})
                continue
            result["compiles"].append(_compile_row(name, exporter, target, artifact, time.perf_counter() - start))
            variants[f"tfgraph-{target}"] = str(artifact.path / "model.onnx")
        source_model = ir_load(path).model
        for shape in entry["shapes"]:
            batch, seq = _shape(shape)
            feeds = generate_inputs(source_model, {"batch": batch, "sequence": seq}, seed=0)
            reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            makers = {k: (lambda p=p: Runner(p, feeds)) for k, p in variants.items()}
            if not args.no_torch:
                makers["torch-sdpa-fp16"] = lambda: TorchRunner(folder, spec, feeds)
            measured = bench(makers, args.rounds, args.warmup)
            base = measured.get("ort-fp16", {}).get("median_ms")
            for variant, r in measured.items():
                row = {"model": name, "exporter": exporter, "shape": f"b{batch} s{seq}", "variant": variant}
                if "error" in r:
                    row["error"] = r["error"]
                else:
                    acc = accuracy(r["outputs"][0], reference)
                    row.update(median_ms=r["median_ms"], accuracy=acc,
                               ratio_vs_ort_fp16=r["median_ms"] / base if base else None)
                    if variant.startswith("tfgraph-"):
                        profile = get_target(variant.removeprefix("tfgraph-"))
                        row["within_tolerance"] = bool(acc["finite"] and (acc["cosine"] >= profile.min_cosine
                                                       if profile.min_cosine else acc["max_abs"] <= profile.tolerance.atol))
                result["rows"].append(row)
                print(json.dumps(row, default=str), flush=True)
            result["criteria"] = criteria(result["rows"], result["compiles"])
            write_report(result, out)  # after every shape: a run cut short keeps what it measured
    if not args.no_self_test:
        result["self_test"] = self_tests(list(args.targets))
    result["criteria"] = criteria(result["rows"], result["compiles"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for entry in plan(args):
            print(json.dumps(entry))
        return 0
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: cannot run: {problem}", file=sys.stderr)
        return EXIT_NO_CUDA
    out = report_path(device_name(), args.out)
    result = run(args, out)
    print(f"wrote {write_report(result, out)}")
    failed = [c["criterion"] for c in result["criteria"] if c["passed"] is False]
    return 1 if failed or any("error" in c for c in result["compiles"]) else 0


if __name__ == "__main__":
    sys.exit(main())
