"""Target profiles, registered by name.

Only targets that work end to end are registered; ``tfgraph targets`` lists them.
"""

from __future__ import annotations

from tfgraph.errors import BadInputError
from tfgraph.targets import cpu, cuda, npu, openvino
from tfgraph.targets.profile import Provider, Quantization, Target, Tolerance

_TARGETS: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> Target:
    if target.name in _TARGETS and not replace:
        raise ValueError(f"a target named '{target.name}' is already registered")
    _TARGETS[target.name] = target
    return target


def list_targets() -> list[Target]:
    return [_TARGETS[name] for name in sorted(_TARGETS)]


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return _TARGETS[name]
    except KeyError:
        raise BadInputError(f"unknown target '{name}'; valid targets: {', '.join(sorted(_TARGETS))}") from None


# Each profile module lists its targets in TARGETS.
for _module in (cpu, cuda, openvino, npu):
    for _target in _module.TARGETS:
        register_target(_target)

__all__ = ["Provider", "Quantization", "Target", "Tolerance", "get_target", "list_targets", "register_target"]
