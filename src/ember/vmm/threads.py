"""The VMM's threads, named for the host's tools: ``top -H``, ``ps -L``, ``perf``, ``/proc``.

Python names its threads for itself only; the kernel sees every thread of a VMM as
``python``. A placement or CPU question about one sandbox (which thread used the core,
which one moved between cores) then starts with guessing. So each thread gives the
kernel its name as it starts, before its seccomp filter is installed (``prctl`` is not in
the filters): ``ember-vmm`` (the main thread, which also names the process in ``ps``),
``ember-events``, ``ember-vcpu0``...

Part of the VMM core: standard library only.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["MAIN_THREAD", "PR_SET_NAME", "TASK_COMM_LEN", "name_this_thread"]

PR_SET_NAME = 15  # <linux/prctl.h>
TASK_COMM_LEN = 16  # the kernel keeps 15 bytes and a NUL
MAIN_THREAD = "ember-vmm"

_libc = ctypes.CDLL(None, use_errno=True)


def name_this_thread(name: str | None = None) -> bool:
    """Give the calling thread's name (default: its Python name) to the kernel; False if
    the kernel refused (the name is a hint: nothing depends on it)."""
    raw = (name or threading.current_thread().name).encode("ascii", "replace")
    result: int = _libc.prctl(PR_SET_NAME, raw[: TASK_COMM_LEN - 1], 0, 0, 0)
    return result == 0
