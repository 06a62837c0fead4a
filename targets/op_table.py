"""Operator-support tables: which ops, at which opset versions and with which input element
types, an execution provider can run.

A target profile names an execution provider; a model that uses an op the provider has no kernel
for still runs under onnxruntime, but that node falls back to the CPU provider (copies across the
device boundary, CPU speed), and TensorRT rejects or partitions the graph. ``OpTable.coverage``
finds those nodes before the model is shipped.

Tables come from two kinds of source:

* ``runtime_table(provider)`` reads the installed onnxruntime's kernel registry, so it is exact for
  the runtime that will run the model (CPU here; CUDA where onnxruntime-gpu is installed).
* ``load_table(name)`` reads a checked-in table (``op_tables/<name>.json``) for providers that cannot
  be installed on the build machine: ``cuda`` (onnxruntime's published ``docs/OperatorKernels.md``)
  and ``tensorrt`` (onnx-tensorrt's ``docs/operators.md``). Each file records the commit and version
  it was generated from; ``op_tables/build.py`` regenerates them.

Element types are spelled as lowercase onnx-ir ``DataType`` names, which are also the names inside
ONNX's ``tensor(...)`` type strings: ``float``, ``float16``, ``bfloat16``, ``int64``, ``bool``.
Non-tensor types keep their ONNX wrapper with the ``tensor(...)`` removed: ``seq(float)``,
``optional(seq(int64))``. ``normalize_type`` converts any of the common spellings to that form.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from types import MappingProxyType
from typing import NamedTuple

import onnx
import onnx_ir as ir

from tfgraph.errors import BadInputError

ELEMENT_TYPES = frozenset(dt.name.lower() for dt in ir.DataType if dt is not ir.DataType.UNDEFINED)

# onnxruntime stores an open-ended kernel range ("13+") with INT_MAX as its end.
_OPEN_END = 2**31 - 1

# Domains whose op schemas (with their full version history) ship with the onnx package.
_ONNX_SCHEMA_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview.training")

_WRAPPED = re.compile(r"([a-z_]+)\((.*)\)")

# Ops no provider needs a kernel for: onnxruntime turns Constant nodes into initializers when it
# loads the graph (neither the CPU nor the CUDA registry lists Constant), and TensorRT lists it.
_LOAD_TIME_OPS = frozenset({("", "Constant")})


def normalize_domain(domain: str | None) -> str:
    """``""`` and ``"ai.onnx"`` name the same (default) domain; tables key it as ``""``."""
    return "" if domain in (None, "", "ai.onnx") else domain


def normalize_type(type_: str | ir.DataType | ir.TypeProtocol | None) -> str | None:
    """One spelling for a value type: ``"float16"``, ``"seq(float)"``; None stays None (unknown).

    Accepts onnx-ir dtypes and types, ONNX type strings (``"tensor(float16)"``), onnxruntime's
    ``seq(tensor(float))`` and enum-style names (``"FLOAT16"``).
    """
    if type_ is None:
        return None
    if isinstance(type_, ir.DataType):
        return type_.name.lower()
    if isinstance(type_, ir.TensorType):
        return type_.dtype.name.lower()
    if isinstance(type_, ir.SparseTensorType):
        return f"sparse_tensor({type_.dtype.name.lower()})"
    if isinstance(type_, ir.SequenceType):
        return f"seq({normalize_type(type_.elem_type)})"
    if isinstance(type_, ir.OptionalType):
        return f"optional({normalize_type(type_.elem_type)})"
    text = str(type_).strip().lower().replace(" ", "")
    wrapped = _WRAPPED.fullmatch(text)
    if wrapped is None:
        return text
    outer, inner = wrapped.groups()
    inner = normalize_type(inner)
    return inner if outer == "tensor" else f"{outer}({inner})"


def value_type(value: ir.Value | None) -> str | None:
    """The normalized type of a node input as the graph knows it; None when absent or unknown."""
    if value is None:
        return None
    if value.type is not None:
        return normalize_type(value.type)
    return normalize_type(value.dtype)


class Kernel(NamedTuple):
    """One kernel registration: the op versions it covers and the element types it accepts.

    ``until_version`` None means open-ended (``13+``). ``types`` maps a type parameter of the op
    schema (``"T"``), a formal input name (onnxruntime accepts either) or a position ``"#0"``
    (the node's first input) to the element types allowed there. An empty mapping means the
    source gives no type information: any types pass.
    """

    since_version: int
    until_version: int | None
    types: Mapping[str, frozenset[str]]

    def range_text(self) -> str:
        if self.until_version is None:
            return f"{self.since_version}+"
        if self.until_version == self.since_version:
            return str(self.since_version)
        return f"[{self.since_version}, {self.until_version}]"


class _Formal(NamedTuple):
    name: str
    type_str: str
    variadic: bool


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A node the table's provider cannot run, and why. ``location`` names the function or
    subgraph that holds the node ("" for the main graph)."""

    node_name: str
    op_type: str
    domain: str
    reason: str
    location: str = ""


@dataclasses.dataclass(frozen=True)
class OpTable:
    """The ops one execution provider supports, as data.

    ``entries`` maps ``(domain, op_type)`` (domain ``""`` for ai.onnx) to the kernels registered for
    it. ``version_rule`` says how a node's opset selects kernels: ``"since_version"`` is
    onnxruntime's rule (the node's schema version, the one its opset import resolves to, must be
    a kernel's first version or lie inside a closed kernel range), ``"opset"`` is a plain range
    test on the imported opset version (TensorRT's parser states opset bounds, not kernels).
    ``unsupported`` holds ops the source lists explicitly as not supported, ``notes`` the
    restrictions it states in prose (not checked: they depend on attributes and constness).
    """

    name: str
    source: str
    version: str
    entries: Mapping[tuple[str, str], tuple[Kernel, ...]]
    provider: str = ""
    version_rule: str = "since_version"
    unsupported: frozenset[tuple[str, str]] = frozenset()
    notes: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version_rule not in ("since_version", "opset"):
            raise ValueError(f"version_rule must be 'since_version' or 'opset', not {self.version_rule!r}")
        entries = {
            (normalize_domain(domain), op): tuple(
                Kernel(k[0], k[1], MappingProxyType({p: frozenset(ts) for p, ts in k[2].items()})) for k in kernels
            )
            for (domain, op), kernels in self.entries.items()
        }
        object.__setattr__(self, "entries", MappingProxyType(entries))
        object.__setattr__(self, "unsupported", frozenset((normalize_domain(d), op) for d, op in self.unsupported))
        object.__setattr__(self, "notes", MappingProxyType({(normalize_domain(d), op): n for (d, op), n in self.notes.items()}))

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(domain for domain, _ in self.entries)

    def kernels(self, domain: str, op_type: str) -> tuple[Kernel, ...]:
        return self.entries.get((normalize_domain(domain), op_type), ())

    def supports(
        self,
        domain: str,
        op_type: str,
        opset_version: int | None,
        input_types: Sequence[str | ir.DataType | None] = (),
    ) -> str | None:
        """None when the provider can run this op; otherwise a one-line reason.

        ``opset_version`` is the version the model imports for ``domain`` (None skips the version
        test); ``input_types`` are the node's input element types in order, None where unknown or
        absent. Unknown types never fail a check: the answer is only as strict as the graph's type
        information and the table's (a kernel without type constraints accepts any type).
        """
        key = (normalize_domain(domain), op_type)
        if key in _LOAD_TIME_OPS:
            return None
        label = _op_label(key)
        kernels = self.entries.get(key)
        if not kernels:
            if key in self.unsupported:
                return f"{self.name} {self.version} lists {label} as not supported"
            if key[0] not in self.domains:
                return f"{self.name} has no ops in domain '{key[0]}'"
            return f"{label} is not in the {self.name} operator list ({self.version})"

        candidates = kernels
        if opset_version is not None:
            candidates = tuple(k for k in kernels if self._version_matches(k, key, opset_version))
            if not candidates:
                ranges = ", ".join(dict.fromkeys(k.range_text() for k in sorted(kernels, key=lambda k: k.since_version)))
                if self.version_rule == "opset":
                    return f"{self.name} {self.version} takes {label} at opset {ranges}, the model imports opset {opset_version}"
                since = _schema_since_version(key[0], op_type, opset_version)
                which = (
                    f"opset {opset_version}"
                    if since in (None, opset_version)
                    else f"opset {opset_version} (schema version {since})"
                )
                return f"{label} has {self.name} kernels for versions {ranges}, none for {which}"

        types = [normalize_type(t) for t in input_types]
        if not any(types):
            return None
        formals = _formal_inputs(key[0], op_type, opset_version)
        first_mismatch = None
        for kernel in candidates:
            mismatch = _type_mismatch(kernel, types, formals)
            if mismatch is None:
                return None
            first_mismatch = first_mismatch or f"{label} ({self.name} kernel {kernel.range_text()}): {mismatch}"
        return first_mismatch

    def coverage(self, model: ir.Model) -> list[Unsupported]:
        """Every node of ``model`` the provider cannot run, main graph and subgraphs alike.

        A call to a model-local function is judged by the function's body (onnxruntime inlines
        local functions before it assigns nodes to providers); each called function is reported
        once, under ``location`` ``"function <domain>::<name>"``.
        """
        found: list[Unsupported] = []
        self._walk(model.graph, dict(model.opset_imports), model, "", found, checked=set())
        return found

    def _walk(
        self,
        graph_like: ir.Graph | ir.Function,
        opsets: Mapping[str, int],
        model: ir.Model,
        prefix: str,
        found: list[Unsupported],
        *,
        checked: set[ir.OperatorIdentifier],
    ) -> None:
        # ``checked`` holds the functions already walked: each body is reported once, and a
        # (malformed) recursive function cannot loop.
        top = graph_like if isinstance(graph_like, ir.Graph) else graph_like.graph
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            location = prefix
            if node.graph is not None and node.graph is not top:
                inner = f"subgraph {node.graph.name or '?'}"
                location = f"{prefix}/{inner}" if prefix else inner
            function_id = (node.domain, node.op_type, node.overload)
            function = model.functions.get(function_id)
            if function is not None:
                if function_id not in checked:
                    checked.add(function_id)
                    # A function body resolves ops by its own imports; the model's fill the gaps.
                    body_opsets = {**opsets, **function.opset_imports}
                    name = f"function {function.domain}::{function.name}"
                    self._walk(function, body_opsets, model, name, found, checked=checked)
                continue
            domain = normalize_domain(node.domain)
            version = node.version if node.version is not None else _imported_version(opsets, domain)
            reason = self.supports(domain, node.op_type, version, [value_type(v) for v in node.inputs])
            if reason is not None:
                found.append(Unsupported(node.name or "", node.op_type, domain, reason, location))

    def _version_matches(self, kernel: Kernel, key: tuple[str, str], opset_version: int) -> bool:
        if self.version_rule == "since_version":
            since = _schema_since_version(key[0], key[1], opset_version)
            if since is not None:
                # onnxruntime's KernelRegistry::VerifyKernelDef: an open-ended kernel serves only the
                # schema version it starts at, so a newer schema version needs a newer kernel.
                return kernel.since_version == since or (
                    kernel.since_version < since and kernel.until_version is not None and kernel.until_version >= since
                )
            # Schema unknown here (e.g. onnxruntime's own pre-opset-17 LayerNormalization): use the range.
        return kernel.since_version <= opset_version and (kernel.until_version is None or opset_version <= kernel.until_version)


def _op_label(key: tuple[str, str]) -> str:
    domain, op_type = key
    return f"{domain}.{op_type}" if domain else op_type


def _imported_version(opsets: Mapping[str, int], domain: str) -> int | None:
    if domain in opsets:
        return opsets[domain]
    if domain == "" and "ai.onnx" in opsets:
        return opsets["ai.onnx"]
    return None


def _binds(param: str, index: int, formals: Sequence[_Formal]) -> bool:
    if param == f"#{index}":
        return True
    if index < len(formals):
        formal = formals[index]
    elif formals and formals[-1].variadic:
        formal = formals[-1]
    else:
        return False
    return param in (formal.type_str, formal.name)


def _type_mismatch(kernel: Kernel, types: Sequence[str | None], formals: Sequence[_Formal]) -> str | None:
    for param, allowed in kernel.types.items():
        for index, type_ in enumerate(types):
            if type_ is None or type_ in allowed or not _binds(param, index, formals):
                continue
            where = f"input {index}" + (f" ({formals[index].name})" if index < len(formals) else "")
            return f"{where} is {type_}, {param} allows {', '.join(sorted(allowed))}"
    return None


@functools.lru_cache(maxsize=4096)
def _onnx_schema(domain: str, op_type: str, opset_version: int | None):
    if domain not in _ONNX_SCHEMA_DOMAINS:
        return None
    try:
        if opset_version is None:
            return onnx.defs.get_schema(op_type, domain)
        return onnx.defs.get_schema(op_type, opset_version, domain)
    except onnx.defs.SchemaError:
        return None


@functools.lru_cache(maxsize=1)
def _runtime_schemas() -> Mapping[tuple[str, str], tuple[int, tuple[_Formal, ...]]]:
    """onnxruntime's registered schemas (latest version of each): the only place the schemas of
    its contrib domains (com.microsoft, ...) are available from Python."""
    from onnxruntime.capi import _pybind_state as C

    variadic = C.schemadef.OpSchema.FormalParameterOption.Variadic
    return {
        (schema.domain, schema.name): (
            schema.since_version,
            tuple(_Formal(p.name, p.typeStr, p.option == variadic) for p in schema.inputs),
        )
        for schema in C.get_all_operator_schema()
    }


def _schema_since_version(domain: str, op_type: str, opset_version: int) -> int | None:
    schema = _onnx_schema(domain, op_type, opset_version)
    if schema is not None:
        return schema.since_version
    if domain in _ONNX_SCHEMA_DOMAINS:
        return None
    runtime = _runtime_schemas().get((domain, op_type))
    if runtime is not None and runtime[0] <= opset_version:
        return runtime[0]
    return None


@functools.lru_cache(maxsize=4096)
def _formal_inputs(domain: str, op_type: str, opset_version: int | None) -> tuple[_Formal, ...]:
    """The schema's formal inputs, which bind node inputs to type parameters."""
    schema = _onnx_schema(domain, op_type, opset_version)
    if schema is not None:
        variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
        return tuple(_Formal(p.name, p.type_str, p.option == variadic) for p in schema.inputs)
    runtime = _runtime_schemas().get((domain, op_type))
    return runtime[1] if runtime is not None else ()


# --- checked-in tables ---------------------------------------------------------------------------


def table_names() -> list[str]:
    """Names ``load_table`` accepts: the JSON files shipped in ``op_tables/``."""
    folder = resources.files("tfgraph.targets.op_tables")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


@functools.cache
def load_table(name: str) -> OpTable:
    """A checked-in table by name (``cuda``, ``tensorrt``)."""
    resource = resources.files("tfgraph.targets.op_tables") / f"{name}.json"
    if not resource.is_file():
        raise BadInputError(f"no operator table named '{name}'; available: {', '.join(table_names())}")
    return table_from_json(json.loads(resource.read_text(encoding="utf-8")))


def table_from_json(doc: Mapping) -> OpTable:
    """An ``OpTable`` from the JSON layout ``op_tables/build.py`` writes (see its docstring)."""
    entries = {
        (domain, op): [(k[0], k[1], k[2]) for k in kernels] for domain, ops in doc["ops"].items() for op, kernels in ops.items()
    }
    unsupported = {(domain, op) for domain, ops in doc.get("not_supported", {}).items() for op in ops}
    notes = {(domain, op): text for domain, ops in doc.get("notes", {}).items() for op, text in ops.items()}
    return OpTable(
        name=doc["name"],
        source=doc["source"],
        version=doc["version"],
        entries=entries,
        provider=doc.get("provider", ""),
        version_rule=doc.get("version_rule", "since_version"),
        unsupported=frozenset(unsupported),
        notes=notes,
    )


# --- the installed runtime -----------------------------------------------------------------------


@functools.cache
def runtime_table(provider: str) -> OpTable:
    """The kernels the installed onnxruntime registers for ``provider`` ("CPUExecutionProvider",
    "CUDAExecutionProvider" with onnxruntime-gpu). Each registration stays a separate kernel, so a
    multi-parameter kernel's type combination is kept exactly.

    The table states kernels, not everything a session accepts: on the CPU provider, onnxruntime
    runs a float16 node that has only a float kernel by inserting Casts around it, so "float16
    not supported" there means "computed in float32 behind Casts" rather than a load failure.
    """
    import onnxruntime
    from onnxruntime.capi import _pybind_state as C

    defs = C.get_all_opkernel_def()
    kernels: dict[tuple[str, str], list[Kernel]] = {}
    seen: set = set()
    for kernel_def in defs:
        if kernel_def.provider != provider:
            continue
        start, end = kernel_def.version_range
        until = None if end >= _OPEN_END else end
        types = {param: frozenset(normalize_type(t) for t in allowed) for param, allowed in kernel_def.type_constraints.items()}
        key = (normalize_domain(kernel_def.domain), kernel_def.op_name)
        # The registry lists some kernels more than once (e.g. per internal memory layout).
        identity = (key, start, until, frozenset(types.items()))
        if identity not in seen:
            seen.add(identity)
            kernels.setdefault(key, []).append(Kernel(start, until, types))
    if not kernels:
        registered = sorted({d.provider for d in defs})
        raise BadInputError(
            f"onnxruntime {onnxruntime.__version__} registers no kernels for {provider}; registered: {', '.join(registered)}"
        )
    return OpTable(
        name=provider,
        source=f"onnxruntime {onnxruntime.__version__} kernel registry",
        version=onnxruntime.__version__,
        entries={key: tuple(found) for key, found in kernels.items()},
        provider=provider,
    )


def op_counts(table: OpTable) -> dict[str, int]:
    """Number of ops per domain (``""`` is ai.onnx), for reports and tests."""
    counts: dict[str, int] = {}
    for domain, _ in table.entries:
        counts[domain] = counts.get(domain, 0) + 1
    return dict(sorted(counts.items()))


__all__ = [
    "ELEMENT_TYPES",
    "Kernel",
    "OpTable",
    "Unsupported",
    "load_table",
    "normalize_domain",
    "normalize_type",
    "op_counts",
    "runtime_table",
    "table_from_json",
    "table_names",
    "value_type",
]
