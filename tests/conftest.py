"""Shared fixtures: small ONNX models built directly, and an in-process CLI runner."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tfgraph.cli.main import main


def _install_export_cache() -> None:
    """Exports made once per test session: every ``tfgraph.compiler.export.export`` call (tests, and compiles of
    built-in names or Hugging Face folders) with the same model, settings and torch/transformers
    versions copies the first export instead of running the exporter again (7-16 s each with dynamo).
    Set TFGRAPH_TEST_EXPORT_CACHE to a folder to keep the cache across sessions."""
    import atexit
    import hashlib
    import json
    import os
    import shutil
    import tempfile

    from tfgraph.compiler import export as export_module

    if getattr(export_module.export, "tfgraph_test_cache", False):
        return  # this file is imported twice (as conftest and as tests.conftest): wrap once
    real = export_module.export
    keep = os.environ.get("TFGRAPH_TEST_EXPORT_CACHE")
    root = pathlib.Path(keep) if keep else pathlib.Path(tempfile.mkdtemp(prefix="tfgraph-test-exports-"))
    root.mkdir(parents=True, exist_ok=True)
    if not keep:
        atexit.register(shutil.rmtree, root, True)

    def versions() -> str:
        import importlib.metadata as md

        found = []
        for name in ("torch", "transformers", "onnx", "onnxscript"):
            try:
                found.append(f"{name}={md.version(name)}")
            except md.PackageNotFoundError:
                found.append(f"{name}=none")
        return ",".join(found)

    def source_key(model) -> str | None:
        path = pathlib.Path(model)
        if path.is_dir():
            digest = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(file.relative_to(path)).encode())
                digest.update(hashlib.sha256(file.read_bytes()).digest())
            return "dir:" + digest.hexdigest()
        return None if path.exists() else f"builtin:{model}"

    def cached_export(model, output, **kwargs):
        key_source = source_key(model)
        if key_source is None:
            return real(model, output, **kwargs)
        key = hashlib.sha256(json.dumps([key_source, sorted(kwargs.items()), versions()], default=str).encode()).hexdigest()[:24]
        entry = root / key
        cached = entry / "model.onnx"
        if not cached.is_file():
            tmp = pathlib.Path(tempfile.mkdtemp(dir=root))
            result = real(model, tmp / "model.onnx", **kwargs)
            if sorted(p.name for p in tmp.iterdir()) != ["model.onnx"]:  # external data: not cached
                shutil.rmtree(tmp, ignore_errors=True)
                return real(model, output, **kwargs)
            del result
            os.replace(tmp, entry) if not entry.exists() else shutil.rmtree(tmp, ignore_errors=True)
        output = pathlib.Path(output)
        shutil.copyfile(cached, output)
        return output

    cached_export.__wrapped__ = real  # tests of the exporter itself call the real one
    cached_export.tfgraph_test_cache = True
    export_module.export = cached_export


_install_export_cache()


def make_mlp(*, opset: int = 18, hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, hidden] → Identity → MatMul(W1)+b1 → Relu → MatMul(W2) → y, with a dead branch,
    a duplicated MatMul and a Constant, so every cleanup pass has something to do."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((hidden, 2 * hidden)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((2 * hidden, hidden)).astype(np.float32) * 0.1, "W2")
    b1 = numpy_helper.from_array(rng.standard_normal(2 * hidden).astype(np.float32), "b1")
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("MatMul", ["xi", "W1"], ["h0"]),
        helper.make_node("MatMul", ["xi", "W1"], ["h0_dup"]),
        helper.make_node("Sub", ["h0", "h0_dup"], ["zero"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Add", ["h1", "zero"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((hidden,), 0.5, np.float32))),
        helper.make_node("Add", ["h4", "c"], ["y"]),
        helper.make_node("Sigmoid", ["h3"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [w1, w2, b1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tfgraph-tests")
    model.ir_version = 10
    return model


@pytest.fixture
def mlp_path(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), path)
    return path


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``cli("compile", path, "-o", out)`` → CliResult."""

    def run(*args) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session", autouse=True)
def validate_every_manifest():
    """Every artifact any test writes has its manifest checked against tfgraph/deploy/manifest.schema.json."""
    jsonschema = pytest.importorskip("jsonschema")
    import json

    from tfgraph.deploy import artifact

    validator = jsonschema.Draft202012Validator(json.loads(artifact.MANIFEST_SCHEMA.read_text()))
    real = artifact.atomic_write_dir
    validated: list[pathlib.Path] = []

    def checked(path, write, *, force):
        real(path, write, force=force)
        manifest = pathlib.Path(path) / artifact.MANIFEST_FILE
        if manifest.is_file():
            errors = sorted(validator.iter_errors(json.loads(manifest.read_text())), key=lambda e: list(e.path))
            assert not errors, f"{manifest}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
            validated.append(manifest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact, "atomic_write_dir", checked)
        yield validated


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """``onnx_export(model, exporter, attention=None)``: the ``.onnx`` of a built-in model (``bert-small``…) or a
    tiny Hugging Face kind (``tfgraph.models.hf_configs``), exported once per test session and shared by every
    test module that asks for the same (model, exporter, attention): the dynamo exporter takes 7-16 s a model."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple, pathlib.Path] = {}

    def get(model: str, exporter: str, attention: str | None = None) -> pathlib.Path:
        key = (model, exporter, attention)
        if key not in cache:
            from tfgraph.compiler.export import export
            from tfgraph.models import list_models

            source = model
            if model not in list_models():
                from tfgraph.models.hf_configs import make_hf_checkpoint

                folder = root / "hf" / model
                source = folder if (folder / "config.json").is_file() else make_hf_checkpoint(model, folder)
            cache[key] = export(source, root / f"{model}-{exporter}-{attention or 'default'}.onnx", exporter=exporter,
                                attention=attention)
        return cache[key]

    return get


# The fast lane is `pytest -m "not slow"`: hand-built graphs and the built-in tiny models. These modules
# export real or Hugging Face models across exporters, build a wheel, or start Ray / servers, and run in
# the full suite (the README's test command and CI).
SLOW_MODULES = frozenset({
    "test_gpu_lowering.py", "test_compile_models.py", "test_fusion_models.py", "test_precision_minilm.py",
    "test_wheel.py", "test_hf_attention.py", "test_int4.py", "test_windowed_attention.py", "test_decoder_compile.py",
    "test_generate.py", "test_serve_hostile.py", "test_block_sparse.py",
})
SLOW_TESTS = frozenset({"test_ray_executor_two_nodes_on_loopback", "test_a_window_blind_lowering_fails"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
