"""The prefault file's format and the page copies it asks for, on real mappings, without KVM.

``written_pages`` reads this process's own ``/proc/self/pagemap`` over a ``MAP_PRIVATE``
mapping of a file, as the template build reads a restored VMM's; ``populate`` copies pages
of a :class:`GuestMemory` mapped from a file, as a restore does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.memory import MMIO_GAP_START, PAGE_SIZE, GuestMemory
from ember.snapshot import prefault
from ember.vmm.machine import Machine
from ember.vmm.state import VmState


def test_runs_merge_adjacent_pages_and_drop_repeats() -> None:
    assert prefault.runs_of([7, 3, 4, 5, 9, 4, 10, 11]) == [(3, 3), (7, 1), (9, 3)]
    assert prefault.runs_of([]) == []


@given(st.sets(st.integers(min_value=0, max_value=5000), max_size=300))
def test_runs_cover_exactly_the_pages_given(pages: set[int]) -> None:
    runs = prefault.runs_of(pages)
    covered = [page for first, count in runs for page in range(first, first + count)]
    assert covered == sorted(pages)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal


def test_a_written_file_reads_back(tmp_path: Path) -> None:
    prefault.write(tmp_path, [(0, 2), (10, 5)])
    assert prefault.read(tmp_path, 16 * PAGE_SIZE) == [(0, 2), (10, 5)]


def test_each_execs_set_is_a_file_of_its_own(tmp_path: Path) -> None:
    first, second = prefault.EXEC_FILES
    prefault.write(tmp_path, [(3, 4)], first)
    prefault.write(tmp_path, [(9, 1)], second)
    assert prefault.read(tmp_path, 16 * PAGE_SIZE, first) == [(3, 4)]
    assert prefault.read(tmp_path, 16 * PAGE_SIZE, second) == [(9, 1)]
    assert prefault.read(tmp_path, 16 * PAGE_SIZE) == []  # the first calls' file is apart


def test_no_file_is_no_runs(tmp_path: Path) -> None:
    assert prefault.read(tmp_path, 16 * PAGE_SIZE) == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("not json", "Expecting value"),
        ('{"format": 2, "page_size": 4096, "runs": []}', "format 1"),
        ('{"format": 1, "page_size": 65536, "runs": []}', "page size"),
        ('{"format": 1, "page_size": 4096, "runs": {"0": 1}}', "list"),
        ('{"format": 1, "page_size": 4096, "runs": [[0, 1, 2]]}', "pair"),
        ('{"format": 1, "page_size": 4096, "runs": [[0, true]]}', "pair"),
        ('{"format": 1, "page_size": 4096, "runs": [[0.5, 1]]}', "pair"),
        ('{"format": 1, "page_size": 4096, "runs": [[-1, 1]]}', "outside"),
        ('{"format": 1, "page_size": 4096, "runs": [[0, 0]]}', "empty"),
        ('{"format": 1, "page_size": 4096, "runs": [[4, 2], [5, 1]]}', "overlaps"),
        ('{"format": 1, "page_size": 4096, "runs": [[5, 1], [4, 1]]}', "overlaps"),
        ('{"format": 1, "page_size": 4096, "runs": [[15, 2]]}', "outside"),
    ],
)
def test_a_bad_file_is_ignored_with_a_warning(
    tmp_path: Path, body: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / prefault.PREFAULT_FILE).write_text(body)
    with caplog.at_level(logging.WARNING, logger=prefault.__name__):
        assert prefault.read(tmp_path, 16 * PAGE_SIZE) == []
    assert why in caplog.text


def test_too_many_runs_are_refused() -> None:
    runs = [[2 * i, 1] for i in range(prefault.MAX_RUNS + 1)]
    body = json.dumps({"format": 1, "page_size": PAGE_SIZE, "runs": runs})
    with pytest.raises(ValueError, match="at most"):
        prefault.parse(body, 4 * prefault.MAX_RUNS)


def _file(path: Path, pages: int) -> Path:
    """A file whose page ``i`` is filled with byte ``i % 251 + 1`` (no page is zero)."""
    with open(path, "wb") as f:
        for index in range(pages):
            f.write(bytes([index % 251 + 1]) * PAGE_SIZE)
    return path


def test_written_pages_are_the_private_copies_not_the_pages_read(tmp_path: Path) -> None:
    path = _file(tmp_path / "memory", 64)
    with open(path, "r+b") as f:
        mem = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        for page in (3, 4, 40):
            mem[page * PAGE_SIZE] = 0
        for page in (0, 10, 41):  # read: mapped from the page cache, shared
            assert mem[page * PAGE_SIZE + 1] != 0
        assert prefault.written_pages(os.getpid(), path) == [3, 4, 40]
    finally:
        mem.close()


def test_written_pages_count_from_the_mappings_file_offset(tmp_path: Path) -> None:
    path = _file(tmp_path / "memory", 64)
    with open(path, "r+b") as f:
        mem = mmap.mmap(
            f.fileno(), 8 * PAGE_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
            offset=32 * PAGE_SIZE,
        )  # fmt: skip
    try:
        mem[2 * PAGE_SIZE] = 0
        assert prefault.written_pages(os.getpid(), path) == [34]
    finally:
        mem.close()


@contextlib.contextmanager
def _restored(tmp_path: Path, pages: int) -> Iterator[tuple[Path, GuestMemory]]:
    """A memory file of :func:`_file`'s and guest memory mapped from it, as a restore maps it."""
    path = _file(tmp_path / "memory", pages)
    memory = GuestMemory.from_file(str(path), pages * PAGE_SIZE)
    try:
        yield path, memory
    finally:
        memory.close()


def test_populate_copies_exactly_the_runs_and_keeps_their_contents(tmp_path: Path) -> None:
    with _restored(tmp_path, 64) as (path, memory):
        assert prefault.written_pages(os.getpid(), path) == []
        assert prefault.populate(memory, [(1, 2), (30, 1), (63, 1)]) == 4
        assert prefault.written_pages(os.getpid(), path) == [1, 2, 30, 63]
        for page in (1, 2, 30, 63):
            assert memory.read(page * PAGE_SIZE, PAGE_SIZE) == bytes([page % 251 + 1]) * PAGE_SIZE


def test_populate_follows_the_file_into_the_region_above_the_gap(tmp_path: Path) -> None:
    """Guest RAM past the 32-bit MMIO gap is the second region, and the file's pages go on
    there: a run that crosses the end of the first region is split between the two."""
    below = MMIO_GAP_START // PAGE_SIZE
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.truncate((below + 4) * PAGE_SIZE)  # sparse: the pages read back as zeros
    memory = GuestMemory.from_file(str(path), (below + 4) * PAGE_SIZE)
    try:
        assert len(memory.regions) == 2
        assert prefault.populate(memory, [(below - 1, 3)]) == 3
        assert prefault.written_pages(os.getpid(), path) == [below - 1, below, below + 1]
    finally:
        memory.close()


def _machine(memory: GuestMemory, sets: list[list[prefault.Run]]) -> Machine:
    """A Machine with only what prefault_exec uses: its memory, its lock and its state (the
    rest needs KVM)."""
    machine = object.__new__(Machine)
    machine.memory = memory
    machine._lock = threading.Lock()
    machine.state = VmState.RUNNING
    machine.exec_prefault = sets
    return machine


def test_each_ask_copies_the_next_execs_set_and_says_how_many_are_left(tmp_path: Path) -> None:
    with _restored(tmp_path, 64) as (path, memory):
        memory.write(5 * PAGE_SIZE, b"\0")  # the guest wrote page 5 before the ask
        machine = _machine(memory, [[(4, 2)], [], [(20, 3)], [], []])
        assert machine.prefault_exec() == (2, 2)  # the empty sets at the end are not counted
        assert memory.read(5 * PAGE_SIZE, 2) == b"\0\6"  # and keeps what the guest wrote
        assert machine.prefault_exec() == (0, 1)  # an empty set: nothing recorded for it
        assert machine.prefault_exec() == (3, 0)
        assert machine.prefault_exec() == (0, 0)
        assert prefault.written_pages(os.getpid(), path) == [4, 5, 20, 21, 22]


def test_a_stopped_machine_copies_nothing(tmp_path: Path) -> None:
    with _restored(tmp_path, 8) as (path, memory):
        machine = _machine(memory, [[(1, 1)]])
        machine.state = VmState.STOPPED
        assert machine.prefault_exec() == (0, 0)
        assert prefault.written_pages(os.getpid(), path) == []
