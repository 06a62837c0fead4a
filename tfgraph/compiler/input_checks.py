"""Checks that run before the first pass: everything about the input and the options that can be
known without rewriting anything, refused with one line that says what to do (exit 2)."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.compiler.verify import feed_bytes, input_signature, position_limit, resolve_shapes

# Verification holds the inputs, the reference outputs, the outputs after each pass and
# onnxruntime's working memory: refuse inputs whose bytes alone pass this share of free memory.
MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or the physical size."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _gib(n: int) -> str:
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30)):
        if n >= 1 << shift:
            return f"{n / 2**shift:.1f} {unit}"
    return f"{n / 2**20:.1f} MiB"


def shapes_text(shapes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, np.shape(v) if not isinstance(v, tuple) else v))}" for k, v in shapes.items())


def check_input_shapes(model: ir.Model, shapes: Mapping[str, Any] | None, source: Mapping[str, Any]) -> dict:
    """The shapes verification will generate inputs at, refused up front when a name is unknown,
    two inputs disagree on a shared dimension, the inputs would not fit in memory, or a sequence
    is longer than the model's position table."""
    resolved = resolve_shapes(model, shapes)
    need = feed_bytes(model, resolved)
    budget = int(available_memory() * MEMORY_SHARE)
    if need > budget:
        raise BadInputError(
            f"inputs of shape {shapes_text(resolved)} need {_gib(need)} before the model even runs; verification "
            f"may use at most {_gib(budget)} for them here ({MEMORY_SHARE:.0%} of free memory): give smaller --shape sizes"
        )
    limit, where = _positions(model, source)
    if limit is not None:
        for info in input_signature(model):
            shape = resolved[info.name]
            if np.issubdtype(info.dtype, np.integer) and len(shape) >= 2 and shape[-1] > limit:
                dim = info.shape[-1] if isinstance(info.shape[-1], str) else None
                hint = f"--shape {dim}={limit}" if dim else f"a sequence of at most {limit}"
                raise BadInputError(
                    f"input '{info.name}' {'x'.join(map(str, shape))}: sequence {shape[-1]} is longer than the "
                    f"{limit} positions the model has ({where}); use {hint} or less"
                )
    return resolved


def _positions(model: ir.Model, source: Mapping[str, Any]) -> tuple[int | None, str]:
    config = source.get("source") if source.get("kind") == "huggingface" else None
    if config is not None:
        try:
            value = json.loads((pathlib.Path(config) / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            value = None
        if isinstance(value, int) and value > 0:
            return value, "max_position_embeddings in config.json"
    limit = position_limit(model)
    return limit, "rows of its position-embedding table"


def check_deterministic(model: ir.Model, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> None:
    """Two runs of the input model on the same inputs must agree, or no pass can be verified
    against it: refuse, naming the nodes that make it random."""
    from tfgraph.passes.eval_mode import RANDOM_OPS, random_nodes

    differing = [k for k in first if not np.array_equal(first[k], second[k], equal_nan=True)]
    if not differing:
        # Two fresh sessions can draw the same numbers and a rewritten graph others (ViTMAE's patch
        # noise): an unseeded Random* op whose draw is used makes every later comparison meaningless.
        unseeded = [n for n in random_nodes(model) if n.op_type in RANDOM_OPS and "seed" not in n.attributes
                    and any(o.uses() or o.is_graph_output() for o in n.outputs)]
        if unseeded:
            n = unseeded[0]
            raise BadInputError(
                f"the input model draws random numbers at run time ({n.name or '?'} ({n.op_type}), no seed"
                + (f", and {len(unseeded) - 1} more" if len(unseeded) > 1 else "")
                + "): its outputs are not a function of its inputs, so no pass can be verified against it; "
                "pass the random values as an input instead (e.g. ViTMAE's noise) or set the op's seed")
        return

    nodes = random_nodes(model)
    named = ", ".join(f"{n.name or '?'} ({n.op_type})" for n in nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
    dropout = any(n.op_type == "Dropout" for n in nodes)
    advice = ("export the model in eval mode (model.eval()) or add --pass eval-mode (training-mode Dropout → identity)"
              if dropout else "remove the random ops or export the model in eval mode")
    raise BadInputError(
        f"the input model is not deterministic: two runs on the same inputs gave different "
        f"{', '.join(repr(k) for k in differing[:3])}"
        + (f"; random nodes: {named}" if nodes else "; no random op found in the graph")
        + f"; {advice}"
    )


def check_target_runtime(profile) -> None:
    """A target whose execution provider ships as a plugin package needs that package before any
    pass runs (its passes read the EP's kernel registry, verification runs on it)."""
    for provider in profile.providers:
        if provider.plugin is None:
            continue
        try:
            importlib.import_module(provider.plugin)
        except ImportError:
            extra = provider.extra
            install = f"pip install 'tfgraph[{extra}]'" if extra else f"install the '{provider.plugin}' package"
            raise BadInputError(
                f"target '{profile.name}' needs {provider.name} from the '{provider.plugin}' package, which is not "
                f"installed: {install}"
            ) from None


def pin_input_shapes(model: ir.Model, shapes: Mapping[str, Any] | None, target: str,
                     feeds: Mapping[str, np.ndarray] | None = None) -> None:
    """Fix every graph input's shape for a static-shape target, from ``shapes`` (whole shapes by input
    name, ``{"input_ids": (1, 128)}``, or sizes of symbolic dimensions, ``{"sequence": 128}``) or the
    given input arrays; fails naming each input left with a dynamic dimension."""
    from tfgraph.passes.static_shapes import pin_input_shapes as pin

    shapes = dict(shapes or {})
    if feeds is not None:  # given input arrays fix the shapes of inputs --shape does not name
        shapes = {**{k: tuple(np.shape(v)) for k, v in feeds.items()}, **shapes}
    pin(model.graph, shapes)
    missing = []
    for value in model.graph.inputs:
        if value.shape is None:
            missing.append(f"'{value.name}' (rank unknown)")
            continue
        unknown = [str(getattr(d, "value", None) or f"axis {i}") for i, d in enumerate(value.shape) if not isinstance(d, int)]
        if unknown:
            missing.append(f"'{value.name}' ({', '.join(unknown)})")
    if missing:
        example = missing[0].split("'")[1]
        raise BadInputError(
            f"target '{target}' needs static shapes: input {', '.join(missing)} has dynamic dimensions; "
            f"give them with --shape (e.g. --shape {example}=1x128)"
        )
