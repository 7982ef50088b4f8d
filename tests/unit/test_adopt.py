"""ember.agent.adopt: a Popen for a child this process did not start with Popen (no KVM)."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import time

import pytest

from ember.agent.adopt import adopt


def _child(code: int, delay: float) -> int:
    # The child starts with SIGTERM's default disposition whatever an earlier test in this
    # worker left installed: set in the child after the fork, it raced the test's SIGTERM.
    kept = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(delay)
        os._exit(code)
    signal.signal(signal.SIGTERM, kept)
    return pid


def test_an_adopted_child_is_polled_waited_for_and_reaped_like_a_started_one() -> None:
    proc = adopt(_child(7, 0.3), ["child"])
    assert proc.poll() is None and proc.returncode is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.01)
    assert proc.wait(10) == 7 and proc.returncode == 7
    assert proc.poll() == 7  # reaped once; asking again does not fail
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # gone: no zombie left


def test_an_adopted_child_killed_by_a_signal_reports_it_as_popen_does() -> None:
    proc = adopt(_child(0, 60), ["child"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM
    proc.kill()  # after the exit: nothing to signal, and no error


def test_it_sets_every_attribute_popen_init_sets() -> None:
    """Popen's methods read what its constructor set: a Python whose constructor sets more
    than adopt() does would break poll()/wait() in ways no other test here might show."""
    names = set(re.findall(r"self\.(\w+) =", inspect.getsource(subprocess.Popen.__init__)))
    proc = adopt(_child(0, 0), ["child"])
    try:
        assert names <= set(vars(proc)), names - set(vars(proc))
    finally:
        proc.wait(10)


def test_a_bad_pid_is_refused() -> None:
    with pytest.raises(ValueError, match="not a process id"):
        adopt(0, ["x"])
