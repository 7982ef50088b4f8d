"""The pages a zygote's child writes: learned from real children's page maps, written ahead by
a real forked process (no KVM)."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember import zygote_pages
from ember.memory import PAGE_SIZE as PAGE
from ember.vmm.config import ProcessConfig, RestoreConfig
from ember.zygote import Zygote
from ember.zygote_pages import (
    Learner,
    exclusive_pages,
    populate,
    writable_ranges,
)
from tests.waiting import forked_ahead

MAPS = """\
55d0c0000000-55d0c0002000 r--p 00000000 08:01 123 /usr/bin/python3.11
55d0c0200000-55d0c0203000 rw-p 00200000 08:01 123 /usr/bin/python3.11
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:01 77 /memfd:region (deleted)
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7f0000400000-7f0000401000 ---p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
garbage line
"""


def test_the_ranges_are_the_private_writable_mappings_but_the_stack() -> None:
    assert writable_ranges(MAPS) == [
        (0x55D0C0200000, 0x55D0C0203000),
        (0x55D0C1000000, 0x55D0C1400000),
        (0x7F0000200000, 0x7F0000300000),
    ]


@contextmanager
def _child_writing(buffer: mmap.mmap, pages: list[int]) -> Iterator[int]:
    """A forked child that writes ``pages`` of ``buffer`` (shared with us copy-on-write),
    says so, and waits to be killed."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for page in pages:
                buffer[page * PAGE] = 1
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield pid
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _buffer(pages: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for page in range(pages):
        buffer[page * PAGE] = 7  # ours, present: the child shares it until it writes
    return buffer


def test_a_childs_written_pages_are_the_exclusive_ones_in_its_page_map() -> None:
    buffer = _buffer(16)
    base = _address(buffer)
    with _child_writing(buffer, [2, 3, 11]) as pid:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        try:
            found = exclusive_pages(fd, [(base, base + 16 * PAGE)])
        finally:
            os.close(fd)
    first = base // PAGE
    assert found == {first + 2, first + 3, first + 11}


def test_written_ahead_the_pages_are_the_childs_own_and_unchanged() -> None:
    buffer = _buffer(8)
    base = _address(buffer)
    buffer[5 * PAGE + 9] = 42
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            done = populate([(base // PAGE + 4, 2), (1, 1)])  # the 2nd: not mapped
            ok = done == 2 and buffer[5 * PAGE + 9] == 42 and buffer[4 * PAGE] == 7
            os.write(ready_w, b"y" if ok else b"n")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"y"  # the bytes kept, the faults taken
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        try:
            found = exclusive_pages(fd, [(base, base + 8 * PAGE)])
        finally:
            os.close(fd)
        assert found == {base // PAGE + 4, base // PAGE + 5}
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert buffer[4 * PAGE] == 7 and buffer[5 * PAGE + 9] == 42  # ours: untouched


def test_the_learner_keeps_what_two_children_wrote_in_common(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zygote_pages, "SAMPLE_AFTER_S", 0.0)
    monkeypatch.setattr(zygote_pages, "MIN_PAGES", 2)
    buffer = _buffer(32)
    base = _address(buffer)
    learner = Learner()
    with _child_writing(buffer, [1, 2, 3, 20]) as first:
        learner.spawned(first)
        assert learner.due_in() == 0.0
        learner.sample_if_due({first})
    assert learner.runs == []  # one sample: nothing to compare yet
    with _child_writing(buffer, [2, 3, 4, 20]) as second:
        learner.spawned(second)
        learner.sample_if_due({second})
    first = base // PAGE
    assert (first + 2, 2) in learner.runs  # pages 2 and 3: both children wrote them
    assert (first + 20, 1) in learner.runs
    learned = {start + i for start, count in learner.runs for i in range(count)}
    assert not {first + 1, first + 4} & learned  # one child's own: left out
    assert learner.due_in() is None  # learned: the next sample is RESAMPLE_EVERY children on


def test_a_child_gone_or_not_ours_is_not_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zygote_pages, "SAMPLE_AFTER_S", 0.0)
    learner = Learner()
    learner.spawned(os.getpid())
    learner.sample_if_due(set())  # not among the children: it may have been reaped
    assert learner.due_in() is None and learner.runs == []
    learner.spawned(os.getpid())  # and the next child is sampled instead
    assert learner.due_in() == 0.0


def _restore(tmp_path: Path, name: str) -> tuple[Path, ProcessConfig]:
    state = tmp_path / name
    state.mkdir()
    os.mkfifo(state / "state")  # reading it blocks: a VMM that never gets going
    return state, ProcessConfig(machine=RestoreConfig(state))


def _exclusive(pid: int, zygote_pid: int) -> set[int]:
    with open(f"/proc/{zygote_pid}/maps") as f:
        ranges = writable_ranges(f.read())
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return exclusive_pages(fd, ranges)
    finally:
        os.close(fd)


def test_the_zygotes_child_forked_ahead_has_written_what_its_children_write(
    tmp_path: Path,
) -> None:
    """Two children live long enough to be sampled; the child forked ahead after that has
    already written (most of) the pages they wrote."""
    Zygote._instance = None  # a zygote of this test's own: it learns from these children only
    zygote = Zygote.get()
    zpid = zygote._proc.pid
    before = len(_exclusive(forked_ahead(zpid), zpid))
    written = []
    for name in ("a", "b", "c"):
        state, config = _restore(tmp_path, name)
        child = zygote.spawn(config, console=state / "log", exit_file=state / "exit",
                             cgroup_procs=[], new_pid_ns=True)  # fmt: skip
        time.sleep(0.5)  # sampled (it waits on its state file meanwhile)
        written.append(_exclusive(child.pid, zpid))
        child.kill()
        assert child.wait(30) == -9
    time.sleep(0.2)
    ahead = _exclusive(forked_ahead(zpid), zpid)
    common = written[1] & written[2]
    assert len(common) > 64 and len(ahead) > before + 64, (len(common), before, len(ahead))
    assert len(ahead & common) >= 0.8 * len(common), (len(ahead & common), len(common))
