"""Pruning from the command line and the compile driver: the logic lives in
:mod:`tfgraph.passes.pruning` (re-exported here for ``tfgraph prune``); this module keeps the
instrument that re-baselines verification after a pass that changes the outputs on purpose."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

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


class RebaselineInstrument:
    """For passes that change the outputs on purpose (``changes_outputs = True``: pruning): record how
    much they changed, then make the pruned model the reference the following passes are verified
    against. Placed before the numeric-diff instrument it rebaselines."""

    def __init__(self, numeric, feeds: Mapping[str, np.ndarray]):
        self.numeric = numeric
        self.feeds = dict(feeds)

    def before_pipeline(self, model):
        pass

    def before_pass(self, pass_, record, model):
        pass

    def after_pass(self, pass_, record, model):
        if not record.modified or not getattr(pass_, "changes_outputs", False):
            return
        from tfgraph.verify import UNOPTIMIZED, compare, run

        outputs = run(model, self.feeds, options=UNOPTIMIZED)
        diffs = compare(self.numeric.reference, outputs, atol=self.numeric.atol, rtol=self.numeric.rtol)
        record.extra["output_change"] = {d.name: d.to_json() for d in diffs}
        self.numeric.reference = outputs

    def after_pipeline(self, model):
        pass
