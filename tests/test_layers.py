"""Imports point one way (ARCHITECTURE.md): front → targets → passes → bottom layer, and deploy-time
code never imports compile-time code. Checked on the source, every import statement (top-level or
inside a function), so a new dependency against the grain fails here rather than in a review."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Modules under tfgraph/ by layer (package tfgraph.passes is passes/, tfgraph.targets is targets/).
BOTTOM = {"tfgraph.ir", "tfgraph.errors", "tfgraph.ops", "tfgraph._version", "tfgraph.analysis", "tfgraph.providers",
          "tfgraph.signature"}
DEPLOY = {"tfgraph.artifact", "tfgraph.runtime", "tfgraph.executor", "tfgraph.serve", "tfgraph.serve_limits",
          "tfgraph.text", "tfgraph.generate", "tfgraph.triton", "tfgraph.kv_layout", "tfgraph.availability"}
COMPILE = {"tfgraph.compiler", "tfgraph.phases", "tfgraph.options", "tfgraph.sources", "tfgraph.precision_phase",
           "tfgraph.input_checks", "tfgraph.hf_files", "tfgraph.pass_context", "tfgraph.passmanager",
           "tfgraph.instruments", "tfgraph.verify", "tfgraph.calibration", "tfgraph.precision", "tfgraph.prune",
           "tfgraph.decoder", "tfgraph.export", "tfgraph.stages", "tfgraph.stage_graph", "tfgraph.stage_io",
           "tfgraph.selftest", "tfgraph.placement", "tfgraph.rebaseline", "tfgraph.genai_config", "tfgraph.cli", "tfgraph.cli_common", "tfgraph.cli_info", "tfgraph.cli_summary",
           "tfgraph.pipeline_cli", "tfgraph.generate_cli", "tfgraph.targets", "tfgraph.passes"}
# What no pass may import (issue 16): targets, calibration, pruning front, verifier, driver, CLI, stages, run-time.
PASS_FORBIDDEN = {"tfgraph.targets", "tfgraph.calibration", "tfgraph.prune", "tfgraph.verify", "tfgraph.compiler",
                  "tfgraph.phases", "tfgraph.cli", "tfgraph.stages", "tfgraph.executor", "tfgraph.serve",
                  "tfgraph.precision_phase", "tfgraph.pass_context", "tfgraph.passmanager", "tfgraph.instruments"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "targets", "models"):
        parts = ["tfgraph", *parts]
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("tfgraph")}


def _hits(imported: set[str], forbidden: set[str]) -> list[str]:
    return sorted(name for name in imported for bad in forbidden if name == bad or name.startswith(bad + "."))


def _sources(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def test_passes_import_only_the_bottom_layer():
    bad = {}
    for path in _sources("passes"):
        hits = _hits(_imports(path), PASS_FORBIDDEN)
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_deploy_time_code_does_not_import_compile_time_code():
    bad = {}
    for path in _sources("tfgraph"):
        name = _module_name(path)
        if name in DEPLOY:
            hits = _hits(_imports(path), COMPILE)
            if hits:
                bad[name] = hits
    assert not bad, bad


def test_targets_do_not_import_the_front():
    front = {"tfgraph.compiler", "tfgraph.phases", "tfgraph.cli", "tfgraph.pipeline_cli", "tfgraph.options"}
    bad = {_module_name(p): _hits(_imports(p), front) for p in _sources("targets")}
    assert not {k: v for k, v in bad.items() if v}


def test_every_module_is_placed_in_a_layer():
    """A new module under tfgraph/ must be given a layer here (and in ARCHITECTURE.md)."""
    names = {_module_name(p) for p in _sources("tfgraph")} - {"tfgraph", "tfgraph.__main__"}
    assert not names - BOTTOM - DEPLOY - COMPILE, sorted(names - BOTTOM - DEPLOY - COMPILE)


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for folder in ("tfgraph", "passes", "targets")
            for p in _sources(folder) if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_passes_register_lazily_and_the_table_is_complete():
    """``import tfgraph`` imports no pass module; the name → module table matches what importing every
    module under passes/ registers (a new pass must be added to it)."""
    import subprocess
    import sys

    script = (
        "import sys, importlib, pkgutil, tfgraph\n"
        "before = sorted(m for m in sys.modules if m.startswith('tfgraph.passes.') and m.split('.')[-1] not in "
        "('registry', 'context', 'rules'))\n"
        "import tfgraph.passes as p\n"
        "from tfgraph.passes.registry import _PASSES\n"
        "for info in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('tfgraph.passes.' + info.name)\n"
        "table = {n: c.__module__.rsplit('.', 1)[1] for n, c in _PASSES.items()}\n"
        "print(before)\nprint(table == p.BUILTIN_PASSES, sorted(set(table.items()) ^ set(p.BUILTIN_PASSES.items())))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]", out[0]
    assert out[1].startswith("True"), out[1]
