"""The daemon's reaper without a VM: timeouts on a clock a host's clock step cannot move, and
a VMM a pause ended on purpose is not a crash of the sandbox resumed in its place."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from ember.errors import SandboxCrashed
from ember.sandbox import Sandbox
from ember.serve.manager import Entry, Manager, NotFound, State
from ember.serve.state import Record, StateDir, new_id


class FakeVmm:
    def __init__(self) -> None:
        self.gone = False
        self.on_exited: Any = None  # run when the reaper asks, as a racing request would

    def exited(self) -> bool:
        if self.on_exited is not None:
            self.on_exited()
        return self.gone

    def crashed(self, what: str) -> SandboxCrashed:
        return SandboxCrashed(f"{what}: VMM exit status 1", "")

    def console_tail(self) -> str:
        return "the tail"

    def snapshot(self, path: Path, *, durable: bool) -> None:
        (path / "state").write_text("snapshot")


class FakeSandbox:
    def __init__(self) -> None:
        self._vmm = FakeVmm()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def add(manager: Manager, sandbox: FakeSandbox, **fields: Any) -> Entry:
    record = Record(id=new_id(), dir="/nonexistent", pid=0, template="default",
                    created_at=manager.clock.now(), **fields)  # fmt: skip
    manager.state.save(record)
    entry = Entry(record, cast(Sandbox, sandbox))
    manager._entries[record.id] = entry
    return entry


def stored(manager: Manager, sandbox_id: str) -> Record:
    """The record as a restarted daemon would read it."""
    return next(r for r in manager.state.load_all() if r.id == sandbox_id)


@pytest.fixture
def manager(tmp_path: Path) -> Manager:
    return Manager(StateDir(tmp_path / "state"))  # not started: no keeper, no reaper thread


def shift(monkeypatch: pytest.MonkeyPatch, name: str, seconds: float) -> None:
    real = getattr(time, name)
    monkeypatch.setattr(time, name, lambda: real() + seconds)


def test_a_vmm_that_exited_marks_its_sandbox_crashed(manager: Manager) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox)
    assert manager.reap_once() == [] and entry.state is State.RUNNING
    sandbox._vmm.gone = True
    assert manager.reap_once() == []
    assert entry.state is State.CRASHED and sandbox.closed
    assert entry.error == "the VMM exited: VMM exit status 1" and entry.console == "the tail"
    assert not (manager.state.records / f"{entry.record.id}.json").exists()


def test_a_sandbox_resumed_while_the_reaper_looked_is_left_running(manager: Manager) -> None:
    """The reaper reads the entry's sandbox without its lock; a pause ends that VMM (on
    purpose) and a resume puts a new sandbox in its place before the reaper acts."""
    paused, resumed = FakeSandbox(), FakeSandbox()
    entry = add(manager, paused)

    def pause_and_resume() -> None:
        paused._vmm.gone, paused.closed = True, True
        entry.sandbox = cast(Sandbox, resumed)

    paused._vmm.on_exited = pause_and_resume
    manager.reap_once()
    assert entry.state is State.RUNNING and entry.sandbox is resumed
    assert not resumed.closed
    assert (manager.state.records / f"{entry.record.id}.json").exists()


def test_a_crash_seen_by_a_request_is_not_pinned_on_the_next_sandbox(manager: Manager) -> None:
    old, new = FakeSandbox(), FakeSandbox()
    entry = add(manager, old)
    entry.sandbox = cast(Sandbox, new)  # resumed after the request saw ``old`` fail
    manager.mark_crashed(entry, "gone", "", seen=cast(Sandbox, old))
    assert entry.state is State.RUNNING and not new.closed
    manager.mark_crashed(entry, "gone", "", seen=cast(Sandbox, new))
    assert entry.state is State.CRASHED and new.closed


def test_a_wall_clock_step_neither_kills_early_nor_keeps_late(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, expires_at=manager.clock.now() + 600)
    shift(monkeypatch, "time", 3600)  # an NTP step forward, an hour
    assert manager.reap_once() == [] and not sandbox.closed
    shift(monkeypatch, "monotonic", 601)  # the ten minutes do pass
    assert manager.reap_once() == [entry.record.id]
    assert sandbox.closed and entry.record.id not in {e.record.id for e in manager.find()}


def test_idleness_is_counted_on_the_monotonic_clock(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, idle_timeout=60.0)
    shift(monkeypatch, "time", 3600)
    assert manager.reap_once() == []
    shift(monkeypatch, "monotonic", 30)
    assert manager.reap_once() == []
    entry.streams = 1  # a stream open: never idle
    shift(monkeypatch, "monotonic", 120)
    assert manager.reap_once() == []
    entry.streams = 0
    assert manager.reap_once() == [entry.record.id] and sandbox.closed


def test_a_paused_on_timeout_sandbox_is_paused_not_killed(manager: Manager) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, expires_at=manager.clock.now() - 1, on_timeout="pause")
    events: list[tuple[str, str]] = []
    manager._on_event = listener(entry, lambda event, rid: events.append((event, rid)))
    assert manager.reap_once() == [entry.record.id]
    assert entry.state is State.PAUSED and entry.sandbox is None and sandbox.closed
    assert entry.record.paused and entry.record.expires_at is None
    assert (manager.state.paused_dir(entry.record.id) / "state").read_text() == "snapshot"
    assert stored(manager, entry.record.id).paused  # what a restarted daemon reads
    assert events == [("paused", entry.record.id), ("reaped", entry.record.id)]
    assert manager.reap_once() == []  # paused, it waits for a resume: no timeout left


def listener(entry: Entry, record: Callable[[str, str], object]) -> Callable[[str, str], None]:
    """An event listener that takes the entry's lock, as any that calls back into the
    manager does: the manager must have let go of the lock before it sends an event (as it
    did before the reaper acted under the lock), or the listener would wait forever."""

    def on_event(event: str, sandbox_id: str) -> None:
        assert entry.lock.acquire(timeout=5), f"{event}: sent with the entry's lock held"
        entry.lock.release()
        record(event, sandbox_id)

    return on_event


def interleave(
    monkeypatch: pytest.MonkeyPatch, manager: Manager, meanwhile: Callable[[], object]
) -> None:
    """Run ``meanwhile`` right after the reaper's first look at a sandbox, as a request
    on another thread could: before it acts."""
    real = manager._overdue
    done = False

    def look(entry: Entry) -> str | None:
        nonlocal done
        why = real(entry)
        if not done:
            done = True
            meanwhile()
        return why

    monkeypatch.setattr(manager, "_overdue", look)


def test_a_timeout_extended_after_the_reaper_looked_is_kept(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, expires_at=manager.clock.now() - 1)
    interleave(monkeypatch, manager, lambda: manager.set_timeout(entry.record.id, 3600))
    assert manager.reap_once() == []
    assert not sandbox.closed and manager.get(entry.record.id) is entry
    assert stored(manager, entry.record.id).expires_at == entry.record.expires_at


def test_a_call_after_the_idle_reaper_looked_keeps_the_sandbox(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, idle_timeout=60.0)
    entry.last_active -= 120
    interleave(monkeypatch, manager, lambda: manager.running(entry.record.id))
    assert manager.reap_once() == []
    assert not sandbox.closed and manager.get(entry.record.id) is entry


def test_a_sandbox_deleted_after_the_reaper_looked_is_not_reaped_again(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = FakeSandbox()
    entry = add(manager, sandbox, expires_at=manager.clock.now() - 1)
    events: list[str] = []
    manager._on_event = listener(entry, lambda event, _rid: events.append(event))
    interleave(monkeypatch, manager, lambda: manager.delete(entry.record.id))
    assert manager.reap_once() == []
    assert sandbox.closed and events == ["deleted"]
    with pytest.raises(NotFound):
        manager.delete(entry.record.id)
