"""The target profile: what a target is, as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tfgraph.errors import BadInputError
from tfgraph.passes.registry import PassSpec, create_pass, get_pass_class, option_types
from tfgraph.providers import Provider  # noqa: F401 - part of a target's data; defined in the bottom layer


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Outputs match when ``|actual - expected| <= atol + rtol * |expected|`` element-wise."""

    atol: float
    rtol: float

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a target wants integers placed, as data the quantization passes read (``passes/quantize.py``).

    ``mode``: ``"dynamic"`` (weights quantized offline, activations at run time by the kernel:
    onnxruntime's DynamicQuantizeMatMul / QAttention) or ``"static"`` (QuantizeLinear/DequantizeLinear
    pairs with calibrated activation ranges, for runtimes that fuse QDQ into integer kernels).
    ``placement``: op type -> the input indices that carry Q/DQ (weights and activations alike);
    ``weight_axes``: op type -> {input index: per-channel axis} for constant weights;
    ``exclude_ops``: op types never quantized even if a placement names them (sensitive ops);
    ``activation_type`` / ``weight_type``: ``uint8``, ``int8`` or ``uint16``;
    ``activation_symmetric`` / ``weight_symmetric``: zero point fixed at the type's middle (0 for
    signed) or calibrated; ``calibrator``: ``minmax``, ``percentile`` or ``entropy`` (static mode).
    """

    mode: str
    activation_type: str
    weight_type: str
    activation_symmetric: bool
    weight_symmetric: bool
    per_channel: bool
    placement: Mapping[str, tuple[int, ...]]
    weight_axes: Mapping[str, Mapping[int, int]] = dataclasses.field(default_factory=dict)
    exclude_ops: tuple[str, ...] = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "Add")
    calibrator: str = "minmax"
    reason: str = ""
    # Weights use one bit less (int8: [-64, 63]): u8 x s8 pair products then cannot saturate the
    # int16 accumulator of AVX2/AVX-512 kernels without VNNI (VPMADDUBSW).
    reduce_range: bool = False
    # What the max-drop loop reverts a harmful node to: float compute with its weights stored in
    # float16 behind a Cast (True: keeps the artifact small), or plain float32 (False).
    revert_weights_float16: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement", _freeze({k: tuple(v) for k, v in self.placement.items()}))
        object.__setattr__(self, "weight_axes", _freeze({k: _freeze(v) for k, v in self.weight_axes.items()}))
        object.__setattr__(self, "exclude_ops", tuple(self.exclude_ops))

    def to_options(self) -> dict:
        """The options of the quantization pass that implements this scheme."""
        return {
            "mode": self.mode,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "activation_symmetric": self.activation_symmetric,
            "weight_symmetric": self.weight_symmetric,
            "per_channel": self.per_channel,
            "placement": {k: list(v) for k, v in self.placement.items()},
            "weight_axes": {k: {str(i): a for i, a in v.items()} for k, v in self.weight_axes.items()},
            "exclude_ops": list(self.exclude_ops),
            "calibrator": self.calibrator,
            "reduce_range": self.reduce_range,
        }

    def to_json(self) -> dict:
        return {**self.to_options(), "revert_weights_float16": self.revert_weights_float16, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Phase:
    """A named, ordered group of passes in a target's pipeline (``normalize``, ``fuse``, ``lower``,
    ``precision``, ``finalize``...). The compile driver runs a target's phases in order; verification
    reports which phase (and pass) broke the outputs, and the manifest records each pass's phase.
    Adding, removing or reordering phases is a change to the profile, not to the driver."""

    name: str
    passes: tuple[PassSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(dataclasses.replace(p, phase=self.name) for p in self.passes))

    def to_json(self) -> dict:
        return {"name": self.name, "passes": [p.to_json() for p in self.passes]}


def phases(**named: tuple[PassSpec, ...]) -> tuple[Phase, ...]:
    """``phases(normalize=CLEANUP, fuse=FUSION, lower=...)``: phases in the order given."""
    return tuple(Phase(name, tuple(passes)) for name, passes in named.items())


@dataclasses.dataclass(frozen=True)
class Target:
    """A frozen, data-like compilation profile.

    Everything that differs between targets lives in these fields; code outside
    ``targets/`` reads them and never branches on a target's name.
    """

    name: str
    description: str
    providers: tuple[Provider, ...]
    precision: str
    phases: tuple[Phase, ...]
    tolerance: Tolerance
    # onnxruntime SessionOptions attributes the artifact is loaded with (graph_optimization_level by enum name).
    session_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Reduced precision (additive): the integer scheme of an int8 target, and the accuracy budget its
    # verification uses instead of ``tolerance`` (cosine of each output to the fp32 model).
    quantization: Quantization | None = None
    min_cosine: float | None = None
    # What the execution provider runs: a checked-in operator table (targets/op_tables/<name>.json,
    # for EPs not installable here) or None: the installed runtime's kernel registry of the first
    # provider. Used for the placement report when the EP cannot run here.
    op_table: str | None = None
    # Op types (``domain.op`` outside ai.onnx) the EP is known to leave to the CPU EP; the placement
    # report counts any other fallback as unexpected (``--strict`` fails on it).
    allowed_fallbacks: tuple[str, ...] = ()
    # Every input dimension must be fixed at compile time (``--shape``); the pipeline then folds
    # all shape computation away (NPU compilers take static graphs only).
    static_shapes: bool = False
    # ai.onnx opset versions the EP takes (inclusive); the compiled model must import one of them.
    opset: tuple[int, int] = (17, 25)
    # How attention ends up on this target, in words (the passes carry the exact options).
    attention: str = ""
    # Where the profile's EP cannot run here but its runtime can (OpenVINO's plugin EP claims Intel
    # CPUs only; plain OpenVINO runs on any x86): a module with ``unavailable_reason()``,
    # ``run(model, feeds, target)`` and ``placement(model, target)``, used for the final verification
    # and the placement report instead of onnxruntime's CPU EP and the op table.
    standalone_runtime: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "phases", tuple(self.phases))
        names = [ph.name for ph in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"target {self.name!r}: phase names repeat: {names}")
        object.__setattr__(self, "session_options", _freeze(self.session_options))
        object.__setattr__(self, "allowed_fallbacks", tuple(self.allowed_fallbacks))
        object.__setattr__(self, "opset", tuple(self.opset))

    @property
    def passes(self) -> tuple[PassSpec, ...]:
        """The whole pipeline, phase after phase (each spec carries its ``phase``)."""
        return tuple(spec for phase in self.phases for spec in phase.passes)

    def map_passes(self, change, **fields) -> Target:
        """A copy whose every pass spec is ``change(spec)`` (a spec, a tuple of specs, or None to drop
        it), phases kept; ``fields`` replace other fields (e.g. ``name``)."""
        def mapped(spec):
            out = change(spec)
            return () if out is None else (out,) if isinstance(out, PassSpec) else tuple(out)

        new = tuple(Phase(ph.name, tuple(s for spec in ph.passes for s in mapped(spec))) for ph in self.phases)
        return dataclasses.replace(self, phases=new, **fields)

    def with_pass_options(self, overrides: Mapping[str, Mapping[str, Any]]) -> Target:
        """A copy with options of its own passes changed (``{"gptq": {"act_order": True}}``: every gptq
        spec of the pipeline); a pass the pipeline lacks or an option the pass does not declare is bad
        input, refused before anything runs (values are checked when the pass is created)."""
        present = {spec.name for spec in self.passes}
        for name, options in overrides.items():
            if name not in present:
                raise BadInputError(f"--set {name}: target '{self.name}' runs no pass '{name}'; its passes: "
                                    f"{', '.join(sorted(present))}")
            declared = option_types(get_pass_class(name))
            unknown = sorted(set(options) - set(declared))
            if unknown:
                raise BadInputError(f"--set {name}: unknown option(s) {', '.join(unknown)}; '{name}' takes "
                                    f"{', '.join(sorted(declared)) or 'no options'}")

        def change(spec: PassSpec) -> PassSpec:
            if spec.name not in overrides:
                return spec
            changed = dataclasses.replace(spec, options={**spec.options, **overrides[spec.name]})
            try:
                create_pass(changed.name, **changed.options)  # types and the pass's own range checks, now
            except BadInputError as e:
                raise BadInputError(f"--set {spec.name}: {e}") from None
            return changed

        return self.map_passes(change)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "providers": [p.to_json() for p in self.providers],
            "precision": self.precision,
            "phases": [ph.to_json() for ph in self.phases],
            "tolerance": self.tolerance.to_json(),
            "session_options": dict(self.session_options),
            **({"quantization": self.quantization.to_json()} if self.quantization is not None else {}),
            **({"min_cosine": self.min_cosine} if self.min_cosine is not None else {}),
            "op_table": self.op_table or f"runtime kernel registry ({self.providers[0].name})",
            "allowed_fallbacks": list(self.allowed_fallbacks),
            "static_shapes": self.static_shapes,
            "opset": list(self.opset),
            "attention": self.attention,
            **({"standalone_runtime": self.standalone_runtime} if self.standalone_runtime else {}),
        }
