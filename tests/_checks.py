"""Checks that do not take a compile's word for it.

``tfgraph.compile`` raises when its own verification fails, so asserting
``manifest["verification"]["passed"]`` afterwards checks nothing. :func:`assert_matches_source`
recomputes instead: it runs the input model and the compiled model on onnxruntime directly, on
fresh inputs (another seed than the compile's, other sizes where asked), and compares them
within the target's tolerance.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort


def _session(model) -> ort.InferenceSession:
    import onnx_ir as ir

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _as_ir(model):
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(str(model))


def assert_matches_source(artifact, source, *, seed: int = 101, shapes=None, feeds=None,
                          atol: float | None = None, rtol: float | None = None) -> dict[str, float]:
    """Max abs error per output of the compiled model against ``source`` (a path, ``onnx.ModelProto``
    or ``onnx_ir.Model``) on inputs the compile never saw; fails beyond the target's tolerance (or
    ``atol``/``rtol``). Positions a 0 in an attention mask pads are not compared (they carry no
    defined value). Returns the errors so a test can also assert on them."""
    import json

    from tfgraph.compiler.verify import generate_inputs, padded_positions

    if isinstance(artifact, (str, os.PathLike)):  # an artifact folder
        folder = pathlib.Path(artifact)
        artifact = type("Written", (), {"path": folder, "manifest": json.loads((folder / "manifest.json").read_text())})()
    if feeds is None:
        feeds = generate_inputs(_as_ir(source), shapes, seed=seed)
    expected = _session(source)
    names = [o.name for o in expected.get_outputs()]
    want = dict(zip(names, expected.run(names, feeds)))
    compiled = artifact.path / "model.onnx" if getattr(artifact, "path", None) else artifact.model
    got_session = _session(compiled if not isinstance(compiled, (str, os.PathLike)) else pathlib.Path(compiled))
    got = dict(zip(names, got_session.run(names, feeds)))
    verification = artifact.manifest["verification"]
    atol = verification.get("atol", 1e-4) if atol is None else atol
    rtol = verification.get("rtol", 1e-4) if rtol is None else rtol
    padded = padded_positions(feeds)
    errors = {}
    for name in names:
        a, b = np.asarray(want[name], np.float64), np.asarray(got[name], np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        keep = np.ones(a.shape, bool)
        if padded is not None and a.ndim >= 2 and a.shape[:2] == padded.shape:
            keep = np.broadcast_to((~padded).reshape(padded.shape + (1,) * (a.ndim - 2)), a.shape)
        diff = np.abs(a - b)[keep]
        errors[name] = float(diff.max()) if diff.size else 0.0
        bound = (atol + rtol * np.abs(a))[keep]
        assert np.all(diff <= bound), f"output '{name}': max abs error {errors[name]:.3g} beyond atol {atol} rtol {rtol}"
    return errors
