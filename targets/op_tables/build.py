"""Regenerate the checked-in operator tables (``cuda.json``, ``tensorrt.json``) from the operator
lists their projects publish. A developer tool: tests and the compiler only read the JSON.

Why checked in: neither onnxruntime-gpu nor TensorRT installs on the build machines, yet target
profiles for them must say which ops they run. The published lists are the projects' own
statement of that, so the tables are transcribed from them, with the commit they came from.

Usage (from the repository root, with the venv active)::

    python targets/op_tables/build.py cuda OperatorKernels.md \\
        --commit <onnxruntime commit> --version "onnxruntime 1.25.0 (main)" [--commit-date YYYY-MM-DD]
    python targets/op_tables/build.py tensorrt operators.md \\
        --commit <onnx-tensorrt commit> --version 10.1 [--commit-date YYYY-MM-DD]

The inputs are onnxruntime's ``docs/OperatorKernels.md`` (only its "CUDAExecutionProvider"
section is read) and onnx-tensorrt's ``docs/operators.md``; take both from the same git commit you
pass as ``--commit`` (e.g. ``git show <commit>:docs/OperatorKernels.md > OperatorKernels.md``).
``-o`` picks the output folder (default: this script's folder).

JSON layout (read by ``tfgraph.targets.op_table.table_from_json``)::

    {"name", "provider", "version", "source" (URL of the list), "commit", "commit_date",
     "retrieved" (date generated), "note" (optional: provenance, caveats),
     "stated_range" (TensorRT: the list's own opset sentence),
     "version_rule" ("since_version" | "opset"), "type_names",
     "ops": {domain: {op_type: [[since, until|null, {type_param: [element types]}], ...]}},
     "not_supported": {domain: [op_type, ...]},       # TensorRT: ops listed with "N"
     "notes": {domain: {op_type: "restriction text"}}}  # TensorRT: prose restrictions

Domain ``""`` is ai.onnx. Element types are lowercase onnx-ir ``DataType`` names
(``float16``, ``int64``); sequences are ``seq(<type>)``. TensorRT's list gives one set of types per
op without saying which input it applies to; the table puts it on the op's first input (key
``"#0"``), which is the data tensor for every op in the list.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
from collections.abc import Iterator

from tfgraph.targets.op_table import ELEMENT_TYPES, normalize_type

HERE = pathlib.Path(__file__).resolve().parent

ORT_DOC_URL = "https://github.com/microsoft/onnxruntime/blob/{commit}/docs/OperatorKernels.md#cudaexecutionprovider"
TRT_DOC_URL = "https://github.com/onnx/onnx-tensorrt/blob/{commit}/docs/operators.md"

TYPE_NAMES = "lowercase onnx-ir DataType names (float, float16, bfloat16, int64, bool, ...); seq(<type>) for sequences"

# TensorRT's spelling -> ONNX element type. TensorRT's FP8 is E4M3 with bias 7 and no infinities: float8e4m3fn.
# "INF64" occurs once in the 10.1 list (ConstantOfShape) and means INT64.
TRT_TYPES = {
    "DOUBLE": "double",
    "FP32": "float",
    "FLOAT32": "float",
    "FP16": "float16",
    "FLOAT16": "float16",
    "BF16": "bfloat16",
    "BFLOAT16": "bfloat16",
    "FP8": "float8e4m3fn",
    "INT4": "int4",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "INF64": "int64",
    "BOOL": "bool",
}


def _check_type(name: str | None, context: str) -> str:
    base = name
    while base is not None and "(" in base:
        base = base[base.index("(") + 1 : -1]
    if base not in ELEMENT_TYPES:
        raise ValueError(f"{context}: unknown element type {name!r}")
    return name


# --- onnxruntime's OperatorKernels.md -----------------------------------------------------------


def _ort_section(text: str, provider: str) -> Iterator[str]:
    anchor = f'<a name="{provider.lower()}"/>'
    start = text.find(anchor)
    if start < 0:
        raise ValueError(f"no section {anchor} in the document")
    end = text.find('<a name="', start + len(anchor))
    yield from text[start : end if end >= 0 else len(text)].splitlines()


def _ort_versions(cell: str) -> tuple[int, int | None]:
    cell = cell.strip()
    if m := re.fullmatch(r"(\d+)\+", cell):
        return int(m.group(1)), None
    if m := re.fullmatch(r"\[(\d+),\s*(\d+)\]", cell):
        return int(m.group(1)), int(m.group(2))
    if re.fullmatch(r"\d+", cell):
        return int(cell), int(cell)
    raise ValueError(f"unreadable opset version cell {cell!r}")


def _ort_types(cell: str, context: str) -> dict[str, list[str]]:
    constraints: dict[str, list[str]] = {}
    for part in re.split(r"<br\s*/?>", cell):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"\*\*([^*]+)\*\*\s*=\s*(.*)", part)
        if m is None:
            raise ValueError(f"{context}: unreadable type constraint {part!r}")
        # Split on the commas between type strings, not inside seq(tensor(...)).
        types = re.findall(r"[a-z_]+\((?:[^()]|\([^()]*\))*\)", m.group(2))
        constraints[m.group(1)] = sorted({_check_type(normalize_type(t), context) for t in types})
    return constraints


def parse_ort_kernels(text: str, provider: str = "CUDAExecutionProvider") -> dict[str, dict[str, list]]:
    """{domain: {op: [[since, until, {param: [types]}], ...]}} from one provider's section."""
    ops: dict[str, dict[str, list]] = {}
    domain: str | None = None
    op: str | None = None
    for line in _ort_section(text, provider):
        if not line.startswith("|") or line.startswith(("|---", "| Op Name")):
            continue
        if m := re.match(r"\|\*\*Operator Domain:\*\* \*([^*]+)\*", line):
            domain = "" if m.group(1) == "ai.onnx" else m.group(1)
            ops.setdefault(domain, {})
            continue
        cells = line.split("|")
        if not "".join(cells).strip():
            continue  # the "| |" spacer row after each domain's block
        if len(cells) != 6:
            raise ValueError(f"unexpected row {line[:80]!r}")
        name, _, versions, types = (c.strip() for c in cells[1:5])
        if name:
            op = name
        if domain is None or op is None:
            raise ValueError(f"row before any domain/op: {line[:80]!r}")
        since, until = _ort_versions(versions)
        ops[domain].setdefault(op, []).append([since, until, _ort_types(types, f"{domain}.{op}")])
    for domain_ops in ops.values():
        for kernels in domain_ops.values():
            kernels.sort(key=lambda k: k[0], reverse=True)
    return {domain: dict(sorted(domain_ops.items())) for domain, domain_ops in ops.items()}


def build_cuda(text: str, *, commit: str, version: str, commit_date: str | None, note: str | None = None) -> dict:
    return {
        "name": "cuda",
        "provider": "CUDAExecutionProvider",
        "version": version,
        "source": ORT_DOC_URL.format(commit=commit),
        "commit": commit,
        "commit_date": commit_date,
        "retrieved": datetime.date.today().isoformat(),
        **({"note": note} if note else {}),
        "version_rule": "since_version",
        "type_names": TYPE_NAMES,
        "ops": parse_ort_kernels(text, "CUDAExecutionProvider"),
    }


# --- onnx-tensorrt's operators.md ---------------------------------------------------------------


def _trt_types(cell: str, context: str) -> list[str]:
    types = set()
    for token in cell.split(","):
        token = token.strip().upper()
        if not token:
            continue  # "FP32, FP16, BF16, |": a trailing comma in the source
        if token not in TRT_TYPES:
            raise ValueError(f"{context}: unknown TensorRT type {token!r}")
        types.add(TRT_TYPES[token])
    return sorted(types)


def parse_trt_operators(text: str) -> tuple[dict, list[str], dict[str, str], tuple[int, int], str]:
    """(supported {op: types}, not supported [op], notes {op: text}, (min, max) opset, header sentence)."""
    header = re.search(r"TensorRT [\d.]+ supports operators[^\n]*?opset (\d+) to opset (\d+)[^\n]*?\.", text)
    if header is None:
        raise ValueError("no 'TensorRT X supports operators in the inclusive range of opset A to opset B' sentence")
    opsets = (int(header.group(1)), int(header.group(2)))
    supported: dict[str, list[str]] = {}
    not_supported: list[str] = []
    notes: dict[str, str] = {}
    table = text[text.index("## Operator Support Matrix") :]
    for line in table.splitlines():
        if not line.startswith("|") or line.startswith(("|---", "| Operator ")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        cells += [""] * (4 - len(cells))
        op, flag, types, restriction = cells[:4]
        if flag.startswith("Y"):
            supported[op] = _trt_types(types, op)
            restriction = re.sub(r"\s*<br\s*/?>\s*", " ", restriction).strip()
            if restriction:
                notes[op] = restriction
        elif flag.startswith("N"):
            not_supported.append(op)
        else:
            raise ValueError(f"{op}: unreadable 'Supported' cell {flag!r}")
    return dict(sorted(supported.items())), sorted(not_supported), dict(sorted(notes.items())), opsets, header.group(0)


def build_tensorrt(text: str, *, commit: str, version: str, commit_date: str | None, note: str | None = None) -> dict:
    supported, not_supported, notes, (low, high), header = parse_trt_operators(text)
    return {
        "name": "tensorrt",
        "provider": "TensorrtExecutionProvider",
        "version": version,
        "source": TRT_DOC_URL.format(commit=commit),
        "commit": commit,
        "commit_date": commit_date,
        "retrieved": datetime.date.today().isoformat(),
        **({"note": note} if note else {}),
        "stated_range": header,
        "version_rule": "opset",
        "type_names": TYPE_NAMES + '; "#0" constrains the first input',
        "ops": {"": {op: [[low, high, {"#0": types} if types else {}]] for op, types in supported.items()}},
        "not_supported": {"": not_supported},
        "notes": {"": notes},
    }


# --- output ---------------------------------------------------------------------------------------


def dumps(doc: dict) -> str:
    """Header keys one per line, then one line per op: small, and diffs show which op changed."""
    lines = ["{"]
    body = [(key, value) for key, value in doc.items() if key not in ("ops", "not_supported", "notes")]
    for key, value in body:
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    for section in ("ops", "not_supported", "notes"):
        if section not in doc:
            continue
        lines.append(f"  {json.dumps(section)}: {{")
        domains = list(doc[section].items())
        for d_index, (domain, content) in enumerate(domains):
            d_sep = "," if d_index < len(domains) - 1 else ""
            if isinstance(content, list):
                lines.append(f"    {json.dumps(domain)}: {json.dumps(content)}{d_sep}")
                continue
            lines.append(f"    {json.dumps(domain)}: {{")
            items = list(content.items())
            for i, (op, value) in enumerate(items):
                sep = "," if i < len(items) - 1 else ""
                lines.append(f"      {json.dumps(op)}: {json.dumps(value, separators=(',', ':'))}{sep}")
            lines.append(f"    }}{d_sep}")
        lines.append("  },")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("cuda", "tensorrt"))
    parser.add_argument("markdown", type=pathlib.Path, help="OperatorKernels.md (cuda) or operators.md (tensorrt)")
    parser.add_argument("--commit", required=True, help="git commit the markdown was taken from")
    parser.add_argument("--version", required=True, help="release the commit corresponds to")
    parser.add_argument("--commit-date", default=None)
    parser.add_argument("--note", default=None, help="provenance or caveats, stored as the table's 'note'")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    text = args.markdown.read_text(encoding="utf-8")
    build = build_cuda if args.table == "cuda" else build_tensorrt
    doc = build(text, commit=args.commit, version=args.version, commit_date=args.commit_date, note=args.note)
    path = args.output / f"{args.table}.json"
    path.write_text(dumps(doc), encoding="utf-8")
    counts = {domain or "ai.onnx": len(ops) for domain, ops in doc["ops"].items()}
    print(f"{path}: {counts}, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
