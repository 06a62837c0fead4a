#!/usr/bin/env python
"""Run compiled OpenVINO-target artifacts on a real OpenVINO execution provider: node placement
(onnxruntime's ``record_ep_graph_assignment_info``) and outputs against the fp32 source model.

The OpenVINO EP *plugin* (``onnxruntime-ep-openvino``, what the profiles name) only creates devices
for Intel hardware; on other x86 CPUs the older full build ``onnxruntime-openvino`` (onnxruntime with
the OpenVINO EP compiled in) still runs. It replaces the ``onnxruntime`` module, so it lives in its
own virtualenv; this script needs only numpy and that onnxruntime, and reads artifacts written by
``tfgraph compile`` in the main environment::

    python -m venv /tmp/ovenv && /tmp/ovenv/bin/pip install onnxruntime-openvino==1.24.1 onnx
    tfgraph compile bert-small -t openvino-fp32 -o /tmp/ov/bert-fp32 --exporter torchscript   # main env
    /tmp/ovenv/bin/python benchmarks/openvino_ep_check.py /tmp/ov/bert-fp32 [...] --reference /tmp/ov/bert.onnx

For each artifact: nodes per EP, the op types left to the CPU EP, and the max abs error / cosine of
the first output against the reference model run on the CPU EP, on generated inputs (token ids in
range, an attention mask with padding in the second row).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np


def _feeds(session, batch: int, seq: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if k == 0 else seq) for k, d in enumerate(i.shape)]
        if "mask" in i.name:
            feeds[i.name] = np.ones(shape, np.int64)
            if shape[0] > 1:
                feeds[i.name][1, shape[1] // 2:] = 0
        elif "type" in i.name:
            feeds[i.name] = np.zeros(shape, np.int64)
        else:
            feeds[i.name] = rng.integers(1, 1000, shape).astype(np.int64)
    return feeds


def check(artifact: pathlib.Path, reference: pathlib.Path, batch: int, seq: int) -> dict:
    import onnxruntime as ort

    manifest = json.loads((artifact / "manifest.json").read_text())
    provider = manifest["providers"][0]
    options = {k: str(v) for k, v in provider["options"].items() if k in ("device_type", "precision", "load_config")}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(artifact / "model.onnx"), so,
                                   providers=[("OpenVINOExecutionProvider", options), "CPUExecutionProvider"])
    nodes: collections.Counter = collections.Counter()
    cpu_ops: collections.Counter = collections.Counter()
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            nodes[subgraph.ep_name] += 1
            if subgraph.ep_name == "CPUExecutionProvider":
                cpu_ops[f"{node.domain + '.' if node.domain else ''}{node.op_type}"] += 1
    ref = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    feeds = _feeds(ref, batch, seq, 0)
    got = session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]
    want = ref.run(None, feeds)[0]
    # Positions where the mask is 0 carry no defined value (tfgraph's verification skips them too).
    mask = next((v for k, v in feeds.items() if "mask" in k), None)
    keep = (mask != 0) if mask is not None and got.shape[:2] == mask.shape else np.ones(got.shape[:2], bool)
    a, b = got[keep].astype(np.float64).ravel(), want[keep].astype(np.float64).ravel()
    return {
        "artifact": str(artifact),
        "target": manifest["target"],
        "onnxruntime": ort.__version__,
        "nodes": dict(nodes),
        "cpu_fallback_ops": dict(cpu_ops),
        "max_abs": float(np.abs(a - b).max()),
        "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=pathlib.Path)
    parser.add_argument("--reference", type=pathlib.Path, required=True, help="the fp32 source .onnx")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        print(f"openvino_ep_check: skipped: onnxruntime {ort.__version__} has no OpenVINOExecutionProvider")
        return 0
    for artifact in args.artifacts:
        print(json.dumps(check(artifact, args.reference, args.batch, args.seq)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
