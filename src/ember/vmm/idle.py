"""Parking an idle sandbox: its vCPUs leave ``KVM_RUN`` until the host talks to it.

A guest with nothing to do still costs host CPU (timer interrupts, and
here every guest-kernel instruction is emulated), which a thousand idle
sandboxes multiply.  The parker runs on the event thread's tick: when no
host connection is open and the vCPUs used little CPU over the last
window, it pauses them; any host activity on vsock resumes them before
the muxer handles it.

The price, documented for users: guest background work that runs with no
connection open only progresses while the sandbox is in use or busy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ember.vmm.machine import Machine

log = logging.getLogger(__name__)

TICK_S = 0.1
PARKED_TICK_S = 2.0  # a parked VM is woken by host activity, not by the tick
BUSY_SHARE = 0.10  # above 10% of one CPU a guest is working, not idling


class IdleParker:
    def __init__(
        self, machine: Machine, host_connections: Callable[[], int], after_s: float
    ) -> None:
        self.machine = machine
        self._host_connections = host_connections
        self._after_ticks = max(1, round(after_s / TICK_S))
        self._quiet_ticks = 0
        self._last_cpu: float | None = None
        self.parks = 0

    def tick(self) -> float:
        """Event thread; returns the seconds until the next tick (long while parked, so a
        thousand parked sandboxes wake their VMMs rarely)."""
        if self.machine.paused:
            return PARKED_TICK_S
        cpu = sum(t.cpu_seconds() for t in self.machine.vcpu_threads)
        last, self._last_cpu = self._last_cpu, cpu
        if self._host_connections() or last is None or cpu - last > BUSY_SHARE * TICK_S:
            self._quiet_ticks = 0
            return TICK_S
        self._quiet_ticks += 1
        if self._quiet_ticks >= self._after_ticks:
            self._quiet_ticks = 0
            self._last_cpu = None
            try:
                self.machine.pause()
                self.parks += 1
                return PARKED_TICK_S
            except Exception as exc:  # a vCPU that will not park just keeps running
                log.warning("could not park the idle VM: %s", exc)
        return TICK_S

    def wake(self) -> None:
        """Host activity (any thread): the guest must run to answer it."""
        if self.machine.paused:
            self.machine.resume()
