"""cpu-int8 on the bundled real all-MiniLM-L6-v2: sentence-embedding cosine to fp32 on held-out real
sentences, the accuracy budget, artifact size."""

from __future__ import annotations

import numpy as np
import pytest
from tfgraph.models import sentences

pytest.importorskip("transformers")

CALIBRATION = sentences.CALIBRATION

HELD_OUT = sentences.HELD_OUT[:24]


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory):
    import tfgraph
    from tfgraph.compiler.export import export
    from tfgraph.models import minilm_path

    work = tmp_path_factory.mktemp("minilm-int8")
    source = export("minilm", work / "minilm.onnx")
    sentences = work / "calibration.txt"
    sentences.write_text("\n".join(CALIBRATION) + "\n")
    artifact = tfgraph.compile(str(source), "cpu-int8", output=work / "int8", calibration=sentences,
                               tokenizer=minilm_path())
    return source, artifact, work / "int8" / "model.onnx"


def test_int8_minilm_sentence_embedding_cosine(minilm_int8):
    import collections

    from tfgraph.compiler.calibration import tokenize
    from tfgraph.ir import load
    from tfgraph.models import minilm_path
    from tfgraph.compiler.verify import run

    source, artifact, compiled = minilm_int8
    fp32_model = load(source).model
    int8_model = load(compiled).model
    ops = collections.Counter(n.op_type for n in int8_model.graph)
    # FFN and output projections; the packed Attention as QAttention (int8 Q/K/V, per-column weights, the
    # padding mask as mask_index), each inside If(no padding: without its mask | with it); a few may be
    # reverted to float
    assert ops["DynamicQuantizeMatMul"] >= 12
    kernels = collections.Counter()
    for node in int8_model.graph:
        if node.op_type == "If":
            (then_kernel,), (else_kernel,) = (list(node.attributes[k].value) for k in ("then_branch", "else_branch"))
            assert then_kernel.op_type == else_kernel.op_type
            kernels[then_kernel.op_type] += 1
        else:
            kernels[node.op_type] += 1
    assert kernels["QAttention"] + kernels["MultiHeadAttention"] + kernels["Attention"] == 6 and kernels["QAttention"] >= 3
    feeds = tokenize(HELD_OUT, minilm_path(), [v.name for v in fp32_model.graph.inputs])
    want = run(fp32_model, feeds)["sentence_embedding"]
    got = run(int8_model, feeds, options={"graph_optimization_level": "ORT_ENABLE_ALL"})["sentence_embedding"]
    cos = (want * got).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.mean() >= 0.995 and cos.min() >= 0.99, (cos.mean(), cos.min())


def test_int8_minilm_manifest_budget_and_size(minilm_int8):
    _, artifact, _ = minilm_int8
    manifest = artifact.manifest
    section = manifest["precision"]
    assert section["calibration"]["samples"] == len(CALIBRATION) and len(section["calibration"]["sha256"]) == 64
    assert section["max_drop"]["met"] and section["score"] >= 0.995
    assert section["accuracy_vs_fp32"]["sentence_embedding"]["embedding"]
    # every reverted node is float again, and the report says which
    for name in section["max_drop"]["reverted"]:
        assert name in section["passes"][0]["nodes"]
    weights = manifest["weights"]
    assert weights["bytes_after"] <= 0.3 * weights["bytes_before"]
