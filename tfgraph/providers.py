"""An execution provider as data: what targets name, manifests record and run-time code opens
sessions with. Bottom layer: imported by targets and by deploy-time code alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True)
class Provider:
    """An onnxruntime execution provider with its options.

    ``plugin``: for plugin EPs (shipped as their own package and registered with onnxruntime at
    run time, e.g. ``onnxruntime_ep_openvino``, ``onnxruntime_qnn``) the Python module whose
    ``get_library_path()`` gives the EP library; None for EPs built into onnxruntime.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plugin: str | None = None
    # The tfgraph extra that installs the plugin (``pip install 'tfgraph[EXTRA]'``).
    extra: str | None = None
    # How to get a built-in EP that the stock onnxruntime wheel lacks (e.g. ``pip install onnxruntime-gpu``).
    install: str | None = None

    def install_hint(self) -> str:
        """One line: how to make this provider available here."""
        if self.install:
            return self.install
        if self.extra:
            return f"pip install 'tfgraph[{self.extra}]'"
        if self.plugin:
            return f"pip install the package that provides the '{self.plugin}' module"
        return f"install an onnxruntime build with {self.name}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _freeze(self.options))

    def to_json(self) -> dict:
        return {"name": self.name, "options": dict(self.options), **({"plugin": self.plugin} if self.plugin else {}),
                **({"extra": self.extra} if self.extra else {}), **({"install": self.install} if self.install else {})}
