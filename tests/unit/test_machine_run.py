"""``Machine.run``'s start-up order, without KVM: the events thread serves nothing until
every thread is up and confined.

The restored VMM creates its ready file before it starts its threads (``ember.vmm.process``),
so a request (a pause for ``fork()``, a snapshot) can be waiting on the events thread's
sockets before a vCPU thread exists. It must not be served until the vCPU threads run under
their filters: a pause then found no vCPU to pause ('vCPU 0 did not pause', two CI failures
under load). Here the vCPU thread takes 0.3 s to start, every time.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from ember.vmm.event_loop import EventLoop
from ember.vmm.machine import Machine
from ember.vmm.state import StopKind, StopReason, VmState

SLOW_START_S = 0.3


class _Closeable:
    def close(self) -> None:
        pass


class _SlowVcpuThread:
    """What ``Machine.run`` needs of a vCPU thread; its start-up (``on_start``) is slow."""

    def __init__(self, log: list[str]) -> None:
        self.on_start: Callable[[], None] | None = None
        self.vcpu = _Closeable()
        self._log = log
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        time.sleep(SLOW_START_S)
        if self.on_start is not None:
            self.on_start()
        self._log.append("vcpu confined")
        self._stop.wait()

    def kick(self) -> None:
        self._stop.set()


class _Console:
    panic_line = None
    exit_status = None

    def flush(self) -> None:
        pass


def _machine(log: list[str]) -> Machine:
    machine = Machine.__new__(Machine)  # the run loop alone: no KVM, no guest
    machine.state = VmState.CREATED
    machine.events = EventLoop()
    machine.vcpu_threads = [_SlowVcpuThread(log)]  # type: ignore[list-item]
    machine._stops = queue.Queue()
    machine._lock = threading.Lock()
    machine._stats = []
    machine.slots = machine.vm = machine.memory = machine.kvm = _Closeable()  # type: ignore[assignment]
    machine.shm = None
    machine.console = _Console()  # type: ignore[assignment]
    return machine


def test_a_request_waiting_at_start_is_served_only_once_every_thread_is_confined() -> None:
    log: list[str] = []
    machine = _machine(log)
    request = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:

        def serve() -> None:  # add_eventfd has read the count
            log.append("request served")
            machine.request_stop(StopReason(StopKind.HOST_REQUEST, "served"))

        machine.events.add_eventfd(request, serve)
        os.eventfd_write(request, 1)  # there before any thread starts, as after ready
        roles: list[str] = []
        reason = machine.run(timeout=30, confine=roles.append)
    finally:
        os.close(request)
    assert reason.kind is StopKind.HOST_REQUEST, reason
    assert log == ["vcpu confined", "request served"]
    assert sorted(roles) == ["events", "main", "vcpu"]
