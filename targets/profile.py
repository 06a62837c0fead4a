"""The target profile: what a target is, as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tfgraph.passes.registry import PassSpec


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True)
class Provider:
    """An onnxruntime execution provider with its options."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _freeze(self.options))

    def to_json(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Outputs match when ``|actual - expected| <= atol + rtol * |expected|`` element-wise."""

    atol: float
    rtol: float

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


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
    passes: tuple[PassSpec, ...]
    tolerance: Tolerance
    # onnxruntime SessionOptions attributes the artifact is loaded with (graph_optimization_level by enum name).
    session_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "session_options", _freeze(self.session_options))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "providers": [p.to_json() for p in self.providers],
            "precision": self.precision,
            "passes": [p.to_json() for p in self.passes],
            "tolerance": self.tolerance.to_json(),
            "session_options": dict(self.session_options),
        }
