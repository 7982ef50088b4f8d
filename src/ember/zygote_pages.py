"""The zygote's pages a VMM child writes: learned from its children, written ahead of them.

A VMM child shares the zygote's memory copy-on-write. In its first fraction of a second it
writes ~1,450 of those pages: reference counts of the objects its code touches, the
allocator's arenas, libpython's data. Each first write is a copy-on-write fault, ~5.5 us on
this host (itself a VM), so ~8 ms of a ~30 ms restore. The set hardly changes from one child
to the next (four children: 1,451 pages in common, 32 more at most in any one), so:

- the zygote *learns* it. Some time after a child is forked (:data:`SAMPLE_AFTER_S`), while
  idle, it reads the child's ``/proc/PID/pagemap`` over its own private writable mappings:
  a page present there and mapped by that process alone (``PM_MMAP_EXCLUSIVE``) is one the
  child wrote (or allocated). The set is what the last two samples have in common, so a
  page one request wrote for itself is left out;
- the child forked ahead (:mod:`ember.zygote_fork`) *writes* those pages while it waits for
  its request (``MADV_POPULATE_WRITE``: the faults are taken, the contents unchanged), on the
  host's other core, off the restore's path.

It costs no memory: the pages were going to be copied by the child anyway; a page the set has
wrong costs one page (:data:`MAX_PAGES` bounds them). Only children the zygote has not yet
reaped are sampled (their pid cannot have been reused), and a pagemap it cannot read (no
permission, an old kernel) just leaves the set as it is. Without ``MADV_POPULATE_WRITE``
(Linux < 5.14) the child skips it and faults as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Iterable

from ember.memory import PAGE_SIZE
from ember.snapshot.prefault import MADV_POPULATE_WRITE, PM_PRESENT, Run, runs_of

PM_MMAP_EXCLUSIVE = 1 << 56  # Documentation/admin-guide/mm/pagemap.rst
SAMPLE_AFTER_S = 0.04  # a restore's child has written them all by its ready (~30 ms here)
RESAMPLE_EVERY = 32  # spawns: the zygote's own heap moves a little as it serves
MAX_PAGES = 8192  # 32 MiB: more than that is not a restore's working set; learn nothing
MIN_PAGES = 64  # fewer: a child that has exited (no memory left to read), not a sample

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def writable_ranges(maps: str) -> list[tuple[int, int]]:
    """The private writable mappings of a ``/proc/PID/maps`` text: the memory a child
    shares copy-on-write (not the stack, which each process has its own of, nor the
    kernel's ``[vvar]``/``[vdso]``)."""
    found = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or len(fields[1]) != 4:
            continue
        perms, name = fields[1], fields[5] if len(fields) > 5 else ""
        if perms[1] != "w" or perms[3] != "p" or name.startswith(("[stack", "[v")):
            continue
        low, _, high = fields[0].partition("-")
        try:
            found.append((int(low, 16), int(high, 16)))
        except ValueError:
            continue
    return found


def exclusive_pages(pagemap: int, ranges: Iterable[tuple[int, int]]) -> set[int]:
    """Page numbers (address / page size) of the pages in ``ranges`` present and mapped by
    the process alone, read from its open ``pagemap``. An unreadable range (unmapped there
    since) is skipped."""
    pages: set[int] = set()
    wanted = PM_PRESENT | PM_MMAP_EXCLUSIVE
    for low, high in ranges:
        try:
            data = os.pread(pagemap, ((high - low) // PAGE_SIZE) * 8, (low // PAGE_SIZE) * 8)
        except OSError:
            continue
        for i, (entry,) in enumerate(struct.iter_unpack("=Q", data[: len(data) // 8 * 8])):
            if entry & wanted == wanted:
                pages.add(low // PAGE_SIZE + i)
    return pages


def populate(runs: Iterable[Run]) -> int:
    """In the child forked ahead: take the write faults of ``runs`` ((first page, pages),
    :func:`ember.snapshot.prefault.runs_of`) now; the pages written ahead. Stops at EINVAL
    (no ``MADV_POPULATE_WRITE`` here)."""
    done = 0
    for first, count in runs:
        if _libc.madvise(first * PAGE_SIZE, count * PAGE_SIZE, MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break
            continue  # ENOMEM: no longer mapped in this process; the rest may be
        done += count
    return done


class Learner:
    """The zygote's end: which children to sample, when, and the set learned so far."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self._last: set[int] | None = None
        self._samples = 0
        self._since = 0  # children forked since the last sample
        self._pending: tuple[int, float] | None = None  # (pid, when to sample it)

    def spawned(self, pid: int) -> None:
        """A child was forked for a request: sample it later, if a sample is due."""
        self._since += 1
        if self._pending is None and (self._samples < 2 or self._since >= RESAMPLE_EVERY):
            self._pending = (pid, time.monotonic() + SAMPLE_AFTER_S)

    def due_in(self) -> float | None:
        """Seconds until a sample is due (0: now), None if none is pending."""
        if self._pending is None:
            return None
        return max(0.0, self._pending[1] - time.monotonic())

    def sample_if_due(self, children: Iterable[int]) -> None:
        """Sample the pending child if it is due and still in ``children`` (forked by us
        and not reaped: its pid is its own); then the set is the last two samples' common
        pages. A child gone by then is not sampled: the next one is."""
        if self._pending is None or self._pending[1] > time.monotonic():
            return
        pid, _ = self._pending
        self._pending = None
        if pid not in children:
            return
        try:
            with open("/proc/self/maps") as f:
                ranges = writable_ranges(f.read())
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            sample = exclusive_pages(fd, ranges)
        finally:
            os.close(fd)
        if len(sample) < MIN_PAGES:
            return
        if self._last is not None:
            common = sample & self._last
            self.runs = runs_of(common) if len(common) <= MAX_PAGES else []
        self._last = sample
        self._samples += 1
        self._since = 0
