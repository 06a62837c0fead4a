"""What a compile produced, in numbers a refactor must not change: for every profile and the built-in
bert-small / gpt-small (TorchScript export), the compiled graph's operator histogram, node and
parameter counts, stored bytes, fused attention, and the verification's max errors.

``python tests/_golden.py --write tests/data/golden_artifacts.json`` records them (run it when a change
is meant to change artifacts, and say so in the commit); ``tests/test_golden_artifacts.py`` compiles
again and compares. ``python tests/_golden.py --diff OLD.json NEW.json`` prints what differs."""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile

MODELS = ("bert-small", "gpt-small")
SHAPES = {"batch": 1, "sequence": 16}  # static-shape profiles (NPUs) need them; every profile gets the same
GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "golden_artifacts.json"


def summarize(artifact) -> dict:
    import onnx_ir as ir

    model, manifest = artifact.model, artifact.manifest
    ops = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}"
                              for n in ir.traversal.RecursiveGraphIterator(model.graph))
    outputs = manifest["verification"].get("outputs", {})
    return {
        "ops": dict(sorted(ops.items())),
        "nodes": sum(ops.values()),
        "params": manifest["summary"]["params_after"],
        "bytes": manifest["summary"]["bytes_after"],
        "attention": {k: manifest["attention"][k] for k in ("found", "fused", "unfused")},
        "max_abs": {name: d["max_abs"] for name, d in sorted(outputs.items())},
    }


def compile_all(targets=None) -> dict:
    import tfgraph

    names = targets or [t.name for t in tfgraph.list_targets()]
    result = {}
    for name in names:
        for model in MODELS:
            with tempfile.TemporaryDirectory() as tmp:
                artifact = tfgraph.compile(model, name, exporter="torchscript", seed=0, shapes=SHAPES,
                                           output=pathlib.Path(tmp) / "out")
                result[f"{name}/{model}"] = summarize(artifact)
    return result


def differences(old: dict, new: dict, *, error_factor: float = 4.0, error_floor: float = 1e-5) -> list[str]:
    """What differs: operator histograms exactly, max errors beyond ``error_factor`` x the old one
    (+ ``error_floor``: float rounding differs between CPUs and onnxruntime builds)."""
    found = []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            found.append(f"{key}: only in {'new' if key in new else 'old'}")
            continue
        a, b = old[key], new[key]
        if a["ops"] != b["ops"]:
            changed = {op: (a["ops"].get(op, 0), b["ops"].get(op, 0)) for op in set(a["ops"]) | set(b["ops"])
                       if a["ops"].get(op, 0) != b["ops"].get(op, 0)}
            found.append(f"{key}: operators {dict(sorted(changed.items()))} (old, new)")
        if a["attention"] != b["attention"]:
            found.append(f"{key}: attention {a['attention']} -> {b['attention']}")
        for out, err in a["max_abs"].items():
            now = b["max_abs"].get(out)
            if now is None or now > error_factor * err + error_floor:
                found.append(f"{key}: output {out} max abs error {err:.3g} -> {now}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=pathlib.Path, nargs="?", const=GOLDEN, help="compile every profile and write the summary here")
    parser.add_argument("--diff", nargs=2, type=pathlib.Path, metavar=("OLD", "NEW"))
    parser.add_argument("--targets", nargs="*")
    args = parser.parse_args(argv)
    if args.diff:
        old, new = (json.loads(p.read_text()) for p in args.diff)
        found = differences(old, new)
        print("\n".join(found) or f"same artifacts ({len(new)} compiles)")
        return 1 if found else 0
    out = args.write or GOLDEN  # --write alone: the recorded file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(compile_all(args.targets), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
