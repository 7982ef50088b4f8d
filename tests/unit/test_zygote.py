"""The zygote without KVM: it forks the VMM process in a child, reports the status, and kills on
demand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ember.errors import SandboxError
from ember.vmm.config import ProcessConfig, RestoreConfig
from ember.zygote import Zygote, ZygoteChild
from ember.zygote_fork import fits
from tests.waiting import alive, forked_ahead, wait_for


def restore(snapshot: Path) -> ProcessConfig:
    return ProcessConfig(machine=RestoreConfig(snapshot))


def test_a_child_runs_the_vmm_process_and_its_status_comes_back(tmp_path: Path) -> None:
    child = Zygote.get().spawn(
        restore(tmp_path / "no-such-snapshot"),
        console=tmp_path / "console.log",
        exit_file=tmp_path / "exit",
        cgroup_procs=[],
    )
    assert child.wait(60) == 2
    log = (tmp_path / "console.log").read_text()
    assert "ember: error:" in log and "no-such-snapshot" in log  # the config arrived, typed
    assert child.poll() == 2


def test_a_malformed_config_is_refused_before_any_fork(tmp_path: Path) -> None:
    zygote = Zygote.get()
    request = {"config": {"machine": {"Nope": {}}}, "console": str(tmp_path / "log")}
    with zygote._lock:
        zygote._sock.sendall(json.dumps(request).encode() + b"\n")
        reply = zygote._sock.recv(4096)
    assert b"must be one of VmConfig or RestoreConfig" in reply
    assert not (tmp_path / "log").exists()
    with pytest.raises(SandboxError, match="could not start a VMM"):
        zygote.spawn(
            ProcessConfig(machine=RestoreConfig(tmp_path), park_idle="soon"),  # type: ignore[arg-type]
            console=tmp_path / "log",
            exit_file=tmp_path / "exit",
            cgroup_procs=[],
        )


def test_a_child_has_its_own_session_and_can_be_killed(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "state")  # reading it blocks: a VMM that never gets going
    child = Zygote.get().spawn(
        restore(tmp_path),
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
        restore(tmp_path / "nope"),
        console=tmp_path / "log",
        exit_file=tmp_path / "exit",
        cgroup_procs=[],
    )
    assert child.wait(60) == 2


def test_threads_that_all_see_the_exit_collect_it_once(tmp_path: Path) -> None:
    """A crash is noticed by the request that failed and by close() on another thread: both
    wait, both collect; the pidfd is closed exactly once (twice raised EBADF, or closed an
    fd that had been reused meanwhile)."""
    for _ in range(20):
        proc = subprocess.Popen(["true"])
        exit_file = tmp_path / f"{proc.pid}.exit"
        child = ZygoteChild(proc.pid, exit_file)
        proc.wait()
        exit_file.write_text("7")
        start = threading.Barrier(8)
        codes: list[int] = []
        errors: list[BaseException] = []

        def collect(
            child: ZygoteChild = child,
            start: threading.Barrier = start,
            codes: list[int] = codes,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                codes.append(child.wait(timeout=10))
                child.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=collect) for _ in range(8)]
        sentinel = os.open(os.devnull, os.O_RDONLY)  # an fd a second close would hit
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == [] and codes == [7] * 8
            os.fstat(sentinel)  # still open
        finally:
            os.close(sentinel)


def _forked_ahead(zygote: Zygote) -> int:
    """The zygote's one child that waits for a request (forked whenever none waits)."""
    return forked_ahead(zygote._proc.pid)


def _jailed_spawn(zygote: Zygote, tmp_path: Path, name: str) -> ZygoteChild:
    return zygote.spawn(
        restore(tmp_path / "no-such-snapshot"),
        console=tmp_path / f"{name}.log",
        exit_file=tmp_path / f"{name}.exit",
        cgroup_procs=[],
        new_pid_ns=True,
    )


def test_an_idle_zygote_forks_the_next_child_ahead_and_a_request_takes_it(
    tmp_path: Path,
) -> None:
    zygote = Zygote.get()
    waiting = _forked_ahead(zygote)
    unjailed = zygote.spawn(
        restore(tmp_path / "nope"),
        console=tmp_path / "unjailed.log",
        exit_file=tmp_path / "unjailed.exit",
        cgroup_procs=[],
    )
    assert unjailed.pid != waiting  # not in a PID namespace of its own: forked for it
    assert unjailed.wait(60) == 2
    child = _jailed_spawn(zygote, tmp_path, "jailed")
    assert child.pid == waiting  # the request went to the child forked ahead...
    assert child.wait(60) == 2  # ...which ran the VMM process on it, status and all
    log = (tmp_path / "jailed.log").read_text()
    assert "ember: error:" in log and "no-such-snapshot" in log
    assert _forked_ahead(zygote) not in (waiting, unjailed.pid)  # and the next one is there


def test_a_child_forked_ahead_that_died_waiting_is_replaced_by_a_fork(tmp_path: Path) -> None:
    zygote = Zygote.get()
    waiting = _forked_ahead(zygote)
    os.kill(waiting, signal.SIGKILL)
    wait_for(lambda: not alive(waiting), 30, "the killed child to exit")  # its pipe closes then
    child = _jailed_spawn(zygote, tmp_path, "after")
    assert child.pid != waiting
    assert child.wait(60) == 2


def test_a_child_forked_ahead_goes_with_its_zygote(tmp_path: Path) -> None:
    zygote = Zygote.get()
    waiting = _forked_ahead(zygote)
    zygote._sock.close()  # the host process is gone, for the zygote
    zygote._proc.wait(30)
    wait_for(lambda: not alive(waiting), 30, "the waiting child to go with its zygote")
    Zygote._instance = None  # the next test starts its own


def test_a_child_forked_ahead_has_left_the_hosts_network_namespace_but_not_its_mounts(
    tmp_path: Path,
) -> None:
    """The jail's new IPC, UTS and network namespaces are made while the child waits; its
    mounts stay the host's until its request (a mount made meanwhile must reach the VMM)."""
    waiting = _forked_ahead(Zygote.get())
    net = os.readlink("/proc/self/ns/net")  # left just after the child detaches: wait for it
    wait_for(lambda: os.readlink(f"/proc/{waiting}/ns/net") != net, 30, "the new namespaces")
    for ns, left in (("net", True), ("ipc", True), ("uts", True), ("mnt", False)):
        theirs = os.readlink(f"/proc/{waiting}/ns/{ns}")
        assert (theirs != os.readlink(f"/proc/self/ns/{ns}")) is left, ns


def test_a_request_with_a_tap_in_the_hosts_namespace_is_not_given_to_the_child_ahead(
    tmp_path: Path,
) -> None:
    """Such a TAP can only be opened from the host's network namespace, which the child
    forked ahead has left: that request is forked for, and the waiting child stays."""
    zygote = Zygote.get()
    waiting = _forked_ahead(zygote)
    config = ProcessConfig(machine=RestoreConfig(tmp_path / "nope", tap="ember-nosuch0"))
    child = zygote.spawn(
        config, console=tmp_path / "tap.log", exit_file=tmp_path / "tap.exit",
        cgroup_procs=[], new_pid_ns=True,
    )  # fmt: skip
    assert child.pid != waiting and child.wait(60) == 2
    assert _forked_ahead(zygote) == waiting
    in_own = ProcessConfig(machine=RestoreConfig(tmp_path / "nope", tap="t0", netns="/run/x"))
    assert fits(in_own) and not fits(config) and fits(restore(tmp_path))
