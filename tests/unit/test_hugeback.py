"""Huge-page backing of a template's zero heap chunks (ember.snapshot.hugeback), without KVM:
the file's checks, the host's zero check, and the remapping of a file-backed GuestMemory."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from ember import memory as memory_module
from ember.memory import (
    MMIO_GAP_END,
    MMIO_GAP_START,
    GuestMemory,
    GuestMemoryError,
    Region,
    c_address,
)
from ember.snapshot import hugeback

MIB = 1 << 20
HUGE = hugeback.HUGE_SIZE


def _file(tmp_path: Path, size: int, marks: dict[int, bytes]) -> Path:
    """A sparse memory file of ``size`` bytes with ``marks`` (offset -> bytes) written."""
    path = tmp_path / "memory"
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in marks.items():
            f.seek(offset)
            f.write(data)
    return path


def _body(chunks: list[object], **extra: object) -> str:
    return json.dumps({"format": 1, "chunk_size": HUGE, "chunks": chunks, **extra})


def test_holes_keeps_only_chunks_with_no_data_in_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, 16 * MIB, {2 * HUGE + HUGE - 1: b"\x01", 5 * HUGE: b"x"})
    wanted = [HUGE, 2 * HUGE, 3 * HUGE, 5 * HUGE, 7 * HUGE, 8 * HUGE, HUGE + 4096]
    # 2 and 5 hold a byte; 8 lies past the file; HUGE + 4096 is not aligned
    assert hugeback.holes(path, 16 * MIB, wanted) == [HUGE, 3 * HUGE, 7 * HUGE]
    # a zero written out is data, not a hole: the snapshot writer never writes one
    with path.open("r+b") as f:
        f.seek(3 * HUGE)
        f.write(bytes(4096))
    assert hugeback.holes(path, 16 * MIB, wanted) == [HUGE, 7 * HUGE]
    assert hugeback.holes(tmp_path / "gone", 16 * MIB, wanted) == []


def test_a_chunk_above_the_mmio_gap_is_looked_up_at_its_file_offset(tmp_path: Path) -> None:
    size = MMIO_GAP_START + 4 * MIB  # 4 MiB of RAM above 4 GiB, after the gap
    path = _file(tmp_path, size, {MMIO_GAP_START + HUGE: b"\x07"})
    # the file's bytes at MMIO_GAP_START are guest MMIO_GAP_END: RAM back to back
    assert hugeback.holes(path, size, [MMIO_GAP_END, MMIO_GAP_END + HUGE]) == [MMIO_GAP_END]
    assert hugeback.holes(path, size, [MMIO_GAP_START]) == []  # the gap is not RAM
    path.unlink()


def test_parse_takes_what_write_makes(tmp_path: Path) -> None:
    hugeback.write(tmp_path, [6 * HUGE, 2 * HUGE, 2 * HUGE])
    assert hugeback.read(tmp_path, 16 * MIB) == [2 * HUGE, 6 * HUGE]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("[]", "format"),
        (json.dumps({"format": 2, "chunk_size": HUGE, "chunks": []}), "format"),
        (_body([], chunk_size=4096), "chunk size"),
        (_body([HUGE + 4096]), "aligned"),
        (_body([-HUGE]), "aligned"),
        (_body([8 * HUGE]), "aligned"),  # past 16 MiB of RAM
        (_body([True]), "aligned"),
        (_body([str(HUGE)]), "aligned"),
        (_body([2 * HUGE, HUGE]), "order"),
        (_body([HUGE, HUGE]), "order"),
        (_body(list(range(0, (hugeback.MAX_CHUNKS + 1) * HUGE, HUGE))), "at most"),
    ],
)
def test_parse_refuses_what_write_never_makes(body: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        hugeback.parse(body, 16 * MIB)


@pytest.mark.parametrize("body", ["not json", _body([HUGE + 1]), b"\xff\xfe"])
def test_a_bad_file_is_ignored(tmp_path: Path, body: str | bytes) -> None:
    target = tmp_path / hugeback.HUGE_FILE
    if isinstance(body, bytes):
        target.write_bytes(body)
    else:
        target.write_text(body)
    assert hugeback.read(tmp_path, 16 * MIB) == []
    assert hugeback.read(tmp_path / "elsewhere", 16 * MIB) == []  # no file at all


def test_runs_of_joins_neighbours() -> None:
    chunks = [0, HUGE, 2 * HUGE, 5 * HUGE, 7 * HUGE, 8 * HUGE]
    assert hugeback.runs_of(chunks) == [(0, 3 * HUGE), (5 * HUGE, HUGE), (7 * HUGE, 2 * HUGE)]


def _vm_flags(address: int) -> tuple[str, list[str]]:
    """The name and VmFlags of this process's mapping holding ``address`` (smaps)."""
    name, flags, inside = "", [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                low, high = (int(x, 16) for x in head[0].split("-"))
                inside = low <= address < high
                if inside:
                    name = head[5] if len(head) > 5 else ""
            elif inside and head[0] == "VmFlags:":
                flags = head[1:]
    return name, flags


def _mapped(path: Path, size: int) -> tuple[GuestMemory, int]:
    """``path`` mapped copy-on-write as one region whose guest address has the host address's
    2 MiB alignment (whatever address the kernel chose), and the first whole guest chunk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mem = mmap.mmap(fd, size, mmap.MAP_PRIVATE, prot)
    finally:
        os.close(fd)
    guest = c_address(mem) % HUGE
    return GuestMemory([Region(guest, size, mem)]), guest + (HUGE - guest) % HUGE


def test_back_puts_fresh_huge_page_memory_over_the_listed_holes_only(tmp_path: Path) -> None:
    size = 16 * MIB
    path = _file(tmp_path, size, {})
    memory, first = _mapped(path, size)
    region = memory.regions[0]
    host = c_address(region.mem) - region.guest_addr
    chunks = list(range(first, region.end - HUGE + 1, HUGE))
    picked, data = [chunks[1], chunks[2], chunks[5]], chunks[6]
    # written after the mapping (its pages are the file's until written): 0xAA everywhere
    # but the picked chunks, which stay holes
    with path.open("r+b") as f:
        for chunk in chunks:
            if chunk not in picked:
                f.seek(chunk - region.guest_addr)
                f.write(b"\xaa" * HUGE)
    try:
        assert hugeback.back(memory, [*picked, data], path) == 3  # data is not a hole
        for chunk in chunks:
            remapped = chunk in picked
            name, flags = _vm_flags(host + chunk)
            assert (name == str(path)) is not remapped, hex(chunk)
            assert ("hg" in flags) is remapped  # MADV_HUGEPAGE
            expected = b"\0" if remapped else b"\xaa"
            assert memory.read(chunk, 1) == memory.read(chunk + HUGE - 1, 1) == expected
        # private and writable, as the file's pages were; the file itself is untouched
        memory.write(picked[0] + 100, b"written")
        assert memory.read(picked[0] + 100, 7) == b"written"
        at = picked[0] - region.guest_addr + 100
        assert path.read_bytes()[at : at + 7] == bytes(7)
        memory.discard(picked[0], HUGE)  # the balloon: anonymous memory reads back as zeros
        assert memory.read(picked[0] + 100, 7) == bytes(7)
    finally:
        memory.close()


def test_back_leaves_memory_whose_host_address_is_not_aligned_like_the_guests(
    tmp_path: Path,
) -> None:
    path = _file(tmp_path, 3 * HUGE, {})  # all hole
    mem = mmap.mmap(-1, 3 * HUGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem[:4] = b"keep"
    host = c_address(mem)
    # guest_addr chosen so that guest chunk HUGE lands 4 KiB past a 2 MiB host boundary
    guest_addr = (host + HUGE - 4096) % HUGE
    memory = GuestMemory([Region(guest_addr, 3 * HUGE, mem)])
    try:
        assert (host + (HUGE - guest_addr)) % HUGE == 4096
        assert hugeback.holes(path, memory.size, [HUGE]) == [HUGE]  # so only alignment stops it
        assert hugeback.back(memory, [HUGE], path) == 0
        assert memory.read(guest_addr, 4) == b"keep"
        assert "hg" not in _vm_flags(host + HUGE - guest_addr)[1]
    finally:
        memory.close()


def test_back_skips_chunks_outside_guest_ram(tmp_path: Path) -> None:
    path = _file(tmp_path, 4 * MIB, {0: b"\xaa"})
    memory = GuestMemory.from_file(str(path), 4 * MIB)
    try:
        assert hugeback.back(memory, [4 * MIB, 64 * MIB], path) == 0
        assert memory.read(0, 1) == b"\xaa"
    finally:
        memory.close()


def test_a_failing_mmap_fails_the_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, 8 * MIB, {})
    memory, first = _mapped(path, 8 * MIB)

    monkeypatch.setattr(memory_module, "_mmap", lambda *args: memory_module._MAP_FAILED)
    try:
        with pytest.raises(GuestMemoryError, match=f"mmap of fresh memory at guest {first:#x}"):
            hugeback.back(memory, [first], path)
    finally:
        memory.close()
