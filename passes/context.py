"""The pass context: what passes need from outside the graph, handed to them by whoever runs them.

Passes sit below the compiler, the targets and the calibration machinery, and import none of them
(TVM's ``PassContext`` is the model). What a pass needs from there reaches it through the active
:class:`PassContext`:

* ``calibration``: the compile's calibration set (an object with ``batches``: a list of feed dicts);
* ``load_calibration(data, model)``: turns arrays, a dict or an ``.npz`` path into such a set;
* ``collect_ranges(model, names, calibration, *, calibrator, progress)``: activation ranges;
* ``op_table(name)``: a target's operator table by name (``"cuda"``, ``"runtime:CPUExecutionProvider"``);
* ``cleanup`` / ``attention_fusion``: the pass specs that canonicalize a graph and fuse its attention
  (for passes that locate attention blocks on a fused copy, e.g. ``shrink-pruned``, the pruning passes);
* ``run(model, feeds)``: the model's outputs on onnxruntime CPU (unoptimized), for passes that measure;
* ``generate_inputs(model, shapes, seed)`` / ``check_feeds(feeds, model)``: feeds for such runs.

The compile driver makes one with everything set (``tfgraph.compiler.pass_context.standard_context``) and
``import tfgraph`` installs that as the default, so a pass run on its own works as well.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class PassContext:
    calibration: Any = None
    load_calibration: Callable[..., Any] | None = None
    collect_ranges: Callable[..., dict] | None = None
    op_table: Callable[[str], Any] | None = None
    cleanup: Sequence[Any] = ()
    attention_fusion: Sequence[Any] = ()
    run: Callable[..., dict] | None = None
    generate_inputs: Callable[..., dict] | None = None
    check_feeds: Callable[..., dict] | None = None
    progress: Callable[[str, int, int], None] | None = None

    def need(self, name: str, user: str) -> Any:
        """The context's ``name``; an error naming the pass that needs it when it is not set."""
        value = getattr(self, name)
        if value is None or value == ():
            raise RuntimeError(f"{user} needs '{name}' from the pass context; run it through tfgraph.compile or "
                               "a PassManager, or inside `with passes.context.active(PassContext(...))`")
        return value

    def replace(self, **changes: Any) -> PassContext:
        return dataclasses.replace(self, **changes)


_DEFAULT: list[PassContext | Callable[[], PassContext]] = [PassContext()]
_CURRENT: contextvars.ContextVar[PassContext | None] = contextvars.ContextVar("tfgraph_pass_context", default=None)


def current() -> PassContext:
    """The active context, else the default one (built on first use when installed as a factory)."""
    ctx = _CURRENT.get()
    if ctx is not None:
        return ctx
    if not isinstance(_DEFAULT[0], PassContext):
        _DEFAULT[0] = _DEFAULT[0]()
    return _DEFAULT[0]


def set_default(ctx: PassContext | Callable[[], PassContext]) -> None:
    """Install the context passes see when none is active, or a factory that makes it on first use
    (``import tfgraph`` installs the standard one that way, so importing loads no calibration code)."""
    _DEFAULT[0] = ctx


@contextlib.contextmanager
def active(ctx: PassContext) -> Iterator[PassContext]:
    """Make ``ctx`` the context of the passes run inside the ``with`` block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
