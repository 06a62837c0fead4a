"""Executors for pipeline artifacts: micro-batches flow through one onnxruntime session per stage.

``local`` (default): one thread per stage, bounded queues between them, micro-batches split
from the batch (axis 0) and re-joined in order. ``ray``: one Ray core actor per stage,
micro-batches passed actor to actor as object references (the driver never touches the
intermediate tensors), at most ``max_in_flight`` micro-batches in the pipeline; actors are
placed by custom resources (``resources=[{"stage0": 1}, ...]``) so stages can live on
different nodes.

Both return exactly what the unsplit model returns (with one micro-batch, bit for bit what
chaining the stages gives; with several, up to onnxruntime's batch-size-dependent rounding).
"""

from __future__ import annotations

import os
import pathlib
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfgraph.errors import BadInputError

_STOP = object()


class _StageSpec:
    def __init__(self, index: int, source: bytes | str, inputs: list[str], outputs: list[str], keep: list[str]):
        self.index = index
        self.source = source  # serialized model or a file path
        self.inputs = inputs
        self.outputs = outputs
        self.keep = keep  # names to pass on after this stage (needed later, or final outputs)


def _specs_from(source) -> tuple[list[_StageSpec], list[str], list[str], dict]:
    """Stage specs, graph input names, output names and session options from an artifact or a Pipeline."""
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "stages"):  # an in-memory tfgraph.compiler.stages.Pipeline
        stages = [(s.model.SerializeToString(), s.input_names, s.output_names) for s in source.stages]
        inputs = [v["name"] for v in source.inputs]
        outputs = [v["name"] for v in source.outputs]
        options: dict = {}
    else:
        from tfgraph.deploy.artifact import MODEL_FILE, read_manifest

        path = pathlib.Path(source)
        manifest = read_manifest(path)
        options = manifest.get("session_options") or {}
        pipe = manifest.get("pipeline")
        if pipe is None:  # a single-model artifact is a one-stage pipeline
            from tfgraph import ir as tir

            model = tir.load(path / MODEL_FILE).model
            ins = [v.name for v in model.graph.inputs]
            outs = [v.name for v in model.graph.outputs]
            stages = [(str(path / MODEL_FILE), ins, outs)]
            inputs, outputs = ins, outs
        else:
            stages = []
            for s in pipe["stages"]:
                file = path / s["file"]
                if not file.is_file():
                    raise BadInputError(f"{path}: stage file {s['file']} is missing")
                stages.append((str(file.resolve()), [v["name"] for v in s["inputs"]], [v["name"] for v in s["outputs"]]))
            inputs = [v["name"] for v in pipe["inputs"]]
            outputs = [v["name"] for v in pipe["outputs"]]
    specs = []
    needed_later: set[str] = set(outputs)
    keeps = []
    for _, ins, _ in reversed(stages):
        keeps.append(sorted(needed_later))
        needed_later |= set(ins)
    keeps.reverse()
    for i, ((src, ins, outs), keep) in enumerate(zip(stages, keeps)):
        specs.append(_StageSpec(i, src, ins, outs, keep))
    return specs, inputs, outputs, options


def _session(source: bytes | str, options: Mapping[str, Any], threads: int | None):
    from tfgraph.providers import Provider
    from tfgraph.deploy.runtime import CPU, session

    return session(source, [Provider(CPU)], options={**options, **({"intra_op_num_threads": threads} if threads else {})})


def _run_stage(session, spec: _StageSpec, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    results = session.run(spec.outputs, {k: env[k] for k in spec.inputs})
    env = {**env, **dict(zip(spec.outputs, results))}
    return {k: env[k] for k in spec.keep if k in env}


def split_batch(feeds: Mapping[str, np.ndarray], micro_batches: int) -> list[dict[str, np.ndarray]]:
    """Split every input along axis 0 into at most ``micro_batches`` parts (in order)."""
    sizes = {np.asarray(v).shape[0] if np.ndim(v) else None for v in feeds.values()}
    if len(sizes) != 1 or None in sizes:
        if micro_batches > 1:
            raise BadInputError("micro-batches need every input to share its first (batch) dimension")
        return [dict(feeds)]
    batch = sizes.pop()
    m = max(1, min(micro_batches, batch))
    parts = [{} for _ in range(m)]
    for name, value in feeds.items():
        for i, chunk in enumerate(np.array_split(np.asarray(value), m, axis=0)):
            parts[i][name] = chunk
    return parts


def join_batch(parts: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return {k: parts[0][k] for k in names}
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in names}


class PipelineExecutor:
    """Run a pipeline artifact (or a :class:`~tfgraph.compiler.stages.Pipeline`) on feeds.

    ``executor``: ``"local"`` (threads) or ``"ray"``. ``micro_batches``: how many parts the
    batch is split into. ``queue_size``: bound of each inter-stage queue (local);
    ``max_in_flight``: micro-batches in the pipeline at once (ray; default the number of
    stages + 1). ``resources``: per-stage custom Ray resources for actor placement.
    """

    def __init__(
        self,
        source,
        *,
        executor: str = "local",
        micro_batches: int = 1,
        queue_size: int = 2,
        max_in_flight: int | None = None,
        threads_per_stage: int | None = None,
        resources: Sequence[Mapping[str, float]] | None = None,
        timeout_s: float | None = None,
    ):
        if executor not in ("local", "ray"):
            raise BadInputError(f"executor '{executor}': expected local or ray")
        if micro_batches < 1:
            raise BadInputError("micro-batches must be at least 1")
        self.specs, self.input_names, self.output_names, options = _specs_from(source)
        self.kind = executor
        self.timeout_s = timeout_s  # ray: how long to wait for actors and results (None: forever)
        self.micro_batches = micro_batches
        self.stats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False
        if executor == "local":
            self._sessions = [_session(s.source, options, threads_per_stage) for s in self.specs]
            self._queues = [queue.Queue(maxsize=queue_size) for _ in self.specs] + [queue.Queue()]
            self._threads = [
                threading.Thread(target=self._stage_loop, args=(i,), name=f"tfgraph-stage{i}", daemon=True)
                for i in range(len(self.specs))
            ]
            for t in self._threads:
                t.start()
        else:
            self._start_ray(options, threads_per_stage, resources, max_in_flight)

    # -- local ------------------------------------------------------------------------------
    def _stage_loop(self, i: int) -> None:
        spec, session = self.specs[i], self._sessions[i]
        inbox, outbox = self._queues[i], self._queues[i + 1]
        while True:
            item = inbox.get()
            if item is _STOP:
                outbox.put(_STOP)
                return
            tag, env = item
            if not isinstance(env, BaseException):
                try:
                    env = _run_stage(session, spec, env)
                except Exception as e:  # pass the failure down the pipeline to the caller
                    env = e
            outbox.put((tag, env))

    def _run_local(self, parts: list[dict]) -> list[dict]:
        results: list[Any] = [None] * len(parts)
        done = 0
        first, last = self._queues[0], self._queues[-1]

        def feed():
            for i, part in enumerate(parts):
                first.put((i, part))

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        while done < len(parts):
            tag, env = last.get()
            results[tag] = env
            done += 1
        feeder.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    # -- ray --------------------------------------------------------------------------------
    def _start_ray(self, options, threads, resources, max_in_flight) -> None:
        try:
            import ray
        except ImportError:
            raise BadInputError("the ray executor needs Ray: pip install 'tfgraph[ray]'") from None
        if not ray.is_initialized():
            init_local_ray()
        actor_cls = ray.remote(num_cpus=0)(_StageActor)
        self._actors = []
        for i, spec in enumerate(self.specs):
            opts = {"resources": dict(resources[i])} if resources and resources[i] else {}
            self._actors.append(actor_cls.options(**opts).remote(spec.source, spec.inputs, spec.outputs, spec.keep, dict(options), threads))
        ray.get([a.ready.remote() for a in self._actors], timeout=self.timeout_s)
        self._max_in_flight = max_in_flight or len(self.specs) + 1

    def _run_ray(self, parts: list[dict]) -> list[dict]:
        import ray

        finals: list = []
        pending: list = []
        for part in parts:
            while len(pending) >= self._max_in_flight:
                _, pending = ray.wait(pending, num_returns=1, timeout=self.timeout_s)
            ref = ray.put(part)
            for actor in self._actors:
                ref = actor.run.remote(ref)  # resolved actor to actor; the driver holds only references
            finals.append(ref)
            pending.append(ref)
        return ray.get(finals, timeout=self.timeout_s)

    def actor_cpu_seconds(self) -> float:
        """Total CPU seconds of the stage actors' processes (ray executor)."""
        import ray

        return float(sum(ray.get([a.cpu_seconds.remote() for a in self._actors])))

    def actor_nodes(self) -> list[str]:
        """The Ray node id of each stage actor (ray executor)."""
        import ray

        return ray.get([a.node_id.remote() for a in self._actors])

    # -- public -----------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], *, micro_batches: int | None = None) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("executor is closed")
        missing = [k for k in self.input_names if k not in feeds]
        extra = [k for k in feeds if k not in self.input_names]
        if missing or extra:
            raise BadInputError(f"inputs do not match the pipeline: missing {missing}, unexpected {extra}")
        parts = split_batch({k: feeds[k] for k in self.input_names}, micro_batches or self.micro_batches)
        with self._lock:
            start, cpu = time.perf_counter(), time.process_time()
            outs = self._run_local(parts) if self.kind == "local" else self._run_ray(parts)
            self.stats = {"wall_s": time.perf_counter() - start, "driver_cpu_s": time.process_time() - cpu, "micro_batches": len(parts)}
        return join_batch(outs, self.output_names)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.kind == "local":
            self._queues[0].put(_STOP)
            for t in self._threads:
                t.join(timeout=10)
        else:
            import ray

            for a in self._actors:
                ray.kill(a)

    def __enter__(self) -> PipelineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StageActor:
    """A Ray actor holding one stage's onnxruntime session."""

    def __init__(self, source, inputs, outputs, keep, options, threads):
        self.spec = _StageSpec(0, source, inputs, outputs, keep)
        self.session = _session(source, options, threads)

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, env):
        return _run_stage(self.session, self.spec, env)

    def cpu_seconds(self) -> float:
        """CPU time of this actor's process (for benchmarks: Ray actors run outside the driver)."""
        return time.process_time()


def init_local_ray(num_cpus: int | None = None, temp_dir: str | None = None, resources: Mapping[str, float] | None = None):
    """Start a private Ray instance on loopback: own temp dir, no usage stats, no dashboard.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is what keeps Ray's servers on 127.0.0.1 on
    these machines (otherwise it binds to the host's network address); Ray reads it when it
    is imported, so it is set here before the import (set it yourself if Ray was imported
    earlier). The node address is checked after start: anything but 127.0.0.1 shuts Ray
    down and raises.
    """
    import tempfile

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if temp_dir is None:
        temp_dir = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="tfgraph-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    import ray

    context = ray.init(num_cpus=num_cpus, resources=dict(resources or {}), include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                       configure_logging=False)
    address = context.address_info.get("node_ip_address")
    if address != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"Ray started on {address}, not on loopback; refusing to run")
    return context
