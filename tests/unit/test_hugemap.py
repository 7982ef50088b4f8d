"""Where the warm heaps' 2 MiB pages are (ember.agent.hugemap): the stat and pagemap parsing,
and the whole walk over a real process on the host, checked against /proc/PID/maps."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest

from ember.agent import hugemap
from ember.agent.heap import MALLOC_ENV

PRESENT, EXCLUSIVE = hugemap.PM_PRESENT, hugemap.PM_EXCLUSIVE


def test_heap_start_counts_fields_after_the_command_name() -> None:
    rest = " ".join(str(n) for n in range(3, 53))  # field N holds N
    assert hugemap.heap_start(f"42 (py) 3) (x) {rest}".encode()) == 47
    with pytest.raises(ValueError):
        hugemap.heap_start(b"42 no command name here")


def _entries(frame: int, flags: int = PRESENT | EXCLUSIVE) -> list[int]:
    return [flags | (frame + i) for i in range(hugemap.PAGES)]


def test_huge_frame_is_one_exclusive_aligned_run_of_frames() -> None:
    assert hugemap.huge_frame(tuple(_entries(512 * 7))) == 512 * 7


@pytest.mark.parametrize(
    "why",
    ["misaligned", "gap", "not present", "shared", "zero frame", "first not present"],
)
def test_huge_frame_refuses_anything_else(why: str) -> None:
    entries = _entries(512 * 7)
    if why == "misaligned":
        entries = _entries(512 * 7 + 1)
    elif why == "gap":
        entries[300] += 1
    elif why == "not present":
        entries[511] &= ~PRESENT
    elif why == "shared":  # a page a forked member still shares with its mother
        entries[10] &= ~EXCLUSIVE
    elif why == "zero frame":  # what pagemap reports to a reader without CAP_SYS_ADMIN
        entries = [PRESENT | EXCLUSIVE] * hugemap.PAGES
    else:
        entries[0] = 0
    assert hugemap.huge_frame(tuple(entries)) is None


def _expected(pid: int) -> list[int]:
    """The same answer the long way: every 2 MiB-aligned stretch of the heap, as far as
    /proc/PID/maps says it reaches (its [heap] lines: huge pages split the mapping)."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        spans = [
            [int(x, 16) for x in line.split()[0].split("-")]
            for line in maps
            if line.rstrip().endswith("[heap]")
        ]
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        chunk = -(-low // hugemap.HUGE_SIZE) * hugemap.HUGE_SIZE
        while chunk + hugemap.HUGE_SIZE <= high:
            pagemap.seek(chunk // 4096 * 8)
            frame = hugemap.huge_frame(struct.unpack("<512Q", pagemap.read(4096)))
            if frame is not None:
                found.append(frame * 4096)
            chunk += hugemap.HUGE_SIZE
    return sorted(found)


@pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers need CAP_SYS_ADMIN")
def test_the_walk_finds_a_warm_heaps_huge_pages() -> None:
    """A python3 with the warm heaps' malloc settings touches 24 MiB of heap and waits; the
    walk from start_brk finds the huge pages /proc/PID/maps says its heap has."""
    env = {**os.environ, **MALLOC_ENV}
    code = "b = bytearray(24 << 20); print('ok', flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        for _ in range(10):  # the host's khugepaged may still be collapsing the heap's start
            found = hugemap.huge_chunks([child.pid, child.pid])
            if found == _expected(child.pid):
                break
            time.sleep(0.2)
        exp = _expected(child.pid)
        assert found == exp
        assert all(c % hugemap.HUGE_SIZE == 0 for c in found)
        # the host's THP setting decides how many; the heap reaches past 24 MiB either way
        assert sorted(hugemap.chunks_of(child.pid)) == found  # in address order, not sorted
    finally:
        child.kill()
        child.wait()
    assert hugemap.chunks_of(child.pid) == []  # gone: nothing, no error
