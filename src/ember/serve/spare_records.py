"""``ember serve --spares N``: the daemon's spare sandboxes, on record until taken.

A daemon's VMMs are forked by its keeper, which outlives it, so a spare (a sandbox
restored and warmed ahead of time, :mod:`ember.sandbox.spares`) would outlive a crashed
daemon too: nobody's sandbox, never adopted, keeping the keeper alive. So each spare gets a
record in the state directory while it waits (metadata ``ember.spare``), removed when it is
taken (the sandbox it becomes gets its own record, as any other) or closed; the next daemon
kills the spares a crashed one left before it re-adopts anything else. Spares are never
listed, never timed out, and never re-adopted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from ember.sandbox import spares
from ember.serve import adopt
from ember.serve.state import Record, StateDir, new_id

SPARE = "ember.spare"  # the metadata key that marks a spare's record


def is_spare(record: Record) -> bool:
    return record.metadata.get(SPARE) == "1"


def kill_left(state: StateDir, record: Record, keeper: int | None) -> None:
    """A spare a crashed daemon left: kill its VMM (if it is still the keeper's child),
    remove its cgroup and directory, and its record."""
    if adopt.alive(record, keeper):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
    adopt.discard(record)
    state.remove(record.id)


class SpareRecords:
    """The :class:`ember.sandbox.spares.Watcher` of a daemon: one record per waiting spare."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._ids: dict[int, str] = {}  # id(warm) -> its record's id
        self._lock = threading.Lock()

    def made(self, warm: spares.Warm) -> None:
        vmm = warm.vmm
        assert vmm.proc is not None
        record = Record(
            id=new_id(), dir=str(vmm.dir), pid=vmm.proc.pid, template="spare",
            created_at=time.time(), metadata={SPARE: "1"},
            cgroup=adopt.cgroup_record(vmm.cgroup),
        )  # fmt: skip
        self.state.save(record)
        with self._lock:
            self._ids[id(warm)] = record.id

    def taken(self, warm: spares.Warm) -> None:
        self._forget(warm)

    def gone(self, warm: spares.Warm) -> None:
        self._forget(warm)

    def _forget(self, warm: spares.Warm) -> None:
        with self._lock:
            record_id = self._ids.pop(id(warm), None)
        if record_id is not None:
            self.state.remove(record_id)
