"""Pruning for ``tfgraph prune``: the logic lives in :mod:`tfgraph.passes.pruning` (re-exported here),
the instrument that re-baselines verification after pruning in :mod:`tfgraph.compiler.rebaseline`."""

from __future__ import annotations

from tfgraph.passes.pruning import *  # noqa: F401,F403 - the pruning API, for the CLI and callers
from tfgraph.passes.pruning import (  # noqa: F401 - private helpers some callers use
    _const,
    magnitude_prune,
    normalized_copy,
    parse_schedule,
    prune_structured,
    zero_heads,
)
from tfgraph.passes.pruning_units import AttentionUnit, Block, FFNUnit, attention_units, ffn_units  # noqa: F401
from tfgraph.compiler.rebaseline import RebaselineInstrument  # noqa: E402,F401
