"""`tfgraph serve` against hostile clients (issue 15, items 12–16): every malformed request is a 4xx within the
read timeout, nothing is allocated for a request over a limit, and the server's memory stays where it was.

The server runs as a `tfgraph serve` subprocess on 127.0.0.1 (so its RSS is its own) with a 1 s read timeout;
tests run in file order and the last one checks the RSS after the whole suite against the RSS after warm-up.
"""

from __future__ import annotations

import http.client
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
import zipfile

import numpy as np
import pytest
import _serving as serving
from _pipeline_models import model_path

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

READ_TIMEOUT = 1.0
SEQ_LIMIT = 128  # bert-small's position table
MB = 1 << 20


def _rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _peak_rss_during(pid: int, action) -> tuple[int, object]:
    """(peak RSS while ``action()`` ran, its result): the kernel's high-water mark, reset first, or sampling."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    peak = [_rss(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join(timeout=5)
    if reset:
        peak[0] = max(peak[0], _rss(pid, "VmHWM"))
    return peak[0], result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body: bytes, content_type: str | None = "application/json", accept: str | None = None,
          timeout=READ_TIMEOUT + 20) -> tuple[int, bytes]:
    """POST ``body`` to /infer (no Content-Type header at all when ``content_type`` is None)."""
    port = int(url.rsplit(":", 1)[1])
    headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _feeds(batch=1, seq=8, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 100, size=(batch, seq)).astype(np.int64), "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def _json(feeds) -> bytes:
    return json.dumps({"inputs": {k: np.asarray(v).tolist() for k, v in feeds.items()}}).encode()


def _npz(feeds, compressed=False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **feeds)
    return buf.getvalue()


@pytest.fixture(scope="session")
def hostile_artifact(tmp_path_factory):
    return model_path(tmp_path_factory, "bert-small", True)


@pytest.fixture(scope="module")
def server(hostile_artifact):
    """`tfgraph serve` in a subprocess, warmed up; yields (url, pid, RSS after warm-up)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tfgraph", "serve", str(hostile_artifact), "--host", "127.0.0.1",
                             "--port", str(port), "--read-timeout", str(READ_TIMEOUT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    assert r.status == 200
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.time() < deadline, "tfgraph serve did not come up"
                time.sleep(0.3)
        for i in range(20):  # warm-up: the sizes the suite's valid requests use
            feeds = _feeds(1 + i % 4, (8, 16, 64, SEQ_LIMIT)[i % 4], seed=i)
            status, body = _post(url, _npz(feeds), "application/x-npz") if i % 2 else _post(url, _json(feeds))
            assert status == 200, body[:300]
        yield url, proc.pid, _rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _error(body: bytes) -> str:
    return json.loads(body)["error"]


# --- item 12: masks outside {0, 1}; non-finite outputs ----------------------------------------------

@pytest.mark.parametrize("value", [-7, 2, 2**40])
def test_attention_mask_outside_0_1_is_422(server, value):
    url, _, _ = server
    feeds = _feeds()
    feeds["attention_mask"][0, 3] = value
    for body, kind in ((_json(feeds), "application/json"), (_npz(feeds), "application/x-npz")):
        status, answer = _post(url, body, kind)
        assert status == 422, (status, answer[:300])
        message = _error(answer)
        assert "attention_mask" in message and "0 and 1" in message and "\n" not in message


def _log_artifact(folder):
    """A one-node artifact y = Log(x): finite inputs, NaN and -Infinity outputs."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps({"target": "cpu-fp32"}))
    return folder


@pytest.fixture(scope="module")
def log_server(tmp_path_factory):
    from tfgraph.deploy.serve import create_app, server_config

    app = create_app(_log_artifact(tmp_path_factory.mktemp("log") / "log"), max_latency_ms=1)
    with serving.running(server_config(app, host="127.0.0.1", port=0, read_timeout_s=READ_TIMEOUT)) as url:
        yield url


def test_non_finite_outputs_are_null_in_json(log_server):
    status, body = _post(log_server, json.dumps({"inputs": {"x": [[1.0, 0.0, -1.0, 2.0]]}}).encode())
    assert status == 200, body[:300]
    y = json.loads(body)["outputs"]["y"]
    assert y[0][0] == 0.0 and y[0][1] is None and y[0][2] is None and abs(y[0][3] - np.log(2.0)) < 1e-6
    assert np.isnan(np.array(y, dtype=np.float64)[0, 1])  # null reads back as NaN with dtype=float
    with urllib.request.urlopen(log_server + "/metadata", timeout=10) as r:
        assert json.loads(r.read())["non_finite_outputs"] == "null"
    # .npz answers keep the values themselves
    status, body = _post(log_server, _npz({"x": np.array([[1, 0, -1, 2]], np.float32)}), "application/x-npz", accept="application/x-npz")
    assert status == 200
    y = np.load(io.BytesIO(body))["y"]
    assert np.isneginf(y[0, 1]) and np.isnan(y[0, 2])


# --- item 13: deeply nested JSON --------------------------------------------------------------------

@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_deeply_nested_json_is_422(server, depth):
    url, _, _ = server
    status, answer = _post(url, b'{"inputs": {"input_ids": ' + b"[" * depth + b"]" * depth + b"}}")
    assert status == 422, (status, answer[:300])
    assert "deeper than 64" in _error(answer)
    # brackets inside strings do not count
    doc = json.loads(_json(_feeds()))
    doc["note"] = "[" * 10_000 + '\\"{'
    status, answer = _post(url, json.dumps(doc).encode())
    assert status == 200, answer[:300]


# --- item 14: slow or short bodies and headers ------------------------------------------------------

def _raw(url: str, data: bytes, wait: float = READ_TIMEOUT + 8) -> tuple[bytes, float]:
    """Send ``data`` and read until the server closes; (what it answered, seconds until it closed)."""
    port = int(url.rsplit(":", 1)[1])
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise AssertionError(f"connection still open after {wait} s; got {received[:200]!r}") from None
            if not chunk:
                return received, time.perf_counter() - start
            received += chunk


def test_body_shorter_than_content_length_is_408(server):
    url, _, _ = server
    head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    answer, seconds = _raw(url, head + b'{"inputs": ')
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"within 1 s" in answer
    assert seconds < READ_TIMEOUT + 3


@pytest.mark.parametrize("data", [b"", b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Le"], ids=["nothing", "half headers"])
def test_slow_headers_are_closed(server, data):
    url, _, _ = server
    answer, seconds = _raw(url, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert seconds < READ_TIMEOUT + 3


def test_server_answers_after_timeouts(server):
    url, _, _ = server
    status, body = _post(url, _json(_feeds()))
    assert status == 200, body[:300]


# --- item 15: .npz zip bombs and pickles ------------------------------------------------------------

def _bomb(elements: int = 1 << 27, header_shape=None) -> bytes:
    """An .npz whose input_ids member is ``elements`` int64 zeros (1 GiB by default), about 1 MB compressed."""
    from numpy.lib import format as npy

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("input_ids.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": header_shape or (1, elements)})
            zeros = bytes(16 * MB)
            left = elements * 8
            while left:
                f.write(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))
        for name in ("attention_mask", "token_type_ids"):
            member = io.BytesIO()
            np.save(member, np.zeros((1, 8), np.int64))
            zf.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb():
    return _bomb()


def test_npz_zip_bomb_is_413_without_decompressing(server, bomb):
    url, pid, _ = server
    assert len(bomb) < 2 * MB
    before = _rss(pid)
    peak, (status, answer) = _peak_rss_during(pid, lambda: _post(url, bomb, "application/x-npz"))
    assert status == 413, (status, answer[:300])
    assert "input_ids" in _error(answer)
    assert peak - before < 64 * MB, f"RSS rose {(peak - before) / MB:.0f} MB for a {len(bomb) / MB:.1f} MB request"


def test_npz_header_lies_and_pickles_are_refused(server):
    url, pid, _ = server
    # a small shape in the header, a large (1 GiB) member: refused from the zip's directory
    lying = _bomb(header_shape=(1, 8))
    before = _rss(pid)
    peak, (status, answer) = _peak_rss_during(pid, lambda: _post(url, lying, "application/x-npz"))
    assert 400 <= status < 500, (status, answer[:300])
    assert peak - before < 64 * MB
    # a header over the element limit, with little data behind it
    from numpy.lib import format as npy

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        member = io.BytesIO()
        npy.write_array_header_1_0(member, {"descr": "<i8", "fortran_order": False, "shape": (1, 1 << 40)})
        zf.writestr("input_ids.npy", member.getvalue() + bytes(64))
        for name in ("attention_mask", "token_type_ids"):
            zf.writestr(f"{name}.npy", _npy(np.zeros((1, 8), np.int64)))
    status, answer = _post(url, buf.getvalue(), "application/x-npz")
    assert status == 413 and "limit" in _error(answer), answer[:300]
    # a pickled object array is refused, never unpickled
    feeds = {k: v for k, v in _feeds().items()}
    feeds["input_ids"] = np.array([[1, 2, object()]], dtype=object)[:, :2]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, value in feeds.items():
            member = io.BytesIO()
            np.save(member, value, allow_pickle=True)
            zf.writestr(f"{name}.npy", member.getvalue())
    status, answer = _post(url, buf.getvalue(), "application/x-npz")
    assert status == 422 and "pickled" in _error(answer), answer[:300]


def _npy(array) -> bytes:
    member = io.BytesIO()
    np.save(member, array)
    return member.getvalue()


# --- item 16: over-length sequences -----------------------------------------------------------------

def test_over_length_sequence_is_422_before_allocation(server):
    url, pid, _ = server
    seq = 1_000_000
    ones = "[[" + ",".join(["1"] * seq) + "]]"
    body = ('{"inputs": {"input_ids": %s, "attention_mask": %s, "token_type_ids": %s}}' % (ones, ones, ones.replace("1", "0"))).encode()
    npz = _npz({"input_ids": np.ones((1, seq), np.int64), "attention_mask": np.ones((1, seq), np.int64),
                "token_type_ids": np.zeros((1, seq), np.int64)}, compressed=True)
    for payload, kind in ((body, "application/json"), (npz, "application/x-npz")):
        before = _rss(pid)
        peak, (status, answer) = _peak_rss_during(pid, lambda: _post(url, payload, kind))
        assert status == 422, (kind, status, answer[:300])
        assert f"sequence length {seq}, over the model's limit of {SEQ_LIMIT}" in _error(answer)
        # the body itself and its parsed lists are all it costs (the 1M×64 embedding alone would be 256 MB)
        assert peak - before < 160 * MB, f"{kind}: RSS rose {(peak - before) / MB:.0f} MB"
    # one over the limit is refused; at the limit it runs
    assert _post(url, _json(_feeds(1, SEQ_LIMIT + 1)))[0] == 422
    assert _post(url, _json(_feeds(1, SEQ_LIMIT)))[0] == 200
    with urllib.request.urlopen(url + "/metadata", timeout=10) as r:
        assert json.loads(r.read())["limits"]["max_sequence"] == SEQ_LIMIT


# --- no malformed request gets a 500 ----------------------------------------------------------------

def test_malformed_battery_all_4xx(server):
    url, _, _ = server
    good = {k: v.tolist() for k, v in _feeds().items()}

    def js(obj) -> bytes:
        return json.dumps(obj).encode()

    def with_input(name, value) -> bytes:
        return js({"inputs": {**good, name: value}})

    cases = {
        "bad json": (b'{"inputs": {"input_ids": [[1, 2', "application/json"),
        "json garbage": (b"\xff\xfe\x00garbage", "application/json"),
        "empty body": (b"", "application/json"),
        "empty npz": (b"", "application/x-npz"),
        "no content type (read as JSON)": (js({"inputz": good}), None),
        "top level list": (js([good]), "application/json"),
        "top level string": (js("inputs"), "application/json"),
        "inputs null": (js({"inputs": None}), "application/json"),
        "inputs a list": (js({"inputs": [good]}), "application/json"),
        "wrong names": (js({"inputs": {"ids": good["input_ids"], "mask": good["attention_mask"]}}), "application/json"),
        "extra name": (with_input("position_ids", [[0] * 8]), "application/json"),
        "string ids": (with_input("input_ids", [["a"] * 8]), "application/json"),
        "object ids": (with_input("input_ids", {"a": 1}), "application/json"),
        "null ids": (with_input("input_ids", [[None] * 8]), "application/json"),
        "bool ids": (with_input("input_ids", [[True] * 8]), "application/json"),
        "float ids": (with_input("input_ids", [[0.5] * 8]), "application/json"),
        "NaN ids": (b'{"inputs": {"input_ids": [[NaN, 1, 1, 1, 1, 1, 1, 1]], "attention_mask": [[1,1,1,1,1,1,1,1]], '
                    b'"token_type_ids": [[0,0,0,0,0,0,0,0]]}}', "application/json"),
        "Infinity mask": (b'{"inputs": {"input_ids": [[1,1,1,1,1,1,1,1]], "attention_mask": [[Infinity,1,1,1,1,1,1,1]], '
                          b'"token_type_ids": [[0,0,0,0,0,0,0,0]]}}', "application/json"),
        "negative ids": (with_input("input_ids", [[-5] * 8]), "application/json"),
        "huge ids": (with_input("input_ids", [[2**62] * 8]), "application/json"),
        "ids over int64": (with_input("input_ids", [[2**64] * 8]), "application/json"),
        "5000-digit id": (b'{"inputs": {"input_ids": [[' + b"9" * 5000 + b']]}}', "application/json"),
        "float 1e400": (with_input("input_ids", [[1e308] * 8]).replace(b"1e+308", b"1e400"), "application/json"),
        "negative mask": (with_input("attention_mask", [[-1] * 8]), "application/json"),
        "type ids out of range": (with_input("token_type_ids", [[7] * 8]), "application/json"),
        "empty lists": (js({"inputs": {k: [] for k in good}}), "application/json"),
        "empty rows": (js({"inputs": {k: [[]] for k in good}}), "application/json"),
        "ragged": (with_input("input_ids", [[1] * 8, [1] * 3]), "application/json"),
        "ragged deep": (with_input("input_ids", [[1] * 8, [[1]] * 8]), "application/json"),
        "scalar": (with_input("input_ids", 5), "application/json"),
        "rank 3": (with_input("input_ids", [[[1]] * 8]), "application/json"),
        "mismatched sequence": (with_input("input_ids", [[1] * 9]), "application/json"),
        "batch over the limit": (js({"inputs": {k: v * 9 for k, v in good.items()}}), "application/json"),
        "deep": (b"[" * 100_000, "application/json"),
        "text without a tokenizer": (js({"text": ["hello"]}), "application/json"),
        "text and inputs": (js({"text": ["hello"], "inputs": good}), "application/json"),
        "wrong content type": (js({"inputs": good}), "text/plain"),
        "form content type": (b"a=1&b=2", "application/x-www-form-urlencoded"),
        "npz garbage": (b"PK\x03\x04" + bytes(100), "application/x-npz"),
        "npz not a zip": (b"hello", "application/x-npz"),
        "npz wrong names": (_npz({"ids": np.zeros((1, 8), np.int64)}), "application/x-npz"),
        "npz wrong dtype": (_npz({k: np.asarray(v, np.int32) for k, v in good.items()}), "application/x-npz"),
        "npz float ids": (_npz({**{k: np.asarray(v) for k, v in good.items()}, "input_ids": np.zeros((1, 8))}), "application/x-npz"),
        "npz mismatched": (_npz({**{k: np.asarray(v) for k, v in good.items()}, "input_ids": np.zeros((1, 9), np.int64)}),
                           "application/x-npz"),
        "npz empty": (_npz({k: np.zeros((1, 0), np.int64) for k in good}), "application/x-npz"),
        "npz negative ids": (_npz({**{k: np.asarray(v) for k, v in good.items()}, "input_ids": np.full((1, 8), -1, np.int64)}),
                             "application/x-npz"),
    }
    failures = []
    for label, (body, kind) in cases.items():
        start = time.perf_counter()
        status, answer = _post(url, body, kind)
        seconds = time.perf_counter() - start
        try:
            message = _error(answer)
        except (ValueError, KeyError):
            message = None
        if not (400 <= status < 500 and message and "\n" not in message and seconds < READ_TIMEOUT + 5):
            failures.append((label, status, seconds, answer[:200]))
    # malformed HTTP: a Content-Length that is not a number, a body over the limit announced up front
    port = int(url.rsplit(":", 1)[1])
    for headers in ({"Content-Length": "12abc"}, {"Content-Length": str(1 << 40)}, {"Content-Length": "-5"}):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_TIMEOUT + 10)
        try:
            conn.putrequest("POST", "/infer")
            conn.putheader("Content-Type", "application/json")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            response = conn.getresponse()
            if not 400 <= response.status < 500:
                failures.append((headers, response.status))
        finally:
            conn.close()
    assert failures == []
    assert _post(url, _json(_feeds()))[0] == 200


# --- last: memory after the whole suite ---------------------------------------------------------------

def test_rss_after_suite_within_100mb_of_warm_up(server):
    url, pid, warm = server
    for i in range(4):  # and it still serves
        assert _post(url, _json(_feeds(2, 16, seed=i)))[0] == 200
    now = _rss(pid)
    print(f"\nserver RSS after warm-up {warm / MB:.0f} MB, after the hostile suite {now / MB:.0f} MB")
    assert now - warm < 100 * MB, f"RSS grew {(now - warm) / MB:.0f} MB over the suite"
