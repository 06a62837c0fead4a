"""HTTP serving: a bounded load test on 127.0.0.1 with zero errors, malformed requests → 4xx, `tfgraph serve`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from _pipeline_models import model_path

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from tfgraph.serve import create_app  # noqa: E402
from tfgraph.stages import partition_artifact  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = model_path(tmp_path_factory, "bert-small", True)
    dst = tmp_path_factory.mktemp("serve") / "bert-small-k2"
    partition_artifact(src, 2, dst, shapes={"sequence": 32})
    return dst


@pytest.fixture(scope="module")
def server(artifact):
    app = create_app(artifact, max_batch=8, max_latency_ms=3, max_request_bytes=1 << 20, max_elements=1 << 16)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    host, port = srv.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def _post(url, body: bytes, content_type="application/json", accept=None, timeout=30):
    headers = {"Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url + "/infer", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def _feeds(rng, batch, seq):
    ids = rng.integers(0, 100, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), np.int64)}


def _reference(artifact, feeds):
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], feeds)[0]


def test_health_and_metadata(server):
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(server + "/metadata", timeout=10) as r:
        meta = json.loads(r.read())
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"] == ["last_hidden_state"] and len(meta["stages"]) == 2
    assert meta["limits"]["max_batch"] == 8


def test_load_8_clients_x_50_requests(server, artifact):
    """8 concurrent clients × 50 requests (JSON and npz, batch 1–2, sequence 8 or 12): zero errors, right answers."""
    clients, per_client = 8, 50
    errors: list = []
    checked = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        for i in range(per_client):
            feeds = _feeds(rng, 1 + (i % 2), 8 if index % 2 else 12)
            start = time.perf_counter()
            if i % 5 == 0:
                buf = io.BytesIO()
                np.savez(buf, **feeds)
                status, body, kind = _post(server, buf.getvalue(), "application/x-npz", accept="application/x-npz")
                out = np.load(io.BytesIO(body))["last_hidden_state"] if status == 200 else None
            else:
                payload = json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}).encode()
                status, body, kind = _post(server, payload)
                out = np.asarray(json.loads(body)["outputs"]["last_hidden_state"], np.float32) if status == 200 else None
            with lock:
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append((index, i, status, body[:200]))
                elif i % 10 == 0:
                    checked.append((feeds, out))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    wall = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "load test did not finish in time"
    assert errors == []
    assert len(latencies) == clients * per_client
    for feeds, out in checked:
        ref = _reference(artifact, feeds)
        assert out.shape == ref.shape
        assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["requests"] >= clients * per_client
    assert health["batches"] < health["requests"]  # requests were batched together
    print(f"\n{clients}x{per_client} requests in {wall:.2f} s ({clients * per_client / wall:.0f} req/s), "
          f"p50 {np.percentile(latencies, 50) * 1e3:.1f} ms, p99 {np.percentile(latencies, 99) * 1e3:.1f} ms, "
          f"{health['batches']} batches")


def test_malformed_requests_get_4xx(server):
    rng = np.random.default_rng(0)
    good = {k: v.tolist() for k, v in _feeds(rng, 1, 8).items()}

    def js(obj):
        return json.dumps(obj).encode()

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.int32) for k, v in good.items()})
    wrong_dtype_npz = buf.getvalue()
    cases = {
        "not json": (b"{nope", "application/json"),
        "no inputs field": (js({"x": 1}), "application/json"),
        "inputs not an object": (js({"inputs": [1, 2]}), "application/json"),
        "missing input": (js({"inputs": {"input_ids": good["input_ids"]}}), "application/json"),
        "unknown input": (js({"inputs": {**good, "extra": [[1]]}}), "application/json"),
        "ragged": (js({"inputs": {**good, "input_ids": [[1, 2], [3]]}}), "application/json"),
        "strings": (js({"inputs": {**good, "input_ids": [["a", "b"]]}}), "application/json"),
        "floats for int64": (js({"inputs": {**good, "input_ids": [[1.5] * 8]}}), "application/json"),
        "wrong rank": (js({"inputs": {**good, "input_ids": [1] * 8}}), "application/json"),
        "mismatched sequence": (js({"inputs": {**good, "input_ids": [[1] * 9]}}), "application/json"),
        "index out of vocabulary": (js({"inputs": {**good, "input_ids": [[10**6] * 8]}}), "application/json"),
        "negative index": (js({"inputs": {**good, "input_ids": [[-1] * 8]}}), "application/json"),
        "int64 overflow": (js({"inputs": {**good, "input_ids": [[2**70] * 8]}}), "application/json"),
        "empty": (js({"inputs": {k: [[]] for k in good}}), "application/json"),
        "batch over limit": (js({"inputs": {k: v * 9 for k, v in good.items()}}), "application/json"),
        "too many elements": (js({"inputs": {k: [v[0] * 1200] * 8 for k, v in good.items()}}), "application/json"),
        "longer than the position table": (js({"inputs": {k: [v[0] * 300] for k, v in good.items()}}), "application/json"),
        "bad npz": (b"PK\x03\x04garbage", "application/x-npz"),
        "npz wrong dtype": (wrong_dtype_npz, "application/x-npz"),
        "unsupported type": (b"hello", "text/plain"),
    }
    for label, (body, kind) in cases.items():
        status, payload, _ = _post(server, body, kind)
        assert 400 <= status < 500, (label, status, payload[:200])
        assert json.loads(payload)["error"], label
    # A body announced over the limit is refused from its Content-Length, before it is read.
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlparse(server)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.putrequest("POST", "/infer")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over" in json.loads(response.read())["error"]
    conn.close()
    # Wrong method and unknown path are 4xx too; the server still answers afterwards.
    try:
        urllib.request.urlopen(server + "/infer", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 405
    status, _, _ = _post(server, js({"inputs": good}))
    assert status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_subprocess(artifact):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tfgraph", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    assert r.status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "tfgraph serve did not come up"
                time.sleep(0.3)
        feeds = _feeds(np.random.default_rng(5), 2, 8)
        status, body, _ = _post(url, json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}).encode())
        assert status == 200
        out = np.asarray(json.loads(body)["outputs"]["last_hidden_state"], np.float32)
        ref = _reference(artifact, feeds)
        assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
