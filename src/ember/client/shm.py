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
import errno
import logging
import mmap
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember import ring
from ember.client.sockets import read_frame
from ember.errors import EmberError, ProtocolError
from ember.protocol import Kind
from ember.ring import RingError, RingReader

log = logging.getLogger(__name__)

SPIN_S = 50e-6  # how long a receiving thread polls a dry ring before it sleeps
SLEEP_S = 0.1  # a sleeping receiver looks again at least this often (a lost doorbell)


@dataclass
class Lease:
    """One slot, leased to one channel."""

    slot: int
    token: int
    reader: ring.RingReader
    doorbell: int  # eventfd, readable when the guest rang (the region's, not to be closed)


class HostRegion:
    """A sandbox's region as this process maps it; thread-safe leasing of its slots."""

    def __init__(
        self,
        memfd: int,
        doorbells: list[int],
        size: int,
        slot_size: int,
        *,
        code: bool = False,
        guest_bell: int = -1,
    ) -> None:
        if size != ring.region_size(len(doorbells), slot_size) or slot_size % ring.PAGE:
            raise ValueError("the VMM described a region this SDK does not lay out")
        if code and len(doorbells) <= ring.CODE_SLOTS:
            raise ValueError("a region with code rings needs a slot for channels too")
        self._mem = mmap.mmap(memfd, size, mmap.MAP_SHARED)
        # The header's generation, read once: the VMM writes the header before it hands the
        # memfd out, and a region belongs to one VMM (a restore or fork has one of its own).
        offset = ring.H_GENERATION * 8
        self.generation = int.from_bytes(self._mem[offset : offset + 8], "little")
        self._doorbells = doorbells
        # Written to wake the guest's run_code worker (ember.vmm.shm): -1 from an older VMM.
        self.guest_bell = guest_bell
        self._slot_size = slot_size
        self._lock = threading.Lock()
        # With ``code``, the last slots are run_code's (ember.client.code_ring), never leased.
        self.code = code
        self._free = list(range(len(doorbells) - (ring.CODE_SLOTS if code else 0)))
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
            count = int(reply["slot_count"])
            bell = reply.get("guest_bell") is True
            if len(fds) != 1 + count + int(bell):
                raise ValueError(f"{len(fds)} fds for {count} slots")
            region = cls(
                fds[0], fds[1 : 1 + count], size, slot_size, code=count > ring.CODE_SLOTS,
                guest_bell=fds[1 + count] if bell else -1,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("the VMM's memory channel region is unusable: %s", exc)
            for fd in fds:
                os.close(fd)
            return None
        os.close(fds[0])  # the mapping keeps the memory
        return region

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def slot_count(self) -> int:
        return len(self._doorbells)

    def lease(self, max_message: int) -> Lease | None:
        """A free slot made an empty ring, or None when all are in use (use vsock)."""
        with self._lock:
            if self._closed or not self._free:
                return None
            slot = self._free.pop(0)
            ctl, data = self._view(slot)
            reader = ring.RingReader(ctl, data, self._slot_size - ring.PAGE, max_message)
            token = secrets.randbits(63) | 1
            reader.reset(token)
            self.leases += 1
            return Lease(slot, token, reader, self._doorbells[slot])

    def slot(self, index: int) -> tuple[memoryview, memoryview, int]:
        """Slot ``index``'s control words, data area and doorbell eventfd (code rings)."""
        with self._lock:
            if self._closed:
                raise ValueError("the region is closed")
            ctl, data = self._view(index)
            return ctl, data, self._doorbells[index]

    def _view(self, index: int) -> tuple[memoryview, memoryview]:
        """Slot ``index`` as control words and data (lock held; views made once)."""
        if index not in self._views:
            offset = ring.SLOT_BASE + index * self._slot_size
            whole = memoryview(self._mem)[offset : offset + self._slot_size]
            self._views[index] = (whole, whole[: ring.PAGE].cast("Q"), whole[ring.PAGE :])
        _, ctl, data = self._views[index]
        return ctl, data

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
            if self.guest_bell >= 0:
                os.close(self.guest_bell)
                self.guest_bell = -1


class LazyRegion:
    """A sandbox's one :class:`HostRegion`, asked of the VMM at first use, by whichever of
    its users (channels, code rings, file transfers) comes first: one mapping, and one
    pool of leases, so two users never lease the same slot. Thread-safe; callable."""

    def __init__(self, factory: Callable[[], HostRegion | None]) -> None:
        self._factory: Callable[[], HostRegion | None] | None = factory
        self._region: HostRegion | None = None
        self._lock = threading.Lock()

    def __call__(self) -> HostRegion | None:
        with self._lock:
            factory, self._factory = self._factory, None
            if factory is not None:
                try:
                    self._region = factory()
                except BaseException:
                    # Asked too early (the sandbox not started yet): the error is the
                    # caller's, and the region must still be there once it runs.
                    self._factory = factory
                    raise
            return self._region

    def close(self) -> None:
        with self._lock:
            self._factory = None
            region, self._region = self._region, None
        if region is not None:
            region.close()


# -- the receiving side of one leased slot (a thread of ember.client.channel) -------------


def pump_ring(
    conn: socket.socket, put: Callable[[bytes | object], bool], lease: Lease, eof: object
) -> None:
    """Move one ring's messages to ``put`` until the guest's DATA_EOF (or failure).

    Puts the stream's last item itself (``eof``, or an error text); raises
    ProtocolError/OSError only before that. ``put`` returns False once nobody reads.
    """
    reader = lease.reader
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    poller.register(lease.doorbell, select.POLLIN)
    ended: object | None = None  # _EOF or an error text once the connection said so
    try:
        while True:
            messages = reader.read()
            for message in messages:
                if not put(message):
                    return  # the consumer left: hang up so the guest's next wait fails
            if messages:
                if reader.producer_waiting():
                    nudge(conn)
                continue
            if ended is not None:
                if reader.mid_message:
                    ended = "the guest ended the channel in the middle of a message"
                put(ended)
                return
            if spin(reader):
                continue
            reader.sleep(True)
            if reader.available():
                reader.sleep(False)
                continue
            events = poller.poll(SLEEP_S * 1000)
            reader.sleep(False)
            for fd, _ in events:
                if fd == lease.doorbell:
                    drain_doorbell(fd)
                    continue
                poller.unregister(conn.fileno())
                frame = read_frame(conn)
                if frame is None:
                    ended = "the guest closed the connection without DATA_EOF"
                elif frame[0] is Kind.DATA_EOF:
                    ended = eof
                else:
                    raise ProtocolError(f"unexpected {frame[0].name} frame after a ring lease")
    except RingError as exc:
        raise ProtocolError(f"the guest broke its ring: {exc}") from None
    except ValueError:  # the region was unmapped under us: the sandbox is closing
        put("the sandbox closed")


def drain_doorbell(eventfd: int) -> None:
    """Take a doorbell eventfd's count. One closed under us (the sandbox closed its
    region while this thread waited) is ConnectionResetError, not a stray EBADF."""
    try:
        os.read(eventfd, 8)
    except BlockingIOError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ConnectionResetError("the sandbox was closed") from None
        raise


def nudge(conn: socket.socket) -> None:
    """One byte for a guest that sleeps on the connection; never blocks: if the guest left
    earlier ones unread, they wake it just as well (and a guest cannot stall this thread
    so). A connection the guest already closed is no error here: it may have taken the
    last record and answered between our store and this byte; reading its answer (or its
    end) is what tells the caller how things went."""
    try:
        conn.send(b"w", socket.MSG_DONTWAIT)
    except OSError:
        pass


def spin(reader: RingReader, seconds: float = SPIN_S) -> bool:
    """Poll a dry ring for ``seconds``: data that follows closely needs no doorbell."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if reader.available():
            return True
    return False
