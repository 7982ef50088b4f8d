"""The host's wall clock, known in the guest from its TSC and the pair the VMM publishes.

A restored guest's first request carries the host's ``CLOCK_REALTIME`` as of the moment it
was sent (``ember.agent.resume``), but reaches the agent tens of ms later here (a restored
guest's first request pays its first touches), so a clock stepped to that stamp stays that
far behind: 40-90 ms, measured. The VMM writes a pair into the shared region's header before
any vCPU runs (``ember.vmm.shm``): the guest's TSC and the host's realtime at one instant,
and the TSC's rate. The TSC is constant and counts on while the guest waits, is parked or is
paused, so ``realtime = pair_realtime + (rdtsc() - pair_tsc) / rate`` is the host's wall
clock whenever it is computed, to a few microseconds, whatever a request's transit time.

``rdtsc`` runs in user mode without an exit (on hardware KVM and under kvm_pvm alike);
Python has no way to issue it, so :class:`TscClock` maps ten bytes of x86-64 code into an
executable page once, in the template, and calls them through ``ctypes``. On another
architecture, or where that fails, :meth:`TscClock.realtime_ns` is ``None`` and callers keep
the host's stamp.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["RDTSC_CODE", "TscClock", "realtime_from_pair", "region_pair"]

#: rdtsc; shl rdx, 32; or rax, rdx; ret  (the 64-bit counter in rax)
RDTSC_CODE = bytes.fromhex("0f3148c1e2204809d0c3")
#: A pair older than this is not trusted: a TSC read that far from its pair has passed
#: through a host suspend or a migration the VMM did not republish for.
MAX_PAIR_AGE_NS = 30 * 24 * 3600 * 10**9


def realtime_from_pair(tsc: int, pair_tsc: int, pair_realtime_ns: int, khz: int) -> int | None:
    """The host's realtime at TSC ``tsc``, from the pair; ``None`` for a pair that cannot be
    right (no rate, a TSC before the pair's, an answer past :data:`MAX_PAIR_AGE_NS`)."""
    if khz <= 0 or pair_tsc <= 0 or pair_realtime_ns <= 0 or tsc < pair_tsc:
        return None
    elapsed_ns = (tsc - pair_tsc) * 1_000_000 // khz
    if elapsed_ns > MAX_PAIR_AGE_NS:
        return None
    return pair_realtime_ns + elapsed_ns


class TscClock:
    """``rdtsc`` from Python, and the host's realtime computed from the region's pair."""

    def __init__(
        self,
        header: Callable[[], tuple[int, int, int] | None],
        rdtsc: Callable[[], int] | None = None,
    ) -> None:
        """``header`` returns the region's pair ``(tsc, realtime_ns, khz)`` as it is now
        (``None``: no region); read at each use, since a restore rewrites it. ``rdtsc``
        replaces the instruction (tests)."""
        self._header = header
        self._rdtsc: Callable[[], int] | None = rdtsc
        self._keep: object = None
        if rdtsc is None and os.uname().machine == "x86_64":
            self._rdtsc = self._map_rdtsc()

    def _map_rdtsc(self) -> Callable[[], int] | None:
        try:
            import ctypes
            import mmap

            page = mmap.mmap(
                -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
            )
            page.write(RDTSC_CODE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            function = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
            first, second = function(), function()
        except (ImportError, OSError, ValueError, TypeError, AttributeError):
            return None
        if not 0 < first <= second:
            return None  # not a counter: leave the clock to the host's stamp
        self._keep = (page, function)  # the page must outlive every call
        return lambda: int(function())

    def rdtsc(self) -> int | None:
        return self._rdtsc() if self._rdtsc is not None else None

    def realtime_ns(self) -> int | None:
        """The host's ``CLOCK_REALTIME`` now, or ``None`` (no pair, no ``rdtsc``)."""
        if self._rdtsc is None:
            return None
        pair = self._header()
        if pair is None:
            return None
        pair_tsc, pair_realtime_ns, khz = pair
        return realtime_from_pair(self._rdtsc(), pair_tsc, pair_realtime_ns, khz)


def region_pair() -> tuple[int, int, int] | None:
    """The pair in this guest's shared region (mapped once; ``None`` without a region)."""
    from ember.agent import shm

    found = shm.region()
    return found.clock_pair() if found is not None else None
