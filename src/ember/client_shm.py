"""The SDK's side of memory channels: the sandbox's shared region, mapped here, and its slots.

The VMM hands its region's memfd and the slots' doorbell eventfds over the control
socket (``{"op": "shm"}``, see ``ember.vmm.shm``); this process maps the memfd
``MAP_SHARED``, so a guest record is read straight from the memory the guest wrote
it into: no relay through the VMM, one copy (into the ``bytes`` handed to the
user). Each channel that asks for a ring *leases* a free slot: the host resets its
control page (empty ring, its own capacity, a fresh random lease) before telling
the guest, and zeroes the lease again when the channel ends, so a producer that
keeps writing after its end sees it lost the slot.

Every number read from the region is the guest's and is checked by
:class:`ember.ring.RingReader` against this side's own geometry.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ember import ring
from ember.errors import EmberError

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One slot, leased to one channel."""

    slot: int
    token: int
    reader: ring.RingReader
    doorbell: int  # eventfd, readable when the guest rang (the region's, not to be closed)


class HostRegion:
    """A sandbox's region as this process maps it; thread-safe leasing of its slots."""

    def __init__(self, memfd: int, doorbells: list[int], size: int, slot_size: int) -> None:
        if size != ring.region_size(len(doorbells), slot_size) or slot_size % ring.PAGE:
            raise ValueError("the VMM described a region this SDK does not lay out")
        self._mem = mmap.mmap(memfd, size, mmap.MAP_SHARED)
        self._doorbells = doorbells
        self._slot_size = slot_size
        self._lock = threading.Lock()
        self._free = list(range(len(doorbells)))
        self._views: dict[int, tuple[memoryview, memoryview, memoryview]] = {}
        self._closed = False
        self.leases = 0  # slots handed out so far (tests and benchmarks read it)

    @classmethod
    def from_vmm(cls, control_path: Path | str) -> HostRegion | None:
        """Ask the VMM for its region; None when it has none (or is an older VMM)."""
        from ember.vmm import control

        try:
            reply, fds = control.request_fds(control_path, "shm", timeout=10.0)
        except EmberError as exc:
            log.debug("no memory channels: %s", exc)
            return None
        try:
            size, slot_size = int(reply["size"]), int(reply["slot_size"])
            if len(fds) != 1 + int(reply["slot_count"]):
                raise ValueError(f"{len(fds)} fds for {reply['slot_count']} slots")
            region = cls(fds[0], fds[1:], size, slot_size)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("the VMM's memory channel region is unusable: %s", exc)
            for fd in fds:
                os.close(fd)
            return None
        os.close(fds[0])  # the mapping keeps the memory
        return region

    def lease(self, max_message: int) -> Lease | None:
        """A free slot made an empty ring, or None when all are in use (use vsock)."""
        with self._lock:
            if self._closed or not self._free:
                return None
            slot = self._free.pop(0)
            if slot not in self._views:
                offset = ring.SLOT_BASE + slot * self._slot_size
                whole = memoryview(self._mem)[offset : offset + self._slot_size]
                self._views[slot] = (whole, whole[: ring.PAGE].cast("Q"), whole[ring.PAGE :])
            _, ctl, data = self._views[slot]
            reader = ring.RingReader(ctl, data, self._slot_size - ring.PAGE, max_message)
            token = secrets.randbits(63) | 1
            reader.reset(token)
            self.leases += 1
            return Lease(slot, token, reader, self._doorbells[slot])

    def release(self, lease: Lease) -> None:
        """The channel ended: the slot's producer loses its lease; the slot is free again."""
        with self._lock:
            if self._closed:
                return
            offset = ring.SLOT_BASE + lease.slot * self._slot_size
            words = memoryview(self._mem)[offset : offset + ring.PAGE].cast("Q")
            words[ring.LEASE] = 0
            words.release()
            with contextlib.suppress(OSError):
                os.read(lease.doorbell, 8)  # a stale ring must not wake the next user
            self._free.append(lease.slot)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for whole, ctl, data in self._views.values():
                for view in (data, ctl, whole):
                    view.release()
            self._views.clear()
            try:
                self._mem.close()
            except BufferError:  # a reader thread still holds a view: unmapped at exit
                pass
            for fd in self._doorbells:
                os.close(fd)
