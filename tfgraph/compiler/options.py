"""What a compile is asked to do besides "this model, this target": :class:`CompileOptions`, a frozen
value grouped by concern (black's ``Mode`` is the model), so the driver takes one object and a new
setting is one field, not a new parameter everywhere."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from tfgraph.errors import BadInputError
from tfgraph.ir import DEFAULT_EXTERNAL_DATA_THRESHOLD

EXPORTERS = ("dynamo", "torchscript")
TASKS = (None, "text-generation")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options of :func:`tfgraph.compile`. Pass an instance, keyword overrides, or both
    (``compile(m, "cpu-int8", CompileOptions(verify=False), max_drop=0.01)``).

    Verification: ``verify`` (on by default), ``strict`` (unfused attention or unexpected CPU
    fallbacks fail the compile), ``inputs`` (an ``.npz`` path or a dict of arrays to verify on),
    ``shapes`` (sizes of generated inputs: ``{"input_ids": (2, 64)}`` or ``{"sequence": 64}``),
    ``seed`` and ``instruments`` (your own pass instruments).
    Import: ``exporter``, ``export_batch``, ``export_seq``, ``attention`` (sdpa or eager) and
    ``task`` (``"text-generation"``: a causal LM with its KV cache) for models exported first.
    Rewriting: ``extra_passes`` (after the target's pipeline; input passes such as ``eval-mode``
    run on the input model first), ``pass_options`` (options of the target's own passes:
    ``{"gptq": {"act_order": True}}``) and ``approximate_attention`` (``"window=N[,global=G]"``).
    Precision: ``calibration``, ``tokenizer``, ``max_drop``.
    Output: ``force``, ``external_data_threshold``, and ``progress`` (a ``(stage, done, total)`` callback).
    """

    # verification
    verify: bool = True
    strict: bool = False
    inputs: str | os.PathLike | Mapping[str, Any] | None = None
    shapes: Mapping[str, Any] | None = None
    seed: int = 0
    instruments: Sequence[Any] = ()
    # import
    exporter: str = "dynamo"
    export_batch: int = 2
    export_seq: int = 16
    attention: str | None = None
    task: str | None = None
    # rewriting
    extra_passes: Sequence[Any] = ()
    pass_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    approximate_attention: str | None = None
    # precision
    calibration: Any = None
    tokenizer: str | os.PathLike | None = None
    max_drop: float | None = None
    # output
    force: bool = False
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD
    progress: Callable[[str, int, int], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_passes", tuple(self.extra_passes))
        object.__setattr__(self, "instruments", tuple(self.instruments))
        object.__setattr__(self, "pass_options", MappingProxyType(
            {name: MappingProxyType(dict(values)) for name, values in dict(self.pass_options).items()}))
        if self.shapes is not None:
            object.__setattr__(self, "shapes", MappingProxyType(dict(self.shapes)))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise BadInputError(f"--seed {self.seed}: a seed is an integer from 0 to {2**32 - 1}")
        if self.exporter not in EXPORTERS:
            raise BadInputError(f"exporter '{self.exporter}': expected {' or '.join(EXPORTERS)}")
        if self.task not in TASKS:
            raise BadInputError(f"task '{self.task}': expected text-generation (or none)")
        if self.max_drop is not None and not 0.0 <= self.max_drop < 1.0:
            raise BadInputError(f"--max-drop {self.max_drop}: expected a number in [0, 1)")
        if self.approximate_attention is not None and not self.verify:
            raise BadInputError("an attention approximation needs verification on: it measures the output change")

    @classmethod
    def make(cls, options: CompileOptions | None, overrides: Mapping[str, Any]) -> CompileOptions:
        """``options`` (default: all defaults) with ``overrides`` applied; unknown names are refused."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"compile() got unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(fields))}")
        return dataclasses.replace(options or cls(), **overrides)

    def to_json(self, source_kind: str | None) -> dict[str, Any]:
        """The options as the manifest records them."""
        inputs = self.inputs
        return {
            "verify": self.verify,
            "strict": self.strict,
            "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in (self.shapes or {}).items()},
            "inputs": str(inputs) if isinstance(inputs, (str, os.PathLike)) else ("in-memory" if inputs is not None else None),
            "seed": self.seed,
            "extra_passes": [getattr(p, "name", None) or str(p) for p in self.extra_passes],
            "pass_options": {name: dict(values) for name, values in self.pass_options.items()},
            "exporter": self.exporter if source_kind else None,
        }
