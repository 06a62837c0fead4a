"""Transparent huge pages for a loaded model's weights (Linux): run-time side, no compiler imports.

A decoder reads all of its weights once per generated token. With 4 KiB pages a 40 MB int4 model spans
~10,000 pages, more than the CPU's second-level TLB holds, so every token pays page walks on top of
its memory traffic; the kernel backs memory with 2 MiB pages only where a process asked for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise`` on most distributions) and onnxruntime
does not ask. :func:`back_with_huge_pages` asks after the session is built: it finds the process's
large, populated anonymous mappings (where onnxruntime keeps the prepacked weights) and collapses them
into huge pages with ``madvise(MADV_HUGEPAGE)`` and ``madvise(MADV_COLLAPSE)`` (Linux 6.1+). The
advice changes how memory is backed, never its contents; where it is refused (older kernels, THP
``never``, other systems) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable, Iterator

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
#: A mapping is collapsed only where at least this share of it is resident already: a huge page over a
#: sparsely touched region would add memory that nothing uses.
MIN_RESIDENT = 0.75


def _mappings(smaps: str | Iterable[str]) -> list[tuple[int, int, int, int]]:
    """(start, end, resident bytes, bytes already on huge pages) of each private writable anonymous mapping
    in ``/proc/self/smaps`` (its text or its lines; no backing file; the heap included)."""
    found: list[list[int]] = []
    current: list[int] | None = None
    for line in smaps.splitlines() if isinstance(smaps, str) else smaps:
        head = line.rstrip("\n").split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            addresses, perms = head[0], head[1]
            path = head[5] if len(head) > 5 else ""
            anonymous = head[4] == "0" and (path == "" or path == "[heap]")
            if anonymous and perms.startswith("rw") and perms.endswith("p"):
                start, end = (int(x, 16) for x in addresses.split("-"))
                current = [start, end, 0, 0]
                found.append(current)
            else:
                current = None
        elif current is not None and line.startswith(("Rss:", "AnonHugePages:")):
            kilobytes = int(line.split()[1]) * 1024
            current[2 if line.startswith("Rss:") else 3] = kilobytes
    return [tuple(m) for m in found]


def anonymous_mappings() -> list[tuple[int, int, int, int]]:
    """This process's private writable anonymous mappings (see :func:`_mappings`); [] where there is no
    ``/proc/self/smaps``."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/smaps") as f:  # line by line: the whole text of a large process is megabytes,
            return _mappings(f)  # itself a new populated mapping
    except OSError:
        return []


def _uncovered(start: int, end: int, known: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) outside every range of ``known`` (sorted by start)."""
    for k_start, k_end in known:
        if k_end <= start or k_start >= end:
            continue
        if k_start > start:
            yield start, k_start
        start = max(start, k_end)
        if start >= end:
            return
    if start < end:
        yield start, end


def back_with_huge_pages(since: list[tuple[int, int, int, int]] | None = None, min_bytes: int = 4 << 20) -> int:
    """Collapse populated anonymous mappings of at least ``min_bytes`` into 2 MiB pages: the address ranges
    not mapped in ``since`` (an earlier :func:`anonymous_mappings`: what was mapped in between, e.g. a
    session's weights, also where the kernel merged it with an older neighbour), or all of them. Returns
    the bytes newly on huge pages (0 where the system refuses)."""
    mappings = anonymous_mappings()
    if not mappings:
        return 0
    known = sorted((start, end) for start, end, _, _ in since or ())
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    gained = 0
    for start, end, resident, huge in mappings:
        if resident < MIN_RESIDENT * (end - start) or huge >= end - start - HUGE_PAGE:
            continue
        for part_start, part_end in _uncovered(start, end, known):
            first = (part_start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
            size = part_end // HUGE_PAGE * HUGE_PAGE - first
            if size < max(min_bytes, HUGE_PAGE) or libc.madvise(first, size, MADV_HUGEPAGE) != 0:
                continue
            if libc.madvise(first, size, MADV_COLLAPSE) == 0:
                gained += max(size - huge, 0)
    return gained
