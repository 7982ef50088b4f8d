"""Idle parking and the control socket, driven with a stand-in machine (no KVM)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ember.devices.virtio.balloon.device import Balloon
from ember.errors import EmberError
from ember.vmm.control import MAX_REPLY, MAX_REQUEST, ControlServer, request
from ember.vmm.event_loop import EventLoop
from ember.vmm.idle import BUSY_SHARE, TICK_S, IdleParker
from ember.vmm.machine import Machine


class FakeThread:
    def __init__(self) -> None:
        self.cpu = 0.0

    def cpu_seconds(self) -> float:
        return self.cpu


class FakeMemory:
    size = 256 << 20


class FakeVm:
    has_pit = False


class FakeMachine:
    def __init__(self) -> None:
        self.vcpu_threads = [FakeThread()]
        self.paused = False
        self.snapshots: list[tuple[bytes, bytes]] = []
        self.memory = FakeMemory()
        self.balloon = Balloon()  # never activated: no guest behind it
        self.extra_stats: dict[str, dict[str, int]] = {}
        self.vm = FakeVm()
        self.made_ahead: list[str] = []

    def host_connections(self) -> int:
        return 0

    def device_stats(self) -> dict[str, dict[str, int]]:
        return self.extra_stats

    def device(self, kind: type[object]) -> object | None:
        return self.balloon if kind is Balloon else None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def snapshot(self, state_fd: int, memory_fd: int, *, durable: bool = False) -> dict[str, Any]:
        os.write(state_fd, b"state")
        os.write(memory_fd, b"memory")
        return {"paused_ms": 1.0}


def _parker(machine: FakeMachine, connections: list[int]) -> IdleParker:
    return IdleParker(cast(Machine, machine), lambda: connections[0], after_s=3 * TICK_S)


def test_an_idle_machine_is_parked_after_the_quiet_window_and_woken() -> None:
    machine, conns = FakeMachine(), [0]
    parker = _parker(machine, conns)
    parker.tick()  # the first tick only takes a CPU reading
    for _ in range(2):
        parker.tick()
        machine.vcpu_threads[0].cpu += BUSY_SHARE * TICK_S / 10  # timer noise
    assert not machine.paused
    parker.tick()
    assert machine.paused and parker.parks == 1
    parker.wake()
    assert not machine.paused


def test_open_connections_or_guest_work_keep_it_running() -> None:
    machine, conns = FakeMachine(), [1]
    parker = _parker(machine, conns)
    for _ in range(20):
        parker.tick()
    assert not machine.paused
    conns[0] = 0
    for _ in range(20):
        machine.vcpu_threads[0].cpu += BUSY_SHARE * TICK_S * 2  # busy guest
        parker.tick()
    assert not machine.paused


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, FakeMachine]]:
    machine = FakeMachine()
    events = EventLoop()
    server = ControlServer(tmp_path / "control.sock", cast(Machine, machine), events)
    events.start()
    yield tmp_path / "control.sock", machine
    server.close()
    events.close()


def test_control_requests_reach_the_machine(
    served: tuple[Path, FakeMachine], tmp_path: Path
) -> None:
    path, machine = served
    assert request(path, "status")["paused"] is False
    assert request(path, "status")["made_ahead"] == []
    request(path, "pause")
    assert machine.paused and request(path, "status")["paused"] is True
    request(path, "resume")
    assert not machine.paused
    # the files travel as fds: the (jailed) VMM never needs the path
    files = [tmp_path / "state", tmp_path / "memory"]
    fds = [os.open(f, os.O_RDWR | os.O_CREAT) for f in files]
    try:
        assert request(path, "snapshot", fds=fds)["paused_ms"] == 1.0
    finally:
        for fd in fds:
            os.close(fd)
    assert [f.read_bytes() for f in files] == [b"state", b"memory"]
    request(path, "snapshot", path=str(tmp_path / "dir"))
    assert (tmp_path / "dir" / "memory").read_bytes() == b"memory"


def test_bad_control_requests_get_an_error_not_a_crash(served: tuple[Path, FakeMachine]) -> None:
    path, _machine = served
    with pytest.raises(EmberError, match="unknown op"):
        request(path, "explode")
    with pytest.raises(EmberError, match="needs two fds"):
        request(path, "snapshot")
    assert request(path, "status")["ok"] is True  # still serving


def test_balloon_target_pages_out_of_range_is_a_clear_error(
    served: tuple[Path, FakeMachine],
) -> None:
    """Issue 14 item 6: num_pages is le32; 2**32 once raised struct.error at every config read."""
    path, machine = served
    pages = FakeMemory.size // 4096
    for bad in (1 << 32, pages + 1, -1, True, 1.5, "7"):
        with pytest.raises(EmberError, match=f"target_pages must be an integer from 0 to {pages}"):
            request(path, "balloon", target_pages=bad)
    assert machine.balloon.target_pages == 0
    assert struct.unpack("<I", machine.balloon.read_config(0, 4)) == (0,)
    assert request(path, "balloon", target_pages=pages)["target_pages"] == pages


def test_replies_longer_than_a_request_arrive_and_oversized_ones_are_an_error(
    served: tuple[Path, FakeMachine],
) -> None:
    """Issue 14 item 6: the client once applied the 64 KiB request cap to replies (a raw
    ValueError for ever after); replies have their own cap, enforced by the server."""
    path, machine = served
    machine.extra_stats = {"Big": {f"counter_{i}": i for i in range(2 * MAX_REQUEST // 20)}}
    assert request(path, "status")["devices"] == machine.extra_stats
    machine.extra_stats = {"Huge": {f"counter_{i}": i for i in range(MAX_REPLY // 10)}}
    with pytest.raises(EmberError, match="exceeds the control socket"):
        request(path, "status")
    machine.extra_stats = {}
    assert request(path, "status")["ok"] is True  # still serving


def test_a_jailed_vmm_refuses_a_snapshot_path_instead_of_dying_on_it(tmp_path: Path) -> None:
    """Its seccomp filter kills the VMM on an open for writing: the request must not get there."""
    machine = FakeMachine()
    events = EventLoop()
    server = ControlServer(tmp_path / "c.sock", cast(Machine, machine), events, jailed=True)
    events.start()
    try:
        with pytest.raises(EmberError, match="jailed VMM sees no host path"):
            request(tmp_path / "c.sock", "snapshot", path=str(tmp_path / "dir"))
        assert not (tmp_path / "dir").exists()
        assert request(tmp_path / "c.sock", "status")["ok"] is True
    finally:
        server.close()
        events.close()
