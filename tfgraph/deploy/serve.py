"""An HTTP inference service over an artifact (single model or pipeline), on Starlette + uvicorn.

Endpoints: ``GET /health``, ``GET /metadata`` (signature, stages, limits, text), ``POST /infer``
with a JSON body ``{"inputs": {name: nested list}}`` or an ``.npz`` body
(``Content-Type: application/x-npz``); the answer is JSON, or ``.npz`` when the request
asks for it with ``Accept: application/x-npz``. Every input is checked against the model's
signature (names, dtypes, ranks, fixed and shared dimensions, embedding index ranges, 0/1
attention masks, the position table's sequence limit, size limits) before its arrays are
allocated (:mod:`tfgraph.deploy.serve_limits`): a bad request gets a 4xx with a one-line message,
never a crash.

Text: when the artifact carries a tokenizer (manifest ``"tokenizer"``, see :mod:`tfgraph.deploy.text`),
``POST /infer`` also takes ``{"text": ["...", ...]}``; the answer then also holds
``"embeddings"`` (one vector per text) when the manifest names an ``embedding_output``. A text
over the model's limit is a 422 that names it.

JSON answers: JSON has no NaN or Infinity, so non-finite output values are written as ``null``
(``/metadata`` says so under ``"non_finite_outputs"``); ``.npz`` answers keep them as they are.

Hostile clients: JSON nested deeper than ``max_json_depth`` is refused before it is parsed;
request headers (:func:`serve`) and bodies (the handler) must arrive within ``read_timeout_s``,
or the server answers 408 and closes the connection.

Requests are batched: a batcher task collects requests whose non-batch dimensions agree, up
to ``max_batch`` rows or ``max_latency_ms`` after the first one, runs them as one batch on
the executor (in a worker thread) and hands each request its rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import pathlib
from typing import Any

import numpy as np

from tfgraph.errors import BadInputError
from tfgraph.signature import position_limit
from tfgraph.deploy.serve_limits import (  # noqa: F401  (RequestError, InputSpec, validate: this module's API)
    MAX_JSON_DEPTH,
    NON_FINITE_JSON,
    NPZ,
    InputSpec,
    RequestError,
    header_timeout_protocol,
    is_mask,
    json_outputs,
    parse_json,
    read_npz,
    sequence_axis,
    validate,
)


def signature(path: pathlib.Path) -> tuple[list[InputSpec], list[str], dict]:
    from tfgraph import ir as tir
    from tfgraph.deploy.artifact import MODEL_FILE, read_manifest
    from tfgraph.signature import _gather_index_bound, input_signature

    manifest = read_manifest(path)
    model = tir.load(path / MODEL_FILE).model
    values = {v.name: v for v in model.graph.inputs}
    limits = [n for n in (position_limit(model), (manifest.get("tokenizer") or {}).get("max_length")) if isinstance(n, int) and n > 0]
    specs = []
    for info in input_signature(model):
        dtype = np.dtype(info.dtype)
        bound = _gather_index_bound(values[info.name]) if np.issubdtype(dtype, np.integer) else None
        spec = InputSpec(info.name, dtype, list(info.shape), bound, mask=is_mask(info.name, dtype))
        spec.seq_limit = min(limits) if limits and sequence_axis(spec) else None
        specs.append(spec)
    return specs, [v.name for v in model.graph.outputs], manifest


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
               max_latency_ms: float = 5.0, max_request_bytes: int = 16 << 20, max_elements: int = 1 << 20,
               read_timeout_s: float = 10.0, max_json_depth: int = MAX_JSON_DEPTH):
    """The Starlette application serving ``artifact``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from tfgraph.deploy.executor import PipelineExecutor
    from tfgraph.deploy.text import load_tokenizer

    path = pathlib.Path(artifact)
    specs, output_names, manifest = signature(path)
    by_name = {s.name: s for s in specs}
    try:
        encoder, no_text = load_tokenizer(path, [s.name for s in specs]), "this artifact carries no tokenizer"
    except BadInputError as e:  # e.g. no `tokenizers` package here: serve token ids, and say why text is refused
        encoder, no_text = None, str(e)
    pipe = manifest.get("pipeline")
    state: dict[str, Any] = {}

    def metadata() -> dict:
        seq_limits = [s.seq_limit for s in specs if s.seq_limit is not None]
        return {
            "artifact": str(path),
            "target": manifest.get("target"),
            "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": s.shape, "mask": s.mask} for s in specs],
            "outputs": output_names,
            "stages": [{"file": s["file"], "inputs": [v["name"] for v in s["inputs"]], "outputs": [v["name"] for v in s["outputs"]],
                        "cost_s": s["cost_s"], "device": s.get("device")} for s in pipe["stages"]] if pipe else None,
            "executor": executor,
            "limits": {"max_batch": max_batch, "max_latency_ms": max_latency_ms, "max_request_bytes": max_request_bytes,
                       "max_elements": max_elements, "max_sequence": min(seq_limits) if seq_limits else None,
                       "read_timeout_s": read_timeout_s, "max_json_depth": max_json_depth},
            "text": {"accepted": True, "max_length": encoder.max_length, "embedding_output": encoder.embedding_output}
                    if encoder else {"accepted": False, "reason": no_text},
            "non_finite_outputs": NON_FINITE_JSON,
        }

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "requests": state["batcher"].requests, "batches": state["batcher"].batches})

    async def meta(request: Request) -> Response:
        return JSONResponse(metadata())

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise RequestError(413, f"request body over {max_request_bytes} bytes")
        return bytes(body)

    async def text_feeds(texts: Any) -> dict[str, np.ndarray]:
        if encoder is None:
            raise RequestError(422, f"{no_text}: send token ids in 'inputs'")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError(422, "'text' must be a non-empty list of strings")
        if len(texts) > max_batch:
            raise RequestError(413, f"{len(texts)} texts, the limit is {max_batch}")
        try:
            feeds = await asyncio.get_running_loop().run_in_executor(None, encoder.encode, texts)
        except BadInputError as e:
            raise RequestError(422, str(e)) from None
        return {k: v.astype(by_name[k].dtype, copy=False) for k, v in feeds.items()}

    async def infer(request: Request) -> Response:
        is_text = False
        try:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_request_bytes):
                raise RequestError(413, f"request body over {max_request_bytes} bytes")
            try:
                body = await asyncio.wait_for(read_body(request), read_timeout_s)
            except asyncio.TimeoutError:
                return JSONResponse({"error": f"request body not received within {read_timeout_s:g} s"}, status_code=408,
                                    headers={"connection": "close"})
            kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if kind in (NPZ, "application/octet-stream"):
                raw = read_npz(body, specs, max_batch=max_batch, max_elements=max_elements)
            elif kind == "application/json":
                doc = parse_json(body, max_depth=max_json_depth)
                if not isinstance(doc, dict) or ("inputs" in doc) == ("text" in doc):
                    raise RequestError(400, "JSON body must be an object with an 'inputs' field"
                                       + (" or a 'text' field (not both)" if encoder is not None else ""))
                is_text = "text" in doc
                raw = await text_feeds(doc["text"]) if is_text else doc["inputs"]
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
        answer = {"outputs": json_outputs(outputs), "shapes": {k: list(v.shape) for k, v in outputs.items()}}
        if is_text and encoder.embedding_output in outputs:
            answer["embeddings"] = answer["outputs"][encoder.embedding_output]
        return JSONResponse(answer)

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


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, read_timeout_s: float = 10.0, log_level: str = "warning"):
    """A ``uvicorn.Config`` for ``app`` whose connections must send their request headers within ``read_timeout_s``."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=header_timeout_protocol(read_timeout_s))


def serve(artifact: str | pathlib.Path, *, host: str = "127.0.0.1", port: int = 8000, read_timeout_s: float = 10.0, **options) -> None:
    """Serve ``artifact`` until interrupted (``tfgraph serve``); ``options`` go to :func:`create_app`."""
    import uvicorn

    if not read_timeout_s > 0:
        raise BadInputError(f"read timeout {read_timeout_s}: expected a positive number of seconds")
    app = create_app(artifact, read_timeout_s=read_timeout_s, **options)
    uvicorn.Server(server_config(app, host=host, port=port, read_timeout_s=read_timeout_s)).run()
