"""Execution providers: which ones this machine can run, sessions on them, and where nodes land.

onnxruntime has two kinds of execution providers. Built-in ones (CPU; CUDA and TensorRT in
onnxruntime-gpu) are named in ``InferenceSession(providers=[...])``. Plugin EPs ship as separate
packages (``onnxruntime-ep-openvino``, ``onnxruntime-qnn``): their shared library is registered
with ``onnxruntime.register_execution_provider_library``, they list the devices they can drive
(``onnxruntime.get_ep_devices()``), and a session takes them through
``SessionOptions.add_provider_for_devices``. A target's :class:`~tfgraph.targets.profile.Provider`
says which kind it is (``plugin``: the Python module whose ``get_library_path()`` gives the
library); this module hides the difference.

Placement ("which EP runs which node") comes from the real session where the EP is usable here
(``session.record_ep_graph_assignment_info``), otherwise from the target's operator table.

tfgraph writes nothing but its output. Importing this module (every ``import tfgraph`` does, before
anything imports onnxruntime) turns off what the runtimes would write elsewhere: onnxruntime's
telemetry (``ORT_DISABLE_TELEMETRY=1``, read once when onnxruntime is first imported; it wrote
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db*}`` and a ``.ses`` session
file in the temp folder) and OpenVINO's (``import openvino`` wrote ``~/intel/openvino_ga_cid`` and
``~/intel/stats`` through the ``openvino_telemetry`` package; OpenVINO falls back to its own no-op stub
when that package cannot be imported). An environment that sets ``ORT_DISABLE_TELEMETRY`` itself keeps
its value. onnxruntime's log lines are off in every session tfgraph opens (severity 4: fatal only):
a failure reaches the user as tfgraph's one-line message, from the exception, not as coloured
``[E:onnxruntime …]`` lines before it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

CPU = "CPUExecutionProvider"
#: onnxruntime log severity of every session tfgraph opens (0 verbose … 3 error, 4 fatal).
LOG_SEVERITY = 4
_registered: dict[str, str] = {}  # EP name -> library path registered in this process


def quiet_runtimes() -> None:
    """Turn off the runtimes' telemetry for this process (idempotent; see the module docstring)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    ort = sys.modules.get("onnxruntime")
    if ort is not None and os.environ["ORT_DISABLE_TELEMETRY"] == "1" and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()  # imported before tfgraph, too early for the variable: at least no events
    if "openvino_telemetry" not in sys.modules:
        # A None entry makes `import openvino_telemetry` raise ImportError: OpenVINO then uses its stub.
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


quiet_runtimes()


def _ort():
    import onnxruntime as ort

    return ort


def _register_plugin(name: str, module: str) -> str | None:
    """Register a plugin EP's library once per process; None when done, else why it cannot be."""
    if name in _registered:
        return None
    try:
        package = importlib.import_module(module)
    except ImportError:
        return f"plugin package '{module}' is not installed"
    try:
        path = package.get_library_path()
        _ort().register_execution_provider_library(name, path)
    except Exception as e:  # noqa: BLE001 - reported as the EP's unavailability
        return f"plugin '{module}' failed to register: {str(e).splitlines()[0]}"
    _registered[name] = path
    return None


def _devices(name: str) -> list:
    return [d for d in _ort().get_ep_devices() if d.ep_name == name]


def unavailable_reason(provider) -> str | None:
    """None when ``provider`` (a targets.profile.Provider) can run sessions here, else a one-line reason."""
    ort = _ort()
    if provider.plugin is None:
        if provider.name in ort.get_available_providers():
            return None
        return f"{provider.name} is not in this onnxruntime build ({ort.__version__}, {ort.get_device()})"
    why = _register_plugin(provider.name, provider.plugin)
    if why is not None:
        return why
    if not _devices(provider.name):
        return f"{provider.name} (plugin '{provider.plugin}') lists no device it can drive on this machine"
    return None


def usable(providers: Sequence) -> tuple[list, dict[str, str]]:
    """The providers that can run here (in order) and, for the others, why not."""
    ok, missing = [], {}
    for p in providers:
        why = unavailable_reason(p)
        if why is None:
            ok.append(p)
        else:
            missing[p.name] = why
    return ok, missing


def session_options(options: Mapping[str, Any] | None = None):
    """onnxruntime SessionOptions from a profile's mapping (enums given by name)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Fatal only: an error reaches the user through the exception (tfgraph's one-line message),
    # not as onnxruntime's own coloured log lines on stderr.
    so.log_severity_level = LOG_SEVERITY
    for key, value in (options or {}).items():
        if key == "graph_optimization_level" and isinstance(value, str):
            value = getattr(ort.GraphOptimizationLevel, value)
        elif key == "execution_mode" and isinstance(value, str):
            value = getattr(ort.ExecutionMode, value)
        if key == "config_entries":
            for k, v in value.items():
                so.add_session_config_entry(k, str(v))
            continue
        setattr(so, key, value)
    return so


def _session_options(options: Mapping[str, Any] | None, config: Mapping[str, str] | None = None):
    so = session_options(options)
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return so


#: Sessions of an in-memory model on the CPU EP alone share its weights (``session_weights``) instead
#: of serializing and copying them; False: embedded in the serialized model, as before issue 20.
SHARE_WEIGHTS = True
#: Sessions built by :func:`session` in this process (counted for tests and the compile report).
SESSIONS_BUILT = 0


def session(model: ir.Model | str | bytes, providers: Sequence, *, options: Mapping[str, Any] | None = None,
            config: Mapping[str, str] | None = None):
    """An onnxruntime session on ``providers`` (Provider objects; unusable ones must be filtered by
    the caller with :func:`usable`). Plugin EPs go through their devices; CPU stays the fallback.
    An ``ir.Model`` run on the CPU EP alone shares its large weights with the session
    (:class:`~tfgraph.deploy.session_weights.SharedWeights`): nothing of them is serialized or copied."""
    global SESSIONS_BUILT
    from tfgraph.ir import SerializedModel
    from tfgraph.deploy.session_weights import SharedWeights

    ort = _ort()
    providers = list(providers) or [_cpu()]
    so = _session_options(options, config)
    if any(p.plugin is not None for p in providers):
        for p in providers:
            if p.plugin is None and p.name == CPU:
                continue  # onnxruntime appends the CPU EP itself
            if p.plugin is None:
                raise ValueError(f"cannot mix built-in {p.name} with plugin EPs in one session")
            if unavailable_reason(p) is not None:
                raise RuntimeError(unavailable_reason(p))
            so.add_provider_for_devices(_devices(p.name)[:1], {k: str(v) for k, v in p.options.items()})
        plain = None
    else:
        plain = [(p.name, dict(p.options)) for p in providers]
    SESSIONS_BUILT += 1
    if isinstance(model, ir.Model) and SHARE_WEIGHTS and plain and all(name == CPU for name, _ in plain):
        with SharedWeights(model) as serialized:
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in serialized.arrays.values()]
            for name, value in zip(serialized.arrays, values):
                so.add_initializer(name, value)  # shared: the session reads the model's own arrays
            try:
                sess = ort.InferenceSession(serialized.source, so, providers=plain)
            except Exception:  # noqa: BLE001 - retried below; a real error raises there again
                # Graph optimizations that fold a weight (e.g. Cast of float16 weights) read it from the
                # model, before shared initializers are bound: give the weights to the graph itself
                # (copied once by onnxruntime, still neither serialized nor parsed).
                so = _session_options(options, config)
                so.add_external_initializers(list(serialized.arrays), values)
                sess = ort.InferenceSession(serialized.source, so, providers=plain)
        sess._tfgraph_shared_weights = values  # the session reads them: they live as long as it does
        return sess
    if isinstance(model, ir.Model):
        with SerializedModel(model) as serialized:
            return ort.InferenceSession(serialized.source, so, **({"providers": plain} if plain else {}))
    return ort.InferenceSession(model, so, **({"providers": plain} if plain else {}))


def _cpu():
    from tfgraph.providers import Provider

    return Provider(CPU)


def run(model: ir.Model, feeds: Mapping[str, Any], providers: Sequence, *, options: Mapping[str, Any] | None = None):
    sess = session(model, providers, options=options)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


@dataclasses.dataclass
class Placement:
    """Where a compiled model's nodes run: per EP counts, and the nodes that fall back to CPU."""

    source: str  # "onnxruntime session" or "op table <name> (<version>)"
    target_providers: list[str]
    nodes: dict[str, int]  # EP -> node count
    fallback: list[dict]  # {"name", "op_type", "domain", "reason"?} of nodes not on a target EP
    allowed: list[str]  # op types the profile documents as CPU fallbacks
    note: str = ""
    unverified: str = ""  # why the placement (or the outputs) were not checked by running the model

    @property
    def unexpected(self) -> list[dict]:
        return [n for n in self.fallback if op_name(n) not in self.allowed and n["op_type"] not in self.allowed]

    def to_json(self) -> dict:
        counts = collections.Counter(op_name(n) for n in self.fallback)
        return {
            "source": self.source,
            "target_providers": self.target_providers,
            "nodes": self.nodes,
            "fallback_count": len(self.fallback),
            "fallback_ops": dict(sorted(counts.items())),
            "unexpected_fallback": len(self.unexpected),
            "fallback": self.fallback[:50],
            "allowed_fallbacks": self.allowed,
            **({"note": self.note} if self.note else {}),
            **({"unverified": self.unverified} if self.unverified else {}),
        }


def op_name(node: Mapping[str, str]) -> str:
    domain = node.get("domain") or ""
    return node["op_type"] if domain in ("", "ai.onnx") else f"{domain}.{node['op_type']}"


def standalone_runtime(profile):
    """The profile's standalone runtime module when its EP cannot run here but that runtime can; else None."""
    if profile.standalone_runtime is None or not usable(p for p in profile.providers if p.name != CPU)[1]:
        return None
    module = importlib.import_module(profile.standalone_runtime)
    return module if module.unavailable_reason() is None else None


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
