"""Verification across passes that change the outputs on purpose (pruning, reduced precision)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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
        from tfgraph.compiler.verify import UNOPTIMIZED, compare, run

        outputs = run(model, self.feeds, options=UNOPTIMIZED)
        diffs = compare(self.numeric.reference, outputs, atol=self.numeric.atol, rtol=self.numeric.rtol)
        record.extra["output_change"] = {d.name: d.to_json() for d in diffs}
        self.numeric.reference = outputs

    def after_pipeline(self, model):
        pass
