"""The keeper (``ember serve``'s zygote) without KVM: it forks the next jailed VMM ahead of its
request, as the SDK's zygote does, and takes that child along when it leaves."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ember.serve.keeper import KeeperClient, keeper_pid
from ember.vmm.config import ProcessConfig, RestoreConfig
from ember.zygote_fork import AHEAD_NAME
from tests.waiting import alive, wait_for


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _forked_ahead(keeper: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = [p for p in _children(keeper) if _comm(p) == AHEAD_NAME]
        if len(waiting) == 1:
            return waiting[0]
        time.sleep(0.01)
    raise AssertionError(f"the keeper forked no child ahead: {_children(keeper)}")


def test_the_keeper_hands_a_jailed_request_to_its_child_forked_ahead(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    client = KeeperClient(state)
    try:
        keeper = keeper_pid(state)
        assert keeper is not None
        waiting = _forked_ahead(keeper)
        assert os.getsid(waiting) == waiting  # detached, as a VMM child is
        child = client.spawn(
            ProcessConfig(machine=RestoreConfig(tmp_path / "no-such-snapshot")),
            console=tmp_path / "console.log",
            exit_file=tmp_path / "exit",
            cgroup_procs=[],
            new_pid_ns=True,
        )
        assert child.pid == waiting  # the request went to the child that was waiting...
        assert child.wait(60) == 2  # ...which ran the VMM process on it, status and all
        log = (tmp_path / "console.log").read_text()
        assert "ember: error:" in log and "no-such-snapshot" in log
        after = _forked_ahead(keeper)
        assert after != waiting  # and the next one waits
    finally:
        client.close()
    # No daemon and no VMM left: the keeper leaves and its waiting child with it.
    wait_for(lambda: not alive(keeper), 30, "the keeper to leave")
    wait_for(lambda: not alive(after), 30, "the child forked ahead to go with its keeper")
