"""Where the warm interpreters' heaps sit in guest-physical memory, in 2 MiB pages.

The host backs a restored guest's RAM with the template's memory file, 4 KiB a page, and
under shadow paging (kvm_pvm) KVM maps guest memory no larger than the host page behind it.
The warm heaps (:mod:`ember.agent.heap`) are in 2 MiB guest pages already, most of them
zeros: a template build asks for their guest-physical addresses (op ``pool`` ``huge``) so
that every restore can put fresh host huge pages behind them
(:mod:`ember.snapshot.hugeback`, which checks on the host that the bytes are zeros: this
list only says where it pays).

A chunk qualifies when the process maps all of an aligned 2 MiB of its heap, alone
(``PM_EXCLUSIVE``: not a page a forked member still shares with its mother), on 512
consecutive frames starting at a 2 MiB boundary: a transparent huge page. Reading page
frame numbers needs ``CAP_SYS_ADMIN`` (the agent is root); without it the kernel reports 0
for each and nothing qualifies. Standard library only (it runs in the guest).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

__all__ = ["HUGE_SIZE", "MAX_CHUNKS", "heap_start", "huge_chunks"]

PAGE_SIZE = 4096
HUGE_SIZE = 2 << 20
PAGES = HUGE_SIZE // PAGE_SIZE
MAX_CHUNKS = 1024  # per process: 2 GiB of heap, more than any guest here has
END_GAP = 16  # chunks with nothing present in a row: the walk is past the heap's end
# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT, PM_EXCLUSIVE, PFN_MASK = 1 << 63, 1 << 56, (1 << 55) - 1
START_BRK_FIELD = 47  # proc(5): /proc/PID/stat field 47, counted from 1 (Linux 3.3+)


def heap_start(stat: bytes) -> int:
    """``start_brk`` from a ``/proc/PID/stat`` line; ValueError if it has none. The command
    name, field 2, may hold spaces and parentheses: fields are counted after its last ``)``."""
    rest = stat[stat.rindex(b")") + 1 :].split()
    return int(rest[START_BRK_FIELD - 3])


def huge_frame(entries: tuple[int, ...]) -> int | None:
    """The first frame of a 2 MiB chunk's pagemap ``entries`` if they are one exclusive
    transparent huge page (see the module's docstring), else None."""
    first = entries[0]
    if not first & PM_PRESENT or not first & PM_EXCLUSIVE:
        return None
    frame = first & PFN_MASK
    if frame == 0 or frame % PAGES:
        return None
    for index, entry in enumerate(entries):
        if not entry & PM_PRESENT or not entry & PM_EXCLUSIVE or entry & PFN_MASK != frame + index:
            return None
    return frame


def chunks_of(pid: int) -> list[int]:
    """The guest-physical addresses of process ``pid``'s heap chunks that are huge pages,
    walking up from ``start_brk`` until :data:`END_GAP` chunks in a row have no page present:
    past the heap's end (``/proc/PID/stat`` does not say where the break is, and reading
    ``/proc/PID/maps`` costs the emulated kernel ~1 s a process), while a stretch of heap
    never touched is shorter. Empty for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            start = heap_start(f.read())
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError, IndexError):
        return []
    found: list[int] = []
    try:
        address = (start + HUGE_SIZE - 1) // HUGE_SIZE * HUGE_SIZE
        empty = 0
        for _ in range(MAX_CHUNKS):
            data = os.pread(fd, PAGES * 8, address // PAGE_SIZE * 8)
            if len(data) != PAGES * 8:
                break
            entries = struct.unpack(f"<{PAGES}Q", data)
            empty = 0 if any(entry & PM_PRESENT for entry in entries) else empty + 1
            if empty == END_GAP:
                break
            frame = huge_frame(entries)
            if frame is not None:
                found.append(frame * PAGE_SIZE)
            address += HUGE_SIZE
    except OSError:
        pass
    finally:
        os.close(fd)
    return found


def huge_chunks(pids: Iterable[int]) -> list[int]:
    """Every qualifying chunk of the heaps of ``pids``, ascending, each once."""
    chunks: set[int] = set()
    for pid in pids:
        chunks.update(chunks_of(pid))
    return sorted(chunks)
