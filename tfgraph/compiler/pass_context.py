"""The standard pass context: the compile-time machinery passes may use, handed to them as data.

Passes never import the calibration loader, the targets' operator tables and pipelines, or the
verification runner; this module (above them) bundles those into a
:class:`~tfgraph.passes.context.PassContext`. ``import tfgraph`` installs it as the default, and the
compile driver activates one with its own calibration set and progress callback.
"""

from __future__ import annotations

from typing import Any

from tfgraph.passes.context import PassContext


def _op_table(name: str):
    from tfgraph.targets.op_table import load_table, runtime_table

    if name.startswith("runtime:"):
        return runtime_table(name.split(":", 1)[1])
    return load_table(name)


def _run(model, feeds, *, options: Any = "unoptimized"):
    from tfgraph.compiler.verify import UNOPTIMIZED, run

    return run(model, feeds, options=UNOPTIMIZED if options == "unoptimized" else options)


def standard_context(**overrides: Any) -> PassContext:
    from tfgraph.compiler.calibration import collect_ranges, load_calibration
    from tfgraph.targets.cpu import CLEANUP, FUSION
    from tfgraph.compiler.verify import check_feeds, generate_inputs

    base = PassContext(
        load_calibration=load_calibration,
        collect_ranges=collect_ranges,
        op_table=_op_table,
        cleanup=tuple(CLEANUP),
        attention_fusion=tuple(FUSION),
        run=_run,
        generate_inputs=generate_inputs,
        check_feeds=check_feeds,
    )
    return base.replace(**overrides) if overrides else base


def install_default() -> None:
    from tfgraph.passes import context

    context.set_default(standard_context)  # built when a pass first asks for it
