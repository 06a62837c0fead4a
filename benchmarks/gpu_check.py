#!/usr/bin/env python
"""The CUDA profiles on a real GPU: numerics against fp32 and latency against onnxruntime's
transformers optimizer + fp16, in one interleaved run.

Needs onnxruntime with the CUDA EP (``onnxruntime-gpu``; ``../shared/gpu/prepare-ort-gpu.sh``
packs it for the device machine). Without it the script says so and exits 0: CI and this
project's CPU machines never run it.

For each model (a built-in name, exported here with ``--exporter``, or ``.onnx`` files given with
``--model``), the variants are:

* ``raw-fp32``          the export as is, on CUDA;
* ``ort-fp16``          ``onnxruntime.transformers.optimizer.optimize_model`` (model type ``bert``
                        or ``gpt2``, heads and hidden size from the graph) + ``convert_float_to_float16
                        (keep_io_types=True)`` — the baseline the issue names (MEASUREMENTS.md, H200:
                        BERT-base 0.98 ms at b8 s128, 7.74 ms at b32 s512);
* ``tfgraph-cuda-fp16`` / ``tfgraph-cuda-int8``  ``tfgraph.compile(model, target=...)``; its
                        verification runs on the CUDA EP here (the profile's providers).

Every session uses IO binding with inputs and outputs on the device, ``ORT_ENABLE_ALL``; per shape,
each variant gets ``--warmup`` runs, then ``--rounds`` rounds run every variant once, round-robin
with a rotating start. Reported: median latency, ratio to ``ort-fp16``, and against the fp32 export
run on the CPU EP: max abs error and cosine of the outputs.

Usage (on the GPU host)::

    python benchmarks/gpu_check.py                                  # bert-base, both exporters
    python benchmarks/gpu_check.py --models bert-base gpt-base --shapes 1x128 8x128 32x512
    python benchmarks/gpu_check.py --model /data/bert.onnx --model-type bert

Writes ``benchmarks/results/gpu_<device>.md`` and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _device_name() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def _graph_dims(path: pathlib.Path) -> tuple[int, int]:
    """Heads and hidden size for onnxruntime's optimizer, read from tfgraph's analysis of the graph."""
    import tfgraph

    artifact = tfgraph.compile(str(path), target="cpu-fp32", verify=False)
    for node in artifact.model.graph.all_nodes():
        if node.op_type in ("Attention", "MultiHeadAttention") and node.domain == "com.microsoft":
            heads = node.attributes.get_int("num_heads")
            weight = node.inputs[1]
            hidden = weight.shape[0] if weight is not None and weight.shape is not None else None
            if node.op_type == "MultiHeadAttention" or not isinstance(hidden, int):
                q = node.inputs[0]
                hidden = q.shape[-1] if q.shape is not None else 0
            return heads, int(hidden)
    return 0, 0


def _ort_fp16(path: pathlib.Path, out: pathlib.Path, model_type: str) -> pathlib.Path:
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _graph_dims(path)
    optimized = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden, use_gpu=True)
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
        self.providers = self.session.get_providers()

    def __call__(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter() - start

    def outputs(self) -> list[np.ndarray]:
        return [o.numpy() for o in self.binding.get_outputs()]


def _accuracy(got: np.ndarray, want: np.ndarray) -> dict:
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    cosine = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    return {"max_abs": float(np.abs(got - want).max()), "cosine": cosine, "finite": bool(np.isfinite(got).all())}


def bench(paths: dict[str, str], feeds: dict[str, np.ndarray], reference: list[np.ndarray], rounds: int, warmup: int) -> dict:
    runners, results = {}, {}
    for name, path in paths.items():
        try:
            runners[name] = Runner(path, feeds)
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
        outs = runner.outputs()
        results[name] = {
            "median_ms": statistics.median(samples[name]) * 1e3,
            "providers": runner.providers,
            "accuracy_vs_fp32_cpu": _accuracy(outs[0], reference[0]),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["bert-base"], help="built-in models to export here")
    parser.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"])
    parser.add_argument("--model", action="append", default=[], help="a pre-exported .onnx (instead of --models)")
    parser.add_argument("--model-type", default="bert", help="onnxruntime optimizer model type for --model files")
    parser.add_argument("--shapes", nargs="*", default=["1x128", "8x128", "32x512"])
    parser.add_argument("--targets", nargs="*", default=["cuda-fp16", "cuda-int8"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    if not _cuda_available():
        import onnxruntime as ort

        print(f"gpu_check: skipped: onnxruntime {ort.__version__} has no CUDAExecutionProvider "
              f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA host")
        return 0

    import onnxruntime as ort

    import tfgraph
    from tfgraph.verify import generate_inputs
    from tfgraph.ir import load as ir_load

    device = _device_name()
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
    models: list[tuple[str, pathlib.Path, str]] = []
    for path in args.model:
        models.append((pathlib.Path(path).stem, pathlib.Path(path), args.model_type))
    if not args.model:
        from tfgraph.export import export

        for name in args.models:
            for exporter in args.exporters:
                path = export(name, work / f"{name}-{exporter}.onnx", exporter=exporter)
                models.append((f"{name} ({exporter})", path, "gpt2" if name.startswith("gpt") else "bert"))

    rows = []
    for label, path, model_type in models:
        variants = {"raw-fp32": str(path)}
        try:
            variants["ort-fp16"] = str(_ort_fp16(path, work / f"{path.stem}-ort-fp16.onnx", model_type))
        except Exception as e:  # noqa: BLE001
            print(f"{label}: onnxruntime optimizer failed: {str(e).splitlines()[0]}")
        for target in args.targets:
            out = work / f"{path.stem}-{target}"
            tfgraph.compile(str(path), target=target, output=out, force=True)
            variants[f"tfgraph-{target}"] = str(out / "model.onnx")
        source = ir_load(path).model
        for shape in args.shapes:
            batch, seq = (int(x) for x in shape.split("x"))
            feeds = generate_inputs(source, {"batch": batch, "sequence": seq}, seed=0)
            cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            reference = cpu.run(None, feeds)
            result = bench(variants, feeds, reference, args.rounds, args.warmup)
            base = result.get("ort-fp16", {}).get("median_ms")
            for name, r in result.items():
                rows.append({"model": label, "shape": f"b{batch} s{seq}", "variant": name, **r,
                             "ratio_vs_ort_fp16": (r["median_ms"] / base) if base and "median_ms" in r else None})
                print(json.dumps(rows[-1]))

    out = args.out or REPO / "benchmarks" / "results" / f"gpu_{device.replace(' ', '_').lower()}.md"
    lines = [f"# CUDA profiles on {device}", "",
             f"{datetime.date.today()}, onnxruntime {ort.__version__}, {args.rounds} interleaved rounds, "
             f"{args.warmup} warm-up, IO binding; accuracy against the fp32 export on the CPU EP.", "",
             "| model | shape | variant | median ms | ÷ ort-fp16 | max abs | cosine |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['shape']} | {r['variant']} | error: {r['error']} | | | |")
            continue
        acc = r["accuracy_vs_fp32_cpu"]
        ratio = f"{r['ratio_vs_ort_fp16']:.2f}" if r["ratio_vs_ort_fp16"] else "—"
        lines.append(f"| {r['model']} | {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | {ratio} | "
                     f"{acc['max_abs']:.2e} | {acc['cosine']:.6f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
