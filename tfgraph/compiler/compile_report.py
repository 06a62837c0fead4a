"""What a compile cost: wall time and peak resident memory per driver step and per target phase
(``manifest["compile"]``, issue 20).

Peak memory is the kernel's high-water mark of this process's resident set (``VmHWM``), reset at the
start of each step where Linux allows it (``/proc/self/clear_refs``, value 5), so each step reports its
own peak; elsewhere (or where the reset is refused) it is the process's peak so far (``ru_maxrss``).
The compile's peak is the largest of them and of the resident set when the compile started.
"""

from __future__ import annotations

import contextlib
import pathlib
import resource
import sys
import time
from collections.abc import Iterator

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """The peak resident set since the last :meth:`reset` (bytes)."""

    def __init__(self) -> None:
        self.resettable = False
        self.start_peak = self.peak()  # before any reset: imports, export before compile, ...

    def reset(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.resettable = _status_kib("VmHWM") is not None
        except OSError:
            self.resettable = False

    def peak(self) -> int:
        hwm = _status_kib("VmHWM")
        return hwm * 1024 if hwm is not None else _maxrss_bytes()

    def current(self) -> int:
        rss = _status_kib("VmRSS")
        return rss * 1024 if rss is not None else 0


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``): weights replaced by a
    pass are freed in pieces the allocator keeps otherwise, and the next step's peak would sit on them."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


class CompileClock:
    """Wall time and peak memory of each step of a compile, and of each target phase of its pipeline."""

    def __init__(self) -> None:
        self.memory = PeakMemory()
        self.start_rss = self.memory.current()
        self.steps: list[dict] = []
        self._carry = 0
        self.phases: list[dict] = []
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def measure(self, name: str, into: list | None = None) -> Iterator[dict]:
        """Time the block and record its peak memory as an entry ``{"name", "time_s", "peak_rss_bytes"}``."""
        entry: dict = {"name": name}
        release_free_memory()
        self.memory.reset()
        self._carry = 0
        start, inner = time.perf_counter(), len(self.phases)
        try:
            yield entry
        finally:
            entry["time_s"] = round(time.perf_counter() - start, 4)
            # Phases measured inside this step reset the high-water mark: their peaks count too.
            entry["peak_rss_bytes"] = max([self.memory.peak(), self._carry,
                                           *(p["peak_rss_bytes"] for p in self.phases[inner:])])
            (self.steps if into is None else into).append(entry)

    def begin_phase(self, name: str) -> dict:
        """Start measuring a target phase (ended by :meth:`end_phase`); returns its entry to fill."""
        from tfgraph.deploy import runtime

        self._carry = max(self._carry, self.memory.peak())  # the enclosing step's peak so far
        release_free_memory()
        self.memory.reset()
        entry = {"name": name, "passes": 0, "modified": 0, "time_s": 0.0, "passes_s": 0.0, "checks_s": 0.0,
                 "sessions": 0, "peak_rss_bytes": 0, "_start": time.perf_counter(), "_sessions": runtime.SESSIONS_BUILT}
        self.phases.append(entry)
        return entry

    def end_phase(self, entry: dict) -> None:
        from tfgraph.deploy import runtime

        entry["time_s"] = round(time.perf_counter() - entry.pop("_start"), 4)
        entry["sessions"] = runtime.SESSIONS_BUILT - entry.pop("_sessions")
        entry["passes_s"] = round(entry["passes_s"], 4)
        entry["checks_s"] = round(entry["checks_s"], 4)
        entry["peak_rss_bytes"] = self.memory.peak()

    def report(self, **extra) -> dict:
        peaks = [e["peak_rss_bytes"] for e in (*self.steps, *self.phases)]
        return {
            "time_s": round(time.perf_counter() - self._t0, 4),
            "peak_rss_bytes": max([self.memory.start_peak if not self.memory.resettable else self.start_rss, *peaks]),
            "peak_rss_source": "VmHWM per step (reset between steps)" if self.memory.resettable else "ru_maxrss",
            "steps": self.steps,
            "phases": self.phases,
            **extra,
        }
