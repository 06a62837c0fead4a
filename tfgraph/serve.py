"""An HTTP inference service over an artifact (single model or pipeline), on Starlette + uvicorn.

Endpoints: ``GET /health``, ``GET /metadata`` (signature, stages, limits), ``POST /infer``
with a JSON body ``{"inputs": {name: nested list}}`` or an ``.npz`` body
(``Content-Type: application/x-npz``); the answer is JSON, or ``.npz`` when the request
asks for it with ``Accept: application/x-npz``. Every input is checked against the model's
signature (names, dtypes, ranks, fixed and shared dimensions, embedding index ranges, size
limits): a bad request gets a 4xx with a one-line message, never a crash.

Requests are batched: a batcher task collects requests whose non-batch dimensions agree, up
to ``max_batch`` rows or ``max_latency_ms`` after the first one, runs them as one batch on
the executor (in a worker thread) and hands each request its rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import pathlib
from typing import Any

import numpy as np

from tfgraph.errors import BadInputError

NPZ = "application/x-npz"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list  # int, symbolic name (str) or None
    bound: int | None  # exclusive upper bound of integer values (embedding rows), if known


def signature(path: pathlib.Path) -> tuple[list[InputSpec], list[str], dict]:
    from tfgraph import ir as tir
    from tfgraph.artifact import MODEL_FILE, read_manifest
    from tfgraph.verify import _gather_index_bound, input_signature

    manifest = read_manifest(path)
    model = tir.load(path / MODEL_FILE).model
    values = {v.name: v for v in model.graph.inputs}
    specs = []
    for info in input_signature(model):
        bound = _gather_index_bound(values[info.name]) if np.issubdtype(info.dtype, np.integer) else None
        specs.append(InputSpec(info.name, np.dtype(info.dtype), list(info.shape), bound))
    return specs, [v.name for v in model.graph.outputs], manifest


def validate(feeds: dict[str, Any], specs: list[InputSpec], *, max_batch: int, max_elements: int) -> dict[str, np.ndarray]:
    """Arrays of the signature's dtypes, or RequestError(4xx) saying what is wrong."""
    names = {s.name for s in specs}
    if not isinstance(feeds, dict):
        raise RequestError(400, "'inputs' must be an object mapping input names to arrays")
    missing = sorted(names - set(feeds))
    extra = sorted(set(feeds) - names)
    if missing or extra:
        raise RequestError(422, f"inputs do not match the model: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for spec in specs:
        raw = feeds[spec.name]
        if isinstance(raw, np.ndarray):
            array = raw
            if array.dtype != spec.dtype:
                raise RequestError(422, f"input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
        else:
            try:
                array = np.asarray(raw)
            except Exception:
                raise RequestError(422, f"input '{spec.name}' is not a rectangular array") from None
            if array.dtype == object or array.dtype.kind in "USO":
                raise RequestError(422, f"input '{spec.name}' is not a rectangular array of numbers")
            if array.size and array.dtype.kind == "b" and spec.dtype.kind != "b":
                raise RequestError(422, f"input '{spec.name}' holds booleans, the model expects {spec.dtype}")
            if np.issubdtype(spec.dtype, np.integer) and array.size and array.dtype.kind == "f":
                raise RequestError(422, f"input '{spec.name}' holds non-integers, the model expects {spec.dtype}")
            if array.size > max_elements:
                raise RequestError(413, f"input '{spec.name}' has {array.size} elements, the limit is {max_elements}")
            try:
                with np.errstate(all="raise"):
                    converted = array.astype(spec.dtype)
            except (OverflowError, FloatingPointError, ValueError):
                raise RequestError(422, f"input '{spec.name}' does not fit {spec.dtype}") from None
            if np.issubdtype(spec.dtype, np.integer) and array.size and not np.array_equal(converted, array):
                raise RequestError(422, f"input '{spec.name}' does not fit {spec.dtype}")
            array = converted
        if array.ndim != len(spec.shape):
            raise RequestError(422, f"input '{spec.name}' has rank {array.ndim} (shape {list(array.shape)}), the model expects {spec.shape}")
        if array.size > max_elements:
            raise RequestError(413, f"input '{spec.name}' has {array.size} elements, the limit is {max_elements}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise RequestError(422, f"input '{spec.name}' dimension {axis} is {got}, the model expects {want}")
            if isinstance(want, str):
                if dims.setdefault(want, got) != got:
                    raise RequestError(422, f"input '{spec.name}' dimension {axis} ('{want}') is {got}, another input has {dims[want]}")
            if got == 0:
                raise RequestError(422, f"input '{spec.name}' has an empty dimension {axis}")
        if array.ndim and array.shape[0] > max_batch:
            raise RequestError(413, f"input '{spec.name}' has batch {array.shape[0]}, the limit is {max_batch}")
        if spec.bound is not None and array.size and (array.min() < 0 or array.max() >= spec.bound):
            raise RequestError(422, f"input '{spec.name}' has values outside [0, {spec.bound})")
        if spec.dtype.kind == "f" and array.size and not np.all(np.isfinite(array)):
            raise RequestError(422, f"input '{spec.name}' has non-finite values")
        out[spec.name] = np.ascontiguousarray(array)
    return out


class _Pending:
    def __init__(self, feeds: dict[str, np.ndarray], future: asyncio.Future):
        self.feeds = feeds
        self.future = future
        self.rows = next(iter(feeds.values())).shape[0] if feeds else 1
        self.key = tuple((k, v.shape[1:], str(v.dtype)) for k, v in sorted(feeds.items()))


class Batcher:
    """Group compatible requests into batches of at most ``max_batch`` rows within ``max_latency_s``."""

    def __init__(self, executor, max_batch: int, max_latency_s: float):
        self.executor = executor
        self.max_batch = max_batch
        self.max_latency_s = max_latency_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(feeds, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: list[_Pending] = []
        while True:
            first = carry.pop(0) if carry else await self.queue.get()
            batch, rows = [first], first.rows
            deadline = loop.time() + self.max_latency_s
            while rows < self.max_batch:
                # Requests that do not fit this batch wait for the next one, in order.
                fitting = [p for p in carry if p.key == first.key and rows + p.rows <= self.max_batch]
                for p in fitting:
                    carry.remove(p)
                    batch.append(p)
                    rows += p.rows
                if rows >= self.max_batch:
                    break
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if item.key == first.key and rows + item.rows <= self.max_batch:
                    batch.append(item)
                    rows += item.rows
                else:
                    carry.append(item)
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        names = list(batch[0].feeds)
        feeds = {k: np.concatenate([p.feeds[k] for p in batch], axis=0) for k in names} if len(batch) > 1 else batch[0].feeds
        try:
            outputs = await loop.run_in_executor(None, self.executor.run, feeds)
        except Exception as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(batch)
        start = 0
        for p in batch:
            if len(batch) == 1:
                result = outputs
            else:
                result = {k: v[start:start + p.rows] for k, v in outputs.items()}
            start += p.rows
            if not p.future.done():
                p.future.set_result(result)


def create_app(artifact: str | pathlib.Path, *, executor: str = "local", micro_batches: int = 1, max_batch: int = 8,
               max_latency_ms: float = 5.0, max_request_bytes: int = 16 << 20, max_elements: int = 1 << 20):
    """The Starlette application serving ``artifact``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from tfgraph.executor import PipelineExecutor

    path = pathlib.Path(artifact)
    specs, output_names, manifest = signature(path)
    pipe = manifest.get("pipeline")
    state: dict[str, Any] = {}

    def metadata() -> dict:
        return {
            "artifact": str(path),
            "target": manifest.get("target"),
            "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": s.shape} for s in specs],
            "outputs": output_names,
            "stages": [{"file": s["file"], "inputs": [v["name"] for v in s["inputs"]], "outputs": [v["name"] for v in s["outputs"]],
                        "cost_s": s["cost_s"], "device": s.get("device")} for s in pipe["stages"]] if pipe else None,
            "executor": executor,
            "limits": {"max_batch": max_batch, "max_latency_ms": max_latency_ms, "max_request_bytes": max_request_bytes,
                       "max_elements": max_elements},
        }

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "requests": state["batcher"].requests, "batches": state["batcher"].batches})

    async def meta(request: Request) -> Response:
        return JSONResponse(metadata())

    async def infer(request: Request) -> Response:
        try:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_request_bytes):
                raise RequestError(413, f"request body over {max_request_bytes} bytes")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_request_bytes:
                    raise RequestError(413, f"request body over {max_request_bytes} bytes")
            kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if kind in (NPZ, "application/octet-stream"):
                try:
                    with np.load(io.BytesIO(body), allow_pickle=False) as data:
                        raw = {k: data[k] for k in data.files}
                except Exception as e:
                    raise RequestError(400, f"body is not a readable .npz file ({type(e).__name__})") from None
            elif kind == "application/json":
                try:
                    doc = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RequestError(400, f"body is not valid JSON ({e})") from None
                if not isinstance(doc, dict) or "inputs" not in doc:
                    raise RequestError(400, "JSON body must be an object with an 'inputs' field")
                raw = doc["inputs"]
            else:
                raise RequestError(415, f"unsupported content type '{kind}': use application/json or {NPZ}")
            feeds = validate(raw, specs, max_batch=max_batch, max_elements=max_elements)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        try:
            outputs = await state["batcher"].submit(feeds)
        except BadInputError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except Exception as e:
            # onnxruntime refusing a request that fits the signature is a limit of the model (e.g. a sequence
            # longer than its position table): the request's fault, 422. Anything else is ours: 500.
            status = 422 if type(e).__module__.startswith("onnxruntime") else 500
            return JSONResponse({"error": f"the model cannot run this input: {type(e).__name__}: {' '.join(str(e).split())[:300]}"},
                                status_code=status)
        if NPZ in request.headers.get("accept", ""):
            buf = io.BytesIO()
            np.savez(buf, **outputs)
            return Response(buf.getvalue(), media_type=NPZ)
        return JSONResponse({"outputs": {k: v.tolist() for k, v in outputs.items()},
                             "shapes": {k: list(v.shape) for k, v in outputs.items()}})

    async def startup() -> None:
        state["executor"] = PipelineExecutor(path, executor=executor, micro_batches=micro_batches)
        state["batcher"] = Batcher(state["executor"], max_batch, max_latency_ms / 1000)
        state["batcher"].start()

    async def shutdown() -> None:
        await state["batcher"].stop()
        state["executor"].close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metadata", meta, methods=["GET"]),
        Route("/infer", infer, methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await startup()
        try:
            yield
        finally:
            await shutdown()

    return Starlette(routes=routes, lifespan=lifespan)
