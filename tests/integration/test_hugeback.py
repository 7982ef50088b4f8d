"""Host huge pages behind the warm heaps on real KVM (ember.snapshot.hugeback): the template
records its zero 2 MiB heap pages, every restore maps fresh memory there, and the guest's
bytes stay its own through allocation, fork and snapshot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ember import templates
from ember.sandbox import Sandbox
from ember.snapshot import MEMORY_FILE, hugeback
from tests.integration.conftest import Images, kept_snapshot

FILL = (
    "keep = bytearray({mib} << 20)\n"
    "keep[::4096] = bytes([{value}]) * len(keep[::4096])\n"
    "keep[-1] = {value}\n"
    "len(keep)"
)
CHECK = "(sum(keep[::4096]) // len(keep[::4096]), keep[-1], keep[4095])"


def _chunks(directory: Path) -> list[int]:
    return hugeback.read(directory, (directory / MEMORY_FILE).stat().st_size)


def _vmas(pid: int, memory_file: Path) -> list[tuple[int, int, bool, list[str]]]:
    """The VMM's mappings: (low, high, from the memory file, VmFlags)."""
    st = memory_file.stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    found: list[tuple[int, int, bool, list[str]]] = []
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                low, high = (int(x, 16) for x in head[0].split("-"))
                ours = head[3] == device and int(head[4]) == st.st_ino
                found.append((low, high, ours, []))
            elif head[0] == "VmFlags:" and found:
                found[-1][3].extend(head[1:])
    return found


def _guest_base(vmas: list[tuple[int, int, bool, list[str]]]) -> int:
    """Where guest address 0 is in the VMM: the lowest mapping of the memory file (its
    offset 0; RAM here is below the 32-bit gap, one region)."""
    return min(low for low, _, ours, _ in vmas if ours)


def test_the_template_records_the_zero_huge_pages_of_its_warm_heaps(images: Images) -> None:
    found = templates.find()
    chunks = _chunks(found.dir)
    # the run_code worker alone pre-faults a 64 MiB heap in 2 MiB pages, most of it zeros
    assert len(chunks) >= 8
    assert found.meta["huge_chunks"] == len(chunks)
    memory_file = found.dir / MEMORY_FILE
    assert hugeback.holes(memory_file, memory_file.stat().st_size, chunks) == chunks
    with memory_file.open("rb") as f:  # RAM is below the 32-bit gap: offset = address
        for chunk in chunks:
            f.seek(chunk)
            assert f.read(hugeback.HUGE_SIZE) == bytes(hugeback.HUGE_SIZE), hex(chunk)


def test_a_restore_puts_fresh_huge_page_memory_behind_them(images: Images) -> None:
    found = templates.find()
    chunks = _chunks(found.dir)
    with Sandbox() as sb:
        pid = sb._vmm.vmm_pid
        assert pid is not None
        vmas = _vmas(pid, found.dir / MEMORY_FILE)
        base = _guest_base(vmas)
        for chunk in chunks:
            host = base + chunk
            (vma,) = [v for v in vmas if v[0] <= host < v[1]]
            assert not vma[2] and "hg" in vma[3], hex(chunk)  # anonymous, MADV_HUGEPAGE
            assert vma[1] >= host + hugeback.HUGE_SIZE
        # and the rest of guest RAM is still the template's file, shared copy-on-write
        assert sum(high - low for low, high, ours, _ in vmas if ours) >= 256 << 20
        # the guest's heap is there, writable, and reads back what it wrote
        assert sb.run_code(FILL.format(mib=40, value=7), timeout=120).value == str(40 << 20)
        assert sb.run_code(CHECK, timeout=120).value == "(7, 7, 0)"


def test_siblings_and_a_fork_keep_their_own_heap_bytes(images: Images) -> None:
    with Sandbox() as first, Sandbox() as second:
        first.run_code(FILL.format(mib=40, value=3), timeout=120)
        second.run_code(FILL.format(mib=40, value=9), timeout=120)
        assert first.run_code(CHECK, timeout=120).value == "(3, 3, 0)"
        with first.fork() as child:  # the fork copies the VMM's memory, huge pages included
            assert child.run_code(CHECK, timeout=120).value == "(3, 3, 0)"
            child.run_code("keep[::4096] = bytes([5]) * len(keep[::4096])", timeout=120)
            assert child.run_code(CHECK, timeout=120).value == "(5, 3, 0)"
        assert first.run_code(CHECK, timeout=120).value == "(3, 3, 0)"
        assert second.run_code(CHECK, timeout=120).value == "(9, 9, 0)"


def test_a_snapshot_of_a_restored_sandbox_keeps_what_it_wrote_there(
    images: Images, template_name: str
) -> None:
    with Sandbox() as sb:
        sb.run_code(FILL.format(mib=40, value=11), timeout=120)
        sb.snapshot(template_name)
    directory = templates.templates_root() / template_name
    assert not (directory / hugeback.HUGE_FILE).exists()  # its heap is no longer zeros
    with Sandbox(template=template_name) as copy:
        assert copy.run_code(CHECK, timeout=120).value == "(11, 11, 0)"


def _data_chunks(memory_file: Path, limit: int) -> list[int]:
    """The first ``limit`` 2 MiB chunks of guest RAM that hold data in ``memory_file``."""
    size = memory_file.stat().st_size
    found: list[int] = []
    with memory_file.open("rb") as f:
        chunk = 0
        while chunk < size and len(found) < limit:
            try:
                data = os.lseek(f.fileno(), chunk, os.SEEK_DATA)
            except OSError:
                break
            chunk = data // hugeback.HUGE_SIZE * hugeback.HUGE_SIZE
            found.append(chunk)
            chunk += hugeback.HUGE_SIZE
    return found


@pytest.mark.parametrize("kind", ["garbage", "the kernel's memory"])
def test_a_wrong_huge_pages_file_changes_nothing_the_guest_sees(
    images: Images, template_name: str, kind: str
) -> None:
    directory = kept_snapshot(template_name)
    if kind == "garbage":
        body = '{"format": 1, "chunk_size": 2097152, "chunks": [4194304, 2097152]}'
    else:  # well formed, naming the chunks that hold the kernel, page tables, the agent...
        chunks = _data_chunks(directory / MEMORY_FILE, 64)
        assert len(chunks) == 64
        body = json.dumps({"format": 1, "chunk_size": hugeback.HUGE_SIZE, "chunks": chunks})
    (directory / hugeback.HUGE_FILE).write_text(body)
    with Sandbox(template=template_name) as copy:  # none is a hole: none is mapped afresh
        assert copy.run_code("kept", timeout=120).value == "42"
        assert copy.exec(["true"], timeout=120).exit_code == 0
