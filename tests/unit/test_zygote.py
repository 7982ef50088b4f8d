"""The zygote without KVM: it forks the CLI in a child, reports the status, and kills on demand."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ember.zygote import Zygote


def test_a_child_runs_the_cli_and_its_status_comes_back(tmp_path: Path) -> None:
    child = Zygote.get().spawn(
        ["image", "path", "no-such-artifact"],
        console=tmp_path / "console.log",
        exit_file=tmp_path / "exit",
        cgroup_procs=[],
    )
    assert child.wait(60) == 2
    assert "invalid choice" in (tmp_path / "console.log").read_text()
    assert child.poll() == 2


def test_a_child_has_its_own_session_and_can_be_killed(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "state")  # reading it blocks: a VMM that never gets going
    child = Zygote.get().spawn(
        ["boot", "--restore", str(tmp_path)],
        console=tmp_path / "console.log",
        exit_file=tmp_path / "exit",
        cgroup_procs=[],
    )
    try:
        assert child.poll() is None
        deadline = time.monotonic() + 30  # the child calls setsid() first thing, not instantly
        while os.getsid(child.pid) != child.pid and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getsid(child.pid) == child.pid
        with pytest.raises(Exception, match="vmm"):
            child.wait(0.2)
    finally:
        child.kill()
    assert child.wait(30) == -9


def test_the_zygote_is_one_per_process_and_comes_back_if_it_died(tmp_path: Path) -> None:
    first = Zygote.get()
    assert Zygote.get() is first
    first._proc.kill()
    first._proc.wait()
    second = Zygote.get()
    assert second is not first
    child = second.spawn(
        ["image", "path", "nope"],
        console=tmp_path / "log",
        exit_file=tmp_path / "exit",
        cgroup_procs=[],
    )
    assert child.wait(60) == 2
