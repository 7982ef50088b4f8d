"""An exec's output through a leased slot of the shared region: the host's end.

The agent (:mod:`ember.agent.relay`) reads the command's pipes straight into the
ring, one record per read, its first byte naming the stream; the RESULT frame still
comes over the connection, after the last record. :class:`OutputRing` merges the two
into the frames an :class:`~ember.client.core.ExecOp` expects, so every rule of the op
(``max_output``, timeouts, what a RESULT means) applies unchanged: a record is handed
over as the ``STDOUT``/``STDERR`` frame it stands for.

An agent from before the rings ignores the slot and sends frames, which pass through.
Everything in the ring is the guest's: records are read by the checked
:class:`ember.ring.RingReader`, and a stream byte other than those two is a
ProtocolError.

:class:`OutputSlot` is what both transports share (the lease, the records' checks and
their order against the connection's frames); :class:`OutputRing` waits with ``poll``
for the blocking client, :class:`ember.client.output_ring_aio.AsyncOutputRing` with the
event loop for the asyncio one.
"""

from __future__ import annotations

import collections
import contextlib
import math
import select
import socket
import time
from collections.abc import Iterator
from typing import Self

from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming
from ember.client.shm import HostRegion, Lease, drain_doorbell, spin
from ember.client.sockets import receive_frame
from ember.errors import ProtocolError
from ember.protocol import Kind
from ember.ring import RingError

__all__ = ["POLL_S", "OutputRing", "OutputSlot"]

POLL_S = 0.1  # a waiting reader looks at the ring at least this often (a lost doorbell)
_STREAMS = {int(Kind.STDOUT): Kind.STDOUT, int(Kind.STDERR): Kind.STDERR}


class OutputSlot:
    """One exec's leased slot, without I/O: its records become pending frames, in order.

    A transport's ``receive`` hands out :attr:`_pending` first; when it is empty it waits
    for the ring or the connection, and a frame from the connection is queued only after
    :meth:`_drain` (the agent publishes every record before it sends the RESULT, so they
    are visible by the time the frame's first byte is).
    """

    def __init__(self, region: HostRegion, lease: Lease) -> None:
        self._region = region
        self._lease: Lease | None = lease
        self._pending: collections.deque[Incoming] = collections.deque()
        self.records = 0  # output records that came through the ring (tests read it)

    @classmethod
    def lease(cls, region: HostRegion | None) -> Self | None:
        """A slot of ``region``, or None (no region, or every slot in use): then frames."""
        held = None if region is None else region.lease(0)
        return None if region is None or held is None else cls(region, held)

    def fields(self) -> dict[str, int]:
        """What the exec request says to name the slot."""
        assert self._lease is not None
        return {"slot": self._lease.slot, "lease": self._lease.token}

    @contextlib.contextmanager
    def _guest_checked(self) -> Iterator[None]:
        """A broken ring is the guest's fault (ProtocolError); memory unmapped under us is
        the sandbox closing (ConnectionResetError), as a broken connection would say."""
        try:
            yield
        except RingError as exc:
            raise ProtocolError(f"the guest broke its output ring: {exc}") from None
        except ValueError:  # the region was unmapped under us
            if self._region.closed:
                raise ConnectionResetError("the sandbox was closed") from None
            raise

    def _drain(self, lease: Lease) -> bool:
        """Move published records to the pending frames; True if there are any."""

        def use(view: memoryview) -> bool:
            kind = _STREAMS.get(view[0]) if view.nbytes else None
            if kind is None:
                raise ProtocolError("the guest wrote an output record of no known stream")
            self._pending.append((kind, bytes(view[1:])))
            self.records += 1
            return True

        lease.reader.take(use)
        return bool(self._pending)

    def close(self) -> None:
        """Give the slot back (a guest still writing finds its lease gone). Thread-safe, so
        a finalizer may call it; safe to call twice."""
        lease, self._lease = self._lease, None
        if lease is not None:
            self._region.release(lease)


class OutputRing(OutputSlot):
    """The blocking client's slot: :meth:`receive` is ``receive_frame`` with the ring merged in."""

    def receive(self, sock: socket.socket, deadline: Deadline | None) -> Incoming:
        """The next frame: a record's, or the connection's once the ring is empty."""
        if self._pending:
            return self._pending.popleft()
        lease = self._lease
        if lease is None:
            return receive_frame(sock, deadline)
        reader = lease.reader
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(lease.doorbell, select.POLLIN)
        with self._guest_checked():
            while not self._drain(lease):
                if spin(reader):
                    continue
                wait = POLL_S
                if deadline is not None:
                    left = deadline.remaining(time.monotonic())
                    if left <= 0:
                        return EXPIRED
                    wait = min(wait, left)
                reader.sleep(True)
                events = [] if reader.available() else poller.poll(math.ceil(wait * 1000))
                reader.sleep(False)
                for fd, _ in events:
                    if fd == lease.doorbell:
                        drain_doorbell(fd)
                        continue
                    # Records published before the frame was sent are visible by now.
                    self._drain(lease)
                    self._pending.append(receive_frame(sock, deadline))
                    return self._pending.popleft()
        return self._pending.popleft()
