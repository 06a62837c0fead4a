"""tfgraph.deploy.huge_pages: a loaded model's memory moved onto 2 MiB pages (Linux)."""
from __future__ import annotations

import ctypes
import io
import mmap
import os
import pathlib
import sys

import pytest

from tfgraph.deploy import huge_pages

SMAPS = """\
55d0c0000000-55d0c0800000 rw-p 00000000 00:00 0                          [heap]
Rss:                8192 kB
AnonHugePages:         0 kB
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0 
Size:              10240 kB
Rss:               10240 kB
AnonHugePages:      2048 kB
7f1000000000-7f1000400000 r--p 00000000 08:01 1234                       /usr/lib/libonnxruntime.so
Rss:                4096 kB
AnonHugePages:         0 kB
7f2000000000-7f2000400000 rw-s 00000000 00:01 99                         /dev/shm/x
Rss:                4096 kB
7fff00000000-7fff00200000 rw-p 00000000 00:00 0                          [stack]
Rss:                  64 kB
"""


def test_only_private_writable_anonymous_mappings_are_read():
    assert huge_pages._mappings(SMAPS) == [
        (0x55D0C0000000, 0x55D0C0800000, 8192 * 1024, 0),
        (0x7F0000000000, 0x7F0000A00000, 10240 * 1024, 2048 * 1024),
    ]
    # read line by line from the file, as anonymous_mappings does: each line ends in a newline (the heap's
    # name once kept it and the heap, where onnxruntime's weights land, was skipped)
    assert huge_pages._mappings(io.StringIO(SMAPS)) == huge_pages._mappings(SMAPS)


def _thp_available() -> bool:
    setting = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit()) if hasattr(os, "uname") else ()
    return sys.platform.startswith("linux") and setting.is_file() and "[never]" not in setting.read_text() \
        and release >= (6, 1)  # MADV_COLLAPSE


class _Mapping:
    """A private anonymous mapping of ``size`` bytes fenced by a read-only page on each side (a mapping
    the kernel cannot merge with its neighbours), its first ``touched`` bytes written."""

    def __init__(self, size: int, touched: int, fill: bytes):
        page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, size + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for fence in (base, base + page + size):
            assert libc.mprotect(fence, page, mmap.PROT_READ) == 0
        self.start, self.size = base + page, size
        self.map[page:page + touched] = fill * touched

    def huge_bytes(self) -> int:
        """Bytes on huge pages of the mappings over it (madvise splits a mapping at 2 MiB boundaries)."""
        return sum(huge for s, e, _r, huge in huge_pages.anonymous_mappings()
                   if s < self.start + self.size and e > self.start)


@pytest.mark.skipif(not _thp_available(), reason="needs Linux 6.1+ with transparent huge pages not 'never'")
def test_a_new_populated_mapping_is_collapsed_and_an_old_one_left_alone():
    old = _Mapping(8 << 20, 8 << 20, b"\1")
    before = huge_pages.anonymous_mappings()
    new = _Mapping(12 << 20, 12 << 20, b"\2")  # resident: every page touched
    sparse = _Mapping(16 << 20, 1 << 20, b"\3")  # mostly untouched: a huge page would add memory nothing uses
    gained = huge_pages.back_with_huge_pages(before)
    assert gained >= 8 << 20  # the 12 MiB mapping holds at least 5 aligned 2 MiB pages
    assert new.huge_bytes() >= 8 << 20
    assert old.huge_bytes() == 0 and sparse.huge_bytes() == 0
    page = mmap.PAGESIZE
    assert new.map[page:page + 4] == b"\2" * 4 and new.map[page + (12 << 20) - 1] == 2  # contents unchanged


def test_nothing_new_nothing_collapsed():
    assert huge_pages.back_with_huge_pages(huge_pages.anonymous_mappings()) == 0


def test_only_address_ranges_mapped_since_the_snapshot_count_as_new():
    """A mapping that grew or that the kernel merged with an older neighbour counts by its new part only."""
    known = [(0x1000, 0x5000), (0x9000, 0xA000)]
    assert list(huge_pages._uncovered(0x1000, 0x5000, known)) == []  # unchanged
    assert list(huge_pages._uncovered(0x1000, 0x8000, known)) == [(0x5000, 0x8000)]  # grew at the end
    assert list(huge_pages._uncovered(0x0, 0xC000, known)) == [(0x0, 0x1000), (0x5000, 0x9000), (0xA000, 0xC000)]
    assert list(huge_pages._uncovered(0xB000, 0xC000, known)) == [(0xB000, 0xC000)]  # all new
