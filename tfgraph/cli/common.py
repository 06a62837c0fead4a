"""What the command-line modules share: exit codes, consoles, progress, plugin loading, the
``--attention`` values, number formatting, and keeping native libraries' prints off stdout."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys

EXIT_OK, EXIT_VERIFY, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    from rich.console import Console

    # A pipe or a log file has no width: rich's 80 columns would fold the summary's tables.
    return Console(highlight=False, **({} if sys.stdout.isatty() else {"width": 140}))


class _Progress:
    """Adapter from the library's ``progress(stage, done, total)`` callback to a rich progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._t0: float | None = None  # first callback (not-a-terminal log lines)
        self._group: str | None = None  # phase of the last callback
        self._printed = 0.0  # when the last line was printed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    # Not on a terminal (a pipe, a CI log): a line when a phase starts, and one every few seconds within
    # a long phase, but only once the command has run a while, so quick runs and early errors print
    # nothing but their result.
    QUIET_S, EVERY_S = 2.0, 5.0

    def _log(self, group: str, line: str) -> None:
        import time

        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._printed = now
        new_phase, self._group = group != self._group, group
        if not line or now - self._t0 < self.QUIET_S or (not new_phase and now - self._printed < self.EVERY_S):
            return
        self._printed = now
        print(f"tfgraph: {line}", file=sys.stderr, flush=True)

    def _start(self):
        # Started on first use, so commands that fail early print nothing but their error.
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=_stderr_console(),
            transient=True,
        )
        self._progress.__enter__()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = stage if not stage.startswith("pass ") else "passes: " + stage[5:]
        group = "passes" if stage.startswith("pass ") else stage
        if not sys.stderr.isatty():
            self._log(group, label if group != "passes" else f"pass {done + 1}/{total}: {stage[5:]}" if done < total else "")
            return
        if self._progress is None:
            self._start()
        if self._task is None or self._task[0] != group:
            self._task = (group, self._progress.add_task(label, total=max(total, 1)))
        self._progress.update(self._task[1], description=label, completed=done, total=max(total, 1))


def _load_plugins(plugins: list[str]) -> None:
    """Import plugin modules (a ``.py`` file or a module name) so their passes/targets register."""
    from tfgraph.errors import BadInputError, first_line

    for plugin in plugins or ():
        path = pathlib.Path(plugin)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise BadInputError(f"{plugin}: plugin file not found")
                spec = importlib.util.spec_from_file_location(f"tfgraph_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except BadInputError:
            raise
        except SystemExit as e:
            raise BadInputError(f"plugin '{plugin}' called sys.exit({e.code}) while loading; a plugin module must only "
                                "define and register passes or targets") from None
        except Exception as e:
            raise BadInputError(f"cannot load plugin '{plugin}': {type(e).__name__}: {first_line(e)}") from None


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _pass_options(items: list[str] | None) -> dict[str, dict]:
    """``--set PASS:K=V[,K=V]`` (repeatable) → ``{pass: {option: value}}``, later settings winning."""
    from tfgraph.errors import BadInputError
    from tfgraph.passes.registry import PassSpec

    out: dict[str, dict] = {}
    for item in items or ():
        spec = PassSpec.parse(item)
        if not spec.options:
            raise BadInputError(f"--set {item}: expected PASS:KEY=VALUE[,KEY=VALUE] (e.g. gptq:act_order=true)")
        out.setdefault(spec.name, {}).update(spec.options)
    return out


def _attention_impl(args: argparse.Namespace, *, allow_window: bool = True) -> str | None:
    """The export attention implementation among the ``--attention`` values (None: the default)."""
    from tfgraph.errors import BadInputError

    impls = [a for a in args.attention if a in ATTENTION_IMPLEMENTATIONS]
    others = [a for a in args.attention if a not in ATTENTION_IMPLEMENTATIONS]
    for value in others:
        if not value.startswith("window") or not allow_window:
            allowed = "sdpa, eager" + (" or window=N[,global=G]" if allow_window else "")
            raise BadInputError(f"--attention {value}: expected {allowed}")
    if len(set(impls)) > 1:
        raise BadInputError(f"--attention: choose one implementation, not {' and '.join(sorted(set(impls)))}")
    return impls[0] if impls else None


def _attention_approximation(args: argparse.Namespace) -> str | None:
    windows = [a for a in args.attention if a.startswith("window")]
    if len(windows) > 1:
        from tfgraph.errors import BadInputError

        raise BadInputError("--attention: give one window=N[,global=G]")
    return windows[0] if windows else None


@contextlib.contextmanager
def _native_stdout_to_stderr(enabled: bool):
    """Send what native libraries print on file descriptor 1 (the QNN EP prints a banner when it
    loads) to stderr while ``enabled``, so that ``--json`` output stays valid JSON."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
