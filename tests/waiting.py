"""Waiting in tests: for a condition (polled, with a deadline that names what never
happened), and whether a process still runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


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
