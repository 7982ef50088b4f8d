"""A sampling profiler for the guest: where do a sandbox's vCPUs spend their time?

On a host whose guest kernel runs emulated (kvm_pvm), a request's cost is mostly guest kernel
code, and no guest tool can see it cheaply (``perf`` in the guest would itself run emulated).
The VMM can: its event thread kicks each vCPU out of ``KVM_RUN`` ``hz`` times a second (the
same ``immediate_exit`` + signal kick that pauses a vCPU); the vCPU thread reads its own RIP and
runs on. No thread is started for it (the jail's seccomp filter allows none after set-up). The
counts by RIP come back through the control socket (``profile-start`` / ``profile-stop``);
``bench/profile.py`` names them against the guest kernel's symbol table.

A sample costs the guest one exit (~10-30 us here), so 1 kHz slows it by a few percent. Only
the sandbox's owner reaches the control socket, and a RIP tells the owner nothing the guest
could hide from them.
"""

from __future__ import annotations

from typing import Protocol

from ember.vmm.event_loop import EventLoop

__all__ = ["MAX_HZ", "GuestProfiler", "Sampled"]

MAX_HZ = 10_000.0
MAX_REPORTED = 4000  # distinct RIPs in a report (the rest are summed into "other")


class Sampled(Protocol):
    """What the profiler needs of a vCPU thread (``ember.vmm.vcpu.VcpuThread``)."""

    samples: dict[int, int] | None

    def sample(self) -> None: ...


class GuestProfiler:
    """Samples ``threads`` from ``events`` (on its thread) until :meth:`stop`."""

    def __init__(self, events: EventLoop, threads: list[Sampled], hz: float) -> None:
        if not 1.0 <= hz <= MAX_HZ:
            raise ValueError(f"hz must be within 1..{MAX_HZ:g}")
        self._events = events
        self._threads = threads
        for t in threads:
            t.samples = {}
        self._handle = events.call_every(1.0 / hz, self._kick)

    def _kick(self) -> None:
        for t in self._threads:
            t.sample()

    def stop(self) -> dict[str, object]:
        """End sampling; the counts by RIP (hex) over all vCPUs, busiest first."""
        self._events.cancel(self._handle)
        merged: dict[int, int] = {}
        for t in self._threads:
            for rip, count in (t.samples or {}).items():
                merged[rip] = merged.get(rip, 0) + count
            t.samples = None
        ranked = sorted(merged.items(), key=lambda kv: -kv[1])
        kept = ranked[:MAX_REPORTED]
        return {
            "samples": {f"{rip:x}": count for rip, count in kept},
            "other": sum(count for _, count in ranked[MAX_REPORTED:]),
            "total": sum(merged.values()),
        }
