"""Name → pass class registry, and :class:`PassSpec`, a pass named with its options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, TypeVar

import onnx_ir as ir

from tfgraph.errors import BadInputError

_PASSES: dict[str, type[ir.passes.PassBase]] = {}

P = TypeVar("P", bound=type)


def register_pass(name: str, *, replace: bool = False) -> Callable[[P], P]:
    """Class decorator: make a pass available to targets, ``compile(extra_passes=...)`` and ``--pass``."""

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
            raise TypeError(f"{cls!r} must subclass onnx_ir.passes.PassBase (e.g. onnx_ir.passes.InPlacePass)")
        if name in _PASSES and _PASSES[name] is not cls and not replace:
            raise ValueError(f"a pass named '{name}' is already registered ({_PASSES[name].__qualname__})")
        _PASSES[name] = cls
        cls.pass_name = name
        return cls

    return decorate


def available_passes() -> list[str]:
    return sorted(_PASSES)


def get_pass_class(name: str) -> type[ir.passes.PassBase]:
    try:
        return _PASSES[name]
    except KeyError:
        raise BadInputError(f"unknown pass '{name}'; registered passes: {', '.join(available_passes())}") from None


def create_pass(name: str, **options: Any) -> ir.passes.PassBase:
    cls = get_pass_class(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise BadInputError(f"bad options for pass '{name}': {e}") from None


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A pass by registered name plus its keyword options: the data a target's pipeline is made of."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def create(self) -> ir.passes.PassBase:
        return create_pass(self.name, **self.options)

    def to_json(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def parse(cls, text: str) -> PassSpec:
        """Parse ``name`` or ``name:key=value,key=value`` (values parsed as int, float, bool or str)."""
        name, _, rest = text.partition(":")
        options: dict[str, Any] = {}
        if rest:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                if not eq or not key:
                    raise BadInputError(f"bad pass option '{item}' in '{text}'; expected key=value")
                options[key.strip()] = _parse_value(value.strip())
        return cls(name.strip(), options)


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value
