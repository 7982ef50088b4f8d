"""Fresh host huge pages behind the guest's huge, all-zero heap pages of a template.

A restore maps the snapshot's memory file ``MAP_PRIVATE``, so the host backs guest RAM with
4 KiB pages, and KVM's shadow MMU (kvm_pvm) maps guest memory at most as large as the host
page behind it: every 4 KiB of a warm interpreter's pre-faulted heap costs a restored sandbox
one exit and one copy-on-write fault the first time the guest writes it, ~20-30 us here, so
a first 10 MiB ``bytearray`` took 60-110 ms. That heap is already in 2 MiB guest pages
(transparent huge pages, :mod:`ember.agent.heap`), and in the template most of it is zeros.

So a template build asks the agent where those 2 MiB guest pages are (guest-physical, op
``pool`` ``huge``), keeps the ones that are holes in the memory file (:func:`holes`: the
snapshot writer leaves every zero page out) and records them in the snapshot directory as
:data:`HUGE_FILE`. A restore maps fresh anonymous memory with ``MADV_HUGEPAGE`` over each of
them that is still a hole (:func:`back`) before the vCPUs run: the guest sees the same bytes
(zeros), and its first write there is one exit that KVM maps with one 2 MiB entry, backed
by one host huge page, instead of 512. A sandbox that never writes there pays nothing; one
that writes one byte pays 2 MiB instead of 4 KiB, which is why only the warm heaps' pages
are recorded, not every zero page of the guest.

The file is a hint, as the prefault file is: missing, malformed or out of range, it is
ignored (logged), and a chunk that is not a hole, or whose host address is not 2 MiB aligned
like its guest address (KVM could not map it huge), stays mapped from the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from ember.memory import HUGE_PAGE_SIZE, GuestMemory, ram_layout
from ember.snapshot import prefault
from ember.snapshot.prefault import FORMAT, hint_list, read_hint

log = logging.getLogger(__name__)

HUGE_FILE = "hugepages.json"
HUGE_SIZE = HUGE_PAGE_SIZE
MAX_CHUNKS = 4096  # 8 GiB of chunks: more is not a file we wrote


def _file_offset(guest_addr: int, memory_size: int) -> int | None:
    """Where a guest-physical 2 MiB chunk is in the memory file, or None if it is not RAM."""
    if guest_addr < 0 or guest_addr % HUGE_SIZE:
        return None
    offset = 0
    for start, length in ram_layout(memory_size):
        if start <= guest_addr and guest_addr + HUGE_SIZE <= start + length:
            return offset + guest_addr - start
        offset += length
    return None


def write(directory: Path, chunks: list[int]) -> None:
    """Record ``chunks`` in ``directory`` (a snapshot being built: not yet visible)."""
    body = {"format": FORMAT, "chunk_size": HUGE_SIZE, "chunks": sorted(set(chunks))}
    (directory / HUGE_FILE).write_text(json.dumps(body, separators=(",", ":")))


def parse(text: str, memory_size: int) -> list[int]:
    """A huge-pages file's chunks, checked against guest RAM of ``memory_size`` bytes.

    Raises ValueError for anything but what :func:`write` makes: ascending, distinct,
    2 MiB-aligned guest-physical addresses of whole chunks of RAM.
    """
    raw = hint_list(text, "huge-pages", ("chunk_size", HUGE_SIZE), "chunks", MAX_CHUNKS)
    chunks: list[int] = []
    for item in raw:
        if type(item) is not int or _file_offset(item, memory_size) is None:
            raise ValueError(f"chunk {item!r} is not a 2 MiB-aligned chunk of guest RAM")
        if chunks and item <= chunks[-1]:
            raise ValueError(f"chunk {item:#x} is out of order or repeated")
        chunks.append(item)
    return chunks


def read(directory: Path, memory_size: int) -> list[int]:
    """The chunks recorded for the snapshot in ``directory``; none without a usable file."""
    chunks = read_hint(directory / HUGE_FILE, lambda text: parse(text, memory_size))
    return chunks if chunks is not None else []


def runs_of(chunks: list[int]) -> list[tuple[int, int]]:
    """Chunks as maximal (guest address, bytes) runs: one mmap each (prefault's runs, in
    2 MiB units)."""
    units = prefault.runs_of(chunk // HUGE_SIZE for chunk in chunks)
    return [(first * HUGE_SIZE, count * HUGE_SIZE) for first, count in units]


def back(memory: GuestMemory, chunks: list[int], memory_file: Path) -> int:
    """Map fresh anonymous huge-page memory over ``chunks`` of ``memory`` (restored from
    ``memory_file``, nothing run yet); the number of chunks mapped.

    Only a chunk that is a hole in the file (:func:`holes`: zeros by definition, as the
    snapshot writer leaves every zero page out) is mapped, so a wrong or forged list cannot
    change a byte the guest sees. Chunks outside ``memory`` and guest RAM that is not 2 MiB
    aligned in this process are left mapped from the file, as without this; a failing
    ``mmap`` raises GuestMemoryError (the restore fails, nothing is run).
    """
    done = 0
    for guest_addr, length in runs_of(holes(memory_file, memory.size, chunks)):
        if not memory.contains(guest_addr, length):
            continue
        if not memory.renew(guest_addr, length):
            log.info("huge pages skipped: guest RAM is not 2 MiB aligned in the VMM")
            return done
        done += length // HUGE_SIZE
    return done


def holes(memory_file: Path, memory_size: int, chunks: list[int]) -> list[int]:
    """The chunks of ``chunks`` that are holes in ``memory_file`` (no data from their first
    byte to their last: ``SEEK_DATA``, one system call each); none if the file cannot be
    read, or its file system cannot say."""
    kept: list[int] = []
    try:
        fd = os.open(memory_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.info("huge pages skipped: %s", exc)
        return []
    try:
        for chunk in chunks:
            offset = _file_offset(chunk, memory_size)
            if offset is None:
                continue
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from here to the end
                    log.info("huge pages skipped: %s", exc)
                    return []
                data = memory_size
            if data >= offset + HUGE_SIZE:
                kept.append(chunk)
    finally:
        os.close(fd)
    return kept
