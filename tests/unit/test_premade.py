"""A restore's memory made ahead of its request (``ember.snapshot.premade``), without KVM:
taken only for the same snapshot, unchanged since; otherwise unmapped and made again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.errors import SnapshotError
from ember.memory import GuestMemory
from ember.snapshot import MEMORY_FILE, STATE_FILE, premade


class FakeMemory:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeMemory]]:
    """:func:`premade.load` made fakes: each memory it mapped, in order."""
    mapped: list[FakeMemory] = []

    def load(directory: Path) -> tuple[dict[str, Any], FakeMemory]:
        (directory / STATE_FILE).read_bytes()  # a missing file fails as the real one does
        mapped.append(FakeMemory())
        return {"from": str(directory)}, mapped[-1]

    monkeypatch.setattr(premade, "load", load)
    yield mapped
    premade.discard()


def _snapshot(path: Path) -> Path:
    path.mkdir()
    (path / STATE_FILE).write_bytes(b"state")
    (path / MEMORY_FILE).write_bytes(b"\0" * 4096)
    return path


def test_the_same_snapshot_unchanged_is_taken_once(tmp_path: Path, made: list[FakeMemory]) -> None:
    snap = _snapshot(tmp_path / "t")
    assert premade.prepare(snap)
    taken = premade.take(snap)
    assert taken is not None and taken.state == {"from": str(snap)} and taken.memory is made[0]
    assert taken.vm is None  # none asked for
    assert not made[0].closed  # the restore owns it now
    assert premade.take(snap) is None  # once


def test_another_snapshot_makes_it_again_and_unmaps_what_was_made(
    tmp_path: Path, made: list[FakeMemory]
) -> None:
    assert premade.prepare(_snapshot(tmp_path / "a"))
    assert premade.take(_snapshot(tmp_path / "b")) is None
    assert made[0].closed


@pytest.mark.parametrize("change", ["renamed over", "appended", "written in place", "hint added"])
def test_a_snapshot_changed_since_is_not_taken(
    tmp_path: Path, made: list[FakeMemory], change: str
) -> None:
    snap = _snapshot(tmp_path / "t")
    assert premade.prepare(snap)
    memory = snap / MEMORY_FILE
    if change == "renamed over":  # how Ember writes a template again: a new inode
        (snap / "new").write_bytes(memory.read_bytes())
        os.replace(snap / "new", memory)
    elif change == "appended":
        with memory.open("ab") as f:
            f.write(b"\0" * 4096)
    elif change == "written in place":  # same size, mtime put back: the ctime still moves
        st = memory.stat()
        with memory.open("r+b") as f:
            f.write(b"\1")
        os.utime(memory, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a template build records its prefault hint after its first restore
        (snap / "prefault.json").write_text("{}")
    assert premade.take(snap) is None
    assert made[0].closed


def test_nothing_is_kept_when_making_it_fails(tmp_path: Path, made: list[FakeMemory]) -> None:
    snap = tmp_path / "missing"
    snap.mkdir()
    assert not premade.prepare(snap)  # no state file: the restore will say so
    assert premade.take(snap) is None and made == []


class FakeVm:
    def __init__(self, memory: FakeMemory, log: list[str]) -> None:
        self.memory = memory
        self.log = log

    def close(self) -> None:
        assert not self.memory.closed  # the VM goes before the memory its slots map
        self.log.append("vm closed")


def test_the_vm_is_made_on_that_memory_and_closed_with_it(
    tmp_path: Path, made: list[FakeMemory]
) -> None:
    log: list[str] = []

    def make_vm(state: dict[str, Any], memory: Any) -> FakeVm:
        assert state == {"from": str(snap)} and memory is made[-1]
        return FakeVm(memory, log)

    snap = _snapshot(tmp_path / "t")
    assert premade.prepare(snap, make_vm)
    taken = premade.take(snap)
    assert taken is not None and isinstance(taken.vm, FakeVm) and taken.vm.memory is made[0]
    assert log == []  # the restore's now
    assert premade.prepare(snap, make_vm)
    assert premade.take(tmp_path) is None  # another directory: both go, the VM first
    assert log == ["vm closed"] and made[1].closed


def test_a_vm_that_cannot_be_made_leaves_the_memory_made(
    tmp_path: Path, made: list[FakeMemory]
) -> None:
    def make_vm(state: dict[str, Any], memory: Any) -> FakeVm:
        raise OSError("no /dev/kvm")

    snap = _snapshot(tmp_path / "t")
    assert premade.prepare(snap, make_vm)
    taken = premade.take(snap)
    assert taken is not None and taken.vm is None and taken.memory is made[0]


def test_a_second_prepare_unmaps_the_first(tmp_path: Path, made: list[FakeMemory]) -> None:
    assert premade.prepare(_snapshot(tmp_path / "a"))
    assert premade.prepare(_snapshot(tmp_path / "b"))
    assert made[0].closed and not made[1].closed


def test_a_missing_memory_file_is_the_restores_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="has no memory file"):
        premade.restore_memory(tmp_path, 1 << 20)


def test_restore_memory_maps_the_file_copy_on_write(tmp_path: Path) -> None:
    size = 2 << 20
    (tmp_path / MEMORY_FILE).write_bytes(b"\x5a" * size)
    memory = premade.restore_memory(tmp_path, size)
    try:
        assert isinstance(memory, GuestMemory) and memory.size == size
        region = memory.regions[0]
        assert region.mem[:4] == b"\x5a" * 4
        region.mem[:4] = b"mine"  # private: the file keeps its bytes
    finally:
        memory.close()
    assert (tmp_path / MEMORY_FILE).read_bytes()[:4] == b"\x5a" * 4


def test_a_recheck_lets_go_of_a_template_removed_meanwhile(
    tmp_path: Path, made: list[FakeMemory]
) -> None:
    snap = _snapshot(tmp_path / "t")
    assert premade.prepare(snap)
    assert premade.recheck() and not made[0].closed  # unchanged: kept
    (snap / MEMORY_FILE).unlink()  # `ember template rm`, a prune
    assert not premade.recheck() and made[0].closed  # its memory file is let go at once
    assert premade.take(snap) is None
    assert not premade.recheck()  # nothing made: nothing to check
