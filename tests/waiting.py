"""Waiting in tests: for a condition (polled, with a deadline that names what never
happened), whether a process still runs, and the zygote's child forked ahead."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ember.zygote_fork import AHEAD_NAME


def wait_for(check: Callable[[], object], seconds: float, what: str, every: float = 0.05) -> None:
    """Return once ``check()`` is true; AssertionError naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def alive(pid: int) -> bool:
    """The process runs (a zombie does not count: it has ended, only its status is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children_forked_ahead(zygote_pid: int) -> list[int]:
    """The zygote's children that wait for a request: named ``ember-ahead`` once detached
    (a VMM is ``ember-vmm``), so a child not yet detached is not one yet."""
    found = []
    for pid in Path(f"/proc/{zygote_pid}/task/{zygote_pid}/children").read_text().split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == AHEAD_NAME:
                found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def forked_ahead(zygote_pid: int, seconds: float = 30) -> int:
    """The zygote's one child forked ahead, once there is exactly one."""
    found: list[int] = []

    def one() -> bool:
        found[:] = children_forked_ahead(zygote_pid)
        return len(found) == 1

    wait_for(one, seconds, f"one child forked ahead by {zygote_pid}", every=0.01)
    return found[0]
