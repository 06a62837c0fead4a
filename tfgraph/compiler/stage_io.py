"""Pipeline stages on disk and in use: chaining stage sessions, checking a pipeline against the
whole model, writing a pipelined artifact, partitioning a written one."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.compiler.stage_graph import _as_ir
from tfgraph.compiler.stages import Pipeline, partition


def chain(sessions: Sequence[Any], stage_inputs: Sequence[Sequence[str]], stage_outputs: Sequence[Sequence[str]],
          feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run stages one after the other on ``feeds`` (the reference for the executors)."""
    env = dict(feeds)
    for session, ins, outs in zip(sessions, stage_inputs, stage_outputs):
        env.update(zip(outs, session.run(list(outs), {k: env[k] for k in ins})))
    return {k: env[k] for k in output_names}


def verify_pipeline(pipeline: Pipeline, model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from tfgraph.compiler.verify import make_session, run

    reference = run(model, feeds, options=None)
    sessions = [make_session(s.model.SerializeToString()) for s in pipeline.stages]
    names = [o["name"] for o in pipeline.outputs]
    got = chain(sessions, [s.input_names for s in pipeline.stages], [s.output_names for s in pipeline.stages], feeds, names)
    result = {}
    for name in names:
        ref, out = reference[name], got[name]
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        err = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))) if ref.size else 0.0
        result[name] = {"max_abs": err, "max_rel": err / scale if scale else err}
    return {"outputs": result, "max_rel": max((r["max_rel"] for r in result.values()), default=0.0)}


def write_pipeline_artifact(artifact, pipeline: Pipeline, output: os.PathLike | str, *, force: bool = False) -> pathlib.Path:
    """Write a compiled artifact (the whole model) plus its stage models, atomically."""
    from tfgraph.deploy.artifact import MANIFEST_FILE, MODEL_FILE, atomic_write_dir
    from tfgraph.ir import save

    path = pathlib.Path(output)

    def write(tmp: pathlib.Path) -> None:
        files = save(artifact.model, tmp / MODEL_FILE)
        files += pipeline.write(tmp)
        for name, data in sorted(getattr(artifact, "files", {}).items()):  # tokenizer, config
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
            files.append(name)
        artifact.manifest["files"] = files
        artifact.manifest["pipeline"] = pipeline.manifest()
        (tmp / MANIFEST_FILE).write_text(json.dumps(artifact.manifest, indent=2) + "\n")

    atomic_write_dir(path, write, force=force)
    artifact.path = path
    return path


def partition_artifact(path: os.PathLike | str, stages: int, output: os.PathLike | str | None = None, *,
                       force: bool = False, **kwargs) -> Pipeline:
    """Partition a written artifact; writes the stages into ``output`` (default: in place)."""
    from tfgraph.deploy.artifact import Artifact, read_manifest

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    model = _as_ir(path)
    pipeline = partition(model, stages, **kwargs)
    write_pipeline_artifact(Artifact(model, manifest), pipeline, output or path, force=force or output is None)
    return pipeline
