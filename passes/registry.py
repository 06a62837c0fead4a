"""Name → pass class registry, and :class:`PassSpec`, a pass named with its options."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, TypeVar

import onnx_ir as ir

from tfgraph.errors import BadInputError

_PASSES: dict[str, type[ir.passes.PassBase]] = {}
_LAZY: dict[str, str] = {}  # built-in pass name → module under tfgraph.passes, imported on first use


def register_lazy(table: dict[str, str]) -> None:
    """Built-in passes known by name before their modules are imported."""
    _LAZY.update(table)


def _load(name: str) -> None:
    if name not in _PASSES and name in _LAZY:
        import importlib

        importlib.import_module(f"tfgraph.passes.{_LAZY[name]}")

P = TypeVar("P", bound=type)


def register_pass(name: str, *, replace: bool = False) -> Callable[[P], P]:
    """Class decorator: make a pass available to targets, ``compile(extra_passes=...)`` and ``--pass``."""

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
            raise TypeError(f"{cls!r} must subclass onnx_ir.passes.PassBase (e.g. onnx_ir.passes.InPlacePass)")
        if name in _LAZY and name not in _PASSES and cls.__module__ != f"tfgraph.passes.{_LAZY[name]}":
            _load(name)  # a plugin reusing a built-in name: compare with the built-in
        if name in _PASSES and _PASSES[name] is not cls and not replace:
            raise ValueError(f"a pass named '{name}' is already registered ({_PASSES[name].__qualname__})")
        _PASSES[name] = cls
        cls.pass_name = name
        return cls

    return decorate


def available_passes() -> list[str]:
    for name in list(_LAZY):
        _load(name)
    return sorted(_PASSES)


def get_pass_class(name: str) -> type[ir.passes.PassBase]:
    _load(name)
    try:
        return _PASSES[name]
    except KeyError:
        raise BadInputError(f"unknown pass '{name}'; registered passes: {', '.join(available_passes())}; "
                            "a pass of your own registers when its module is loaded with --plugin FILE.py|MODULE") from None


def option_types(cls: type) -> dict[str, tuple[Any, Any]]:
    """A pass's declared options: keyword-only ``__init__`` parameters → (annotation, default).
    ``tfgraph passes`` shows them; :func:`create_pass` checks given values against them."""
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type check
        hints = {}
    return {
        name: (hints.get(name, param.annotation), param.default)
        for name, param in signature.parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits a (simple) annotation; anything this does not understand is accepted."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if origin in (tuple, list, collections.abc.Sequence):
        return isinstance(value, (tuple, list))
    return True


def describe_annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def create_pass(name: str, **options: Any) -> ir.passes.PassBase:
    """An instance of the registered pass ``name``: options are checked against the types the
    pass declares, and the pass's own range checks (ValueError) become one-line bad-input errors."""
    cls = get_pass_class(name)
    declared = option_types(cls)
    for key, value in options.items():
        if key in declared and not _accepts(declared[key][0], value):
            raise BadInputError(f"bad option for pass '{name}': {key}={value!r} is not "
                                f"{describe_annotation(declared[key][0])}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"bad options for pass '{name}': {e}") from None


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A pass by registered name plus its keyword options: the data a target's pipeline is made of."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The target phase this pass runs in (set by ``targets.profile.Phase``; "" for extra passes).
    phase: str = dataclasses.field(default="", compare=False)

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
