"""Create/exec/delete cycles through the daemon leave nothing behind: no VMM process, no
sandbox directory, no cgroup, no record, no file descriptor held by the daemon."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.serve.keeper import keeper_pid
from ember.zygote_fork import AHEAD_NAME
from tests.integration.serve_daemon import Daemon, alive, running_daemon

pytestmark = pytest.mark.kvm

# The issue asks for 200; 200 take several minutes on the shared CI host, so CI runs 8 (the
# warm-up cycle aside) and EMBER_SERVE_LEAK_CYCLES=200 runs the count.
CYCLES = int(os.environ.get("EMBER_SERVE_LEAK_CYCLES", "8"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("serve-leaks")) as d:
        yield d


def children(pid: int) -> list[int]:
    """``pid``'s children but the one it forked ahead of the next create (zygote_fork)."""
    return [p for p in _all_children(pid) if _comm(p) != AHEAD_NAME]


def _all_children(pid: int) -> list[int]:
    return [int(p) for t in Path(f"/proc/{pid}/task").iterdir()
            for p in (t / "children").read_text().split()]  # fmt: skip


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""  # gone since: a VMM that just exited still counts (the race is ours)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_create_delete_cycles_leak_nothing(daemon: Daemon) -> None:
    assert daemon.proc is not None
    with daemon.client() as api:

        def cycle() -> dict[str, object]:
            sid = api.post("/sandboxes", json={"cpus": 1, "pids": 512}).json()["id"]
            rec: dict[str, object] = json.loads(
                (daemon.state_dir / "sandboxes" / f"{sid}.json").read_text()
            )
            reply = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["true"]})
            assert reply.json()["exit_code"] == 0
            usage = api.get(f"/sandboxes/{sid}/metrics").json()  # from its cgroup
            assert usage["cpu_seconds"] > 0 and usage["state"] == "running"
            assert usage["memory_bytes"] > 0  # the cgroup's memory.current
            assert api.delete(f"/sandboxes/{sid}").status_code == 204
            return rec

        cycle()  # warm: the keeper, the daemon's thread pool and connection
        keeper = keeper_pid(daemon.state_dir)
        assert keeper is not None
        fds_before = fds(daemon.proc.pid)
        records = [cycle() for _ in range(CYCLES)]
        fds_after = fds(daemon.proc.pid)
    assert children(keeper) == []
    ahead = [p for p in _all_children(keeper) if _comm(p) == AHEAD_NAME]
    assert len(ahead) == 1, ahead  # one waits for the next create: one, never a pile
    for rec in records:
        assert not alive(int(str(rec["pid"])))
        assert not Path(str(rec["dir"])).exists()
        assert rec["cgroup"] is not None
        for d in rec["cgroup"]["dirs"].values():  # type: ignore[index]
            assert not Path(d).exists()
    assert list((daemon.state_dir / "sandboxes").iterdir()) == []
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
