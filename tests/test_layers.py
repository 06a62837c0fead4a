"""Imports point one way (ARCHITECTURE.md): front → targets → passes → bottom layer, and deploy-time
code never imports compile-time code. Checked on the source, every import statement (top-level or
inside a function), so a new dependency against the grain fails here rather than in a review."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layers follow the folders (package tfgraph.passes is passes/, tfgraph.targets is targets/):
# tfgraph/cli/ the front, tfgraph/compiler/ compile time, tfgraph/deploy/ deploy time, and the modules
# directly in tfgraph/ the bottom layer that every other layer may import.
BOTTOM = {"tfgraph.ir", "tfgraph.errors", "tfgraph.ops", "tfgraph._version", "tfgraph.analysis", "tfgraph.providers",
          "tfgraph.signature", "tfgraph.builder"}
COMPILE_PACKAGES = ("tfgraph.cli", "tfgraph.compiler", "tfgraph.targets", "tfgraph.passes")
# What no pass may import (issue 16): targets, the compiler package (calibration, pruning front, verifier,
# driver, pass manager, stages...), the CLI and deploy-time code.
PASS_FORBIDDEN = {"tfgraph.targets", "tfgraph.compiler", "tfgraph.cli", "tfgraph.deploy"}


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
        if name.startswith("tfgraph.deploy"):
            hits = _hits(_imports(path), set(COMPILE_PACKAGES))
            if hits:
                bad[name] = hits
    assert not bad, bad


def test_targets_do_not_import_the_front():
    front = {"tfgraph.compiler", "tfgraph.cli"}
    bad = {_module_name(p): _hits(_imports(p), front) for p in _sources("targets")}
    assert not {k: v for k, v in bad.items() if v}


def test_every_module_is_placed_in_a_layer():
    """Directly in tfgraph/ only the bottom layer (and the package's entry points): a new module goes
    into cli/, compiler/ or deploy/, or is added to BOTTOM here and in ARCHITECTURE.md."""
    top = {_module_name(p) for p in (ROOT / "tfgraph").glob("*.py")} - {"tfgraph", "tfgraph.__main__"}
    assert top == BOTTOM, sorted(top ^ BOTTOM)
    folders = {p.name for p in (ROOT / "tfgraph").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"cli", "compiler", "deploy"}, folders


def test_bottom_layer_imports_only_itself():
    bad = {}
    for name in BOTTOM:
        path = ROOT / "tfgraph" / (name.split(".")[1] + ".py")
        hits = sorted(i for i in _imports(path)
                      if i != "tfgraph" and not any(i == b or i.startswith(b + ".") for b in BOTTOM))
        if hits:
            bad[name] = hits
    assert not bad, bad


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
