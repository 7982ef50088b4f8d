"""An exec's output through a leased slot, for the asyncio client: waits on the event loop.

What the slot means, how its records become frames and what a broken ring raises are
:class:`ember.client.output_ring.OutputSlot`'s, shared with the blocking client; only the
waiting differs. The blocking client polls the connection and the slot's doorbell
eventfd together. Here one task reads the connection's next frame and is kept across
calls (a wait that ends on the ring must not cut a frame in half), and the doorbell is
watched with ``loop.add_reader`` for the length of one wait only, so nothing of the ring
stays registered with the loop between calls or after the stream ends. Each wait is
bounded by ``POLL_S`` (a lost doorbell costs that much, never a hang) and by the op's
deadline; the brief spin before it (as the blocking client's) holds the loop ~50 us.
"""

from __future__ import annotations

import asyncio
import os
import time

from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming
from ember.client.output_ring import POLL_S, OutputSlot
from ember.client.shm import HostRegion, Lease, drain_doorbell, spin
from ember.client.streams import in_loop, read_frame, receive_frame
from ember.client.wire import Frame

__all__ = ["AsyncOutputRing"]

_CLOCK = time.monotonic  # what asyncio's loop.time() is too, and the Deadline's clock


class AsyncOutputRing(OutputSlot):
    """The asyncio client's slot: :meth:`receive` is ``receive_frame`` with the ring merged in."""

    def __init__(self, region: HostRegion, lease: Lease) -> None:
        super().__init__(region, lease)
        self._frame: asyncio.Task[Frame | None] | None = None  # the connection's next frame

    async def receive(self, reader: asyncio.StreamReader, deadline: Deadline | None) -> Incoming:
        """The next frame: a record's, or the connection's once the ring is empty."""
        if self._pending:
            return self._pending.popleft()
        lease = self._lease
        if lease is None:
            return await receive_frame(reader, deadline)
        with self._guest_checked():
            while not self._drain(lease):
                frame = self._next_frame(reader)
                if frame.done():
                    # The records published before the frame was sent were visible once it
                    # was read, so the drain above (no await since) queued them first.
                    self._frame = None
                    self._pending.append(frame.result())
                    break
                if spin(lease.reader):
                    continue
                wait = POLL_S
                if deadline is not None:
                    left = deadline.remaining(_CLOCK())
                    if left <= 0:
                        return EXPIRED  # the op raises; its stream's close cancels the read
                    wait = min(wait, left)
                await self._wait(lease, frame, wait)
        return self._pending.popleft()

    def _next_frame(self, reader: asyncio.StreamReader) -> asyncio.Task[Frame | None]:
        if self._frame is None:
            self._frame = asyncio.get_running_loop().create_task(read_frame(reader))
            self._frame.add_done_callback(_retrieve)
        return self._frame

    async def _wait(self, lease: Lease, frame: asyncio.Task[Frame | None], seconds: float) -> None:
        """Until the guest rings, the frame is read, or ``seconds`` pass."""
        ring = lease.reader
        ring.sleep(True)  # from now on the guest rings for each record it publishes
        if ring.available():  # one published between the last look and the flag
            ring.sleep(False)
            return
        loop = asyncio.get_running_loop()
        try:
            # Our own descriptor of the eventfd: the sandbox may close the region's while we
            # wait, and a reused number must never be one the loop still watches for us.
            bell = os.dup(lease.doorbell)
        except OSError:
            if self._region.closed:
                raise ConnectionResetError("the sandbox was closed") from None
            raise
        try:
            rang: asyncio.Future[None] = loop.create_future()
            loop.add_reader(bell, _ring, rang)
            try:
                await asyncio.wait(
                    (frame, rang), timeout=seconds, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                loop.remove_reader(bell)
            if rang.done():
                drain_doorbell(bell)
        finally:
            os.close(bell)
        ring.sleep(False)

    def close(self) -> None:
        """Give the slot back and stop reading frames; thread-safe (a finalizer calls it)."""
        frame, self._frame = self._frame, None
        if frame is not None and not frame.done():
            in_loop(frame.get_loop(), frame.cancel)
        super().close()


def _ring(rang: asyncio.Future[None]) -> None:
    if not rang.done():  # the eventfd stays readable until drained
        rang.set_result(None)


def _retrieve(task: asyncio.Task[Frame | None]) -> None:
    """A read the stream never took (it ended first) may have failed; that is no news."""
    if not task.cancelled():
        task.exception()
