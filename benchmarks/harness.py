"""Shared benchmark harness: interleaved timing, the machine, ceiling probes, per-op profiles.

Small on purpose. Timings on shared machines are only comparable inside one run, so everything
here is meant to be called in the same process as the variants it compares:

- ``interleave(runners, rounds, warmup)`` — round-robin timing of callables with a rotating start
  (each round begins with a different variant, so drift and neighbours' load hit all alike);
  returns ``{name: [seconds, ...]}``; ``on_run(name, round, seconds, value)`` sees each timed call's return
  value (a benchmark whose runner returns its own numbers). ``median``/``p90`` summarize a list (ms with ``ms=True``);
  ``ratios`` (of medians) and ``paired_ratios`` (median of per-round ratios) compare variants.
- ``machine()`` — CPU model, the ISA flags that decide int8/bf16 kernels (avx2, avx512f, avx512_vnni,
  avx_vnni, avx512_bf16, amx_*), usable cores, load average, library versions.
- ``probes(threads, rounds)`` — ceilings measured now: fp32 GEMM (onnxruntime MatMul, GFLOP/s), int8
  GEMM (onnxruntime MatMulInteger u8×s8, GOP/s, and DynamicQuantizeMatMul with float input), memory
  bandwidth (numpy copy, GB/s). ``PROBE_SHAPE`` is (M, K, N). ``probe_runners``/``probe_rates``: the same
  probes as runners to put into a benchmark's own ``interleave`` (the ceiling in the same rotation).
- ``session(path, threads)`` — the onnxruntime CPU session every benchmark uses (sequential, ORT_ENABLE_ALL).
- ``op_profile(path, feeds, runs, threads)`` — onnxruntime's profiler aggregated per op type
  (ms per run, share), for "where does the time go" tables; ``op_profiles({name: path}, ...)`` does
  several models with their runs interleaved.

Usage::

    from benchmarks import harness            # or `import harness` from inside benchmarks/
    times = harness.interleave({"a": run_a, "b": run_b}, rounds=20, warmup=2)
    print(harness.median(times["a"], ms=True), harness.machine(), harness.probes())
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

PROBE_SHAPE = (1024, 768, 3072)  # M, K, N: a BERT-base FFN GEMM at b8 s128
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


# -- timing -------------------------------------------------------------------------------------
def interleave(runners: Mapping[str, Callable[[], object]], rounds: int = 20, warmup: int = 2,
               on_run: Callable[[str, int, float, object], None] | None = None) -> dict[str, list[float]]:
    """Time each runner once per round, round-robin, the start rotating by one each round, after
    ``warmup`` untimed calls of each. Returns seconds per call, per runner, in round order.

    ``on_run(name, round, seconds, value)``, if given, is called after each timed call (outside the
    timing) with the runner's return value: for runners that measure something themselves (a
    subprocess's report, CPU seconds) or for progress lines."""
    keys = list(runners)
    for key in keys:
        for _ in range(warmup):
            runners[key]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            value = runners[key]()
            elapsed = time.perf_counter() - start
            times[key].append(elapsed)
            if on_run is not None:
                on_run(key, r, elapsed, value)
    return times


def median(values: Sequence[float], ms: bool = False) -> float:
    return float(np.median(values)) * (1e3 if ms else 1.0)


def p90(values: Sequence[float], ms: bool = False) -> float:
    return float(np.percentile(values, 90)) * (1e3 if ms else 1.0)


def ratios(times: Mapping[str, Sequence[float]], base: str) -> dict[str, float]:
    """Median of each variant over the median of ``base``."""
    b = median(times[base])
    return {k: median(v) / b for k, v in times.items()}


def paired_ratios(times: Mapping[str, Sequence[float]], base: str) -> dict[str, float]:
    """Median over rounds of (variant's time / ``base``'s time in the same round): robust to load that
    changes between rounds (each round's variants ran back to back)."""
    b = np.asarray(times[base])
    return {k: float(np.median(np.asarray(v) / b)) for k, v in times.items()}


# -- the machine ----------------------------------------------------------------------------------
def machine() -> dict:
    cpu, flags = "?", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for mod in ("onnxruntime", "onnx", "numpy", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is fine
            pass
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags],
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "versions": versions}


# -- sessions -------------------------------------------------------------------------------------
def session(model, threads: int = 2, profile_prefix: str | None = None, optimization: str = "ORT_ENABLE_ALL"):
    """onnxruntime CPU session: ``threads`` intra-op threads, sequential, ``optimization`` level.
    ``model``: a path or serialized bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model) if isinstance(model, (str, pathlib.Path)) else model, so,
                                providers=["CPUExecutionProvider"])


# -- ceilings -------------------------------------------------------------------------------------
def _gemm_model(kind: str, m: int, k: int, n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
        domain = []
    elif kind == "int8":  # u8 x s8 -> int32: the kernel every int8 recipe on onnxruntime CPU ends in
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w")
        zp = numpy_helper.from_array(np.array(128, np.uint8), "za")
        nodes = [helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])]
        a_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [w, zp]
        domain = []
    else:  # "dqmm": float in, run-time quantization, int8 GEMM, float out
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w")
        s = numpy_helper.from_array(np.full(n, 0.01, np.float32), "s")
        z = numpy_helper.from_array(np.zeros(n, np.int8), "z")
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["a", "w", "s", "z"], ["y"], domain="com.microsoft")]
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w, s, z]
        domain = [helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *domain])
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


PROBE_KINDS = ("fp32", "int8", "dqmm", "copy")


def probe_runners(threads: int = 2, shape: tuple[int, int, int] = PROBE_SHAPE,
                  kinds: Sequence[str] = PROBE_KINDS) -> dict[str, Callable[[], object]]:
    """The ceiling probes as runners named ``probe:<kind>`` (kinds: fp32, int8, dqmm GEMMs of ``shape``
    and a 64 MiB copy), to add to a benchmark's own :func:`interleave` so the ceiling is measured in
    the same rotation as the variants; :func:`probe_rates` turns their times into rates."""
    m, k, n = shape
    rng = np.random.default_rng(1)
    a32 = rng.standard_normal((m, k)).astype(np.float32)
    a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    feeds = {"fp32": {"a": a32}, "int8": {"a": a8}, "dqmm": {"a": a32}}
    runners: dict[str, Callable[[], object]] = {}
    for kind in kinds:
        if kind == "copy":
            src = np.ones(64 * 2**20 // 8, np.float64)  # 64 MiB: well past the caches
            dst = np.empty_like(src)
            runners["probe:copy"] = lambda src=src, dst=dst: np.copyto(dst, src)
        else:
            s = session(_gemm_model(kind, m, k, n), threads)
            runners[f"probe:{kind}"] = lambda s=s, f=feeds[kind]: s.run(None, f)
    return runners


def probe_rates(times: Mapping[str, Sequence[float]], shape: tuple[int, int, int] = PROBE_SHAPE) -> dict:
    """Rates from the medians of the ``probe:<kind>`` entries of ``times`` (others are ignored):
    ``fp32_gflops``, ``int8_gops``, ``dqmm_gops``, ``copy_gbs``, ``int8_over_fp32`` (those present)."""
    m, k, n = shape
    ops = 2.0 * m * k * n
    names = {"fp32": "fp32_gflops", "int8": "int8_gops", "dqmm": "dqmm_gops"}
    out = {names[kind]: ops / median(times[f"probe:{kind}"]) / 1e9 for kind in names if f"probe:{kind}" in times}
    if "probe:copy" in times:
        out["copy_gbs"] = 2 * 64 * 2**20 / median(times["probe:copy"]) / 1e9  # read + write of 64 MiB
    if "int8_gops" in out and "fp32_gflops" in out:
        out["int8_over_fp32"] = out["int8_gops"] / out["fp32_gflops"]
    return out


def probes(threads: int = 2, rounds: int = 20, shape: tuple[int, int, int] = PROBE_SHAPE) -> dict:
    """Ceilings measured now, interleaved: fp32 GEMM GFLOP/s, int8 GEMM GOP/s (MatMulInteger u8×s8 and
    DynamicQuantizeMatMul with its float input), numpy copy GB/s (read + write bytes)."""
    t = interleave(probe_runners(threads, shape), rounds=rounds, warmup=3)
    return {"shape_mkn": list(shape), "threads": threads, **probe_rates(t, shape)}


# -- where the time goes ----------------------------------------------------------------------------
def op_profile(model, feeds: Mapping[str, np.ndarray], runs: int = 10, threads: int = 2, warmup: int = 2) -> dict:
    """onnxruntime's profiler over ``runs`` runs (after ``warmup``), aggregated per op type: ms per run
    and share of the summed kernel time. Nodes are as onnxruntime ran them (after its fusions)."""
    return op_profiles({"model": model}, feeds, runs, threads, warmup)["model"]


def op_profiles(models: Mapping[str, object], feeds: Mapping[str, np.ndarray], runs: int = 10, threads: int = 2,
                warmup: int = 2) -> dict[str, dict]:
    """:func:`op_profile` of several models, their runs interleaved (round-robin, rotating start) so
    that load changes hit all alike."""
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        sessions = {k: session(m, threads, profile_prefix=os.path.join(tmp, f"p{i}")) for i, (k, m) in enumerate(models.items())}
        interleave({k: (lambda s=s: s.run(None, dict(feeds))) for k, s in sessions.items()}, rounds=runs, warmup=warmup)
        events = {k: json.loads(pathlib.Path(s.end_profiling()).read_text()) for k, s in sessions.items()}
    return {k: _aggregate(e, runs) for k, e in events.items()}


def _aggregate(events: list, runs: int) -> dict:
    # the profile holds the warm-up too: count only the kernels of the last `runs` model_run events
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = run_starts[-runs] if len(run_starts) >= runs else 0
    per_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
        counts[op] = counts.get(op, 0) + 1
    total = sum(per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {"runs": runs, "total_ms_per_run": total / runs,
            "ops": {op: {"ms_per_run": ms / runs, "share": ms / total, "nodes": counts[op] // runs} for op, ms in rows}}
