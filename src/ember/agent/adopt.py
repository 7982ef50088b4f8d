"""A ``subprocess.Popen`` for a child the agent did not start itself.

The pool's mother forks members with ``CLONE_PARENT`` (see ``pyclone._Forker``), so each
is the agent's child although no ``Popen`` of the agent made it. Everything that hands a
member's program to the relay (:mod:`ember.agent.relay`) speaks ``Popen``: ``pid``,
``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode`` and the standard streams.
All of those rest on ``waitpid`` of the child's ``pid``, which works for any child; only
the constructor (which would start a new process) is replaced. The attributes it sets are
those ``Popen.__init__`` sets in Python 3.11, the guest's version; a test checks them
against the running interpreter's ``Popen``.
"""

from __future__ import annotations

import subprocess
import threading
from typing import Any

__all__ = ["adopt"]


class _Adopted(subprocess.Popen[bytes]):
    def __init__(self, pid: int, args: list[str]) -> None:  # no super(): it would start one
        state: dict[str, Any] = {
            "args": args,
            "pid": pid,
            "returncode": None,
            "stdin": None,
            "stdout": None,
            "stderr": None,
            "encoding": None,
            "errors": None,
            "text_mode": False,
            "pipesize": -1,
            "_waitpid_lock": threading.Lock(),
            "_input": None,
            "_communication_started": False,
            "_sigint_wait_secs": 0.25,
            "_closed_child_pipe_fds": True,
            "_child_created": True,
        }
        self.__dict__.update(state)


def adopt(pid: int, args: list[str]) -> subprocess.Popen[bytes]:
    """A ``Popen`` for ``pid``, which must be this process's child (``waitpid`` reaps it)."""
    if pid <= 0:
        raise ValueError(f"not a process id: {pid}")
    return _Adopted(pid, args)
