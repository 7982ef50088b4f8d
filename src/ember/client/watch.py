"""``sb.files.watch(path)``: changes under a guest directory, as they happen.

A :class:`Watch` is one ``watch`` connection to the agent (:mod:`ember.agent.watch`),
opened only once the guest's inotify watch is in place (so whatever the caller does
next is seen). Iterating it blocks for the next :class:`FileEvent` and ends when the
directory is removed; ``get(timeout)`` polls. Closing it hangs up, which ends the
watch in the guest.
"""

from __future__ import annotations

import socket

from ember.client import streams
from ember.client.core import Incoming
from ember.client.interactive import WatchOp
from ember.client.results import FileEvent
from ember.client.sockets import readable, receive_frame
from ember.client.streams import Pending
from ember.closing import AsyncClosing, Closing

__all__ = ["AsyncWatch", "Watch"]


class Watch(Closing):
    """File events under one guest directory; ``ended`` is set once it removed."""

    def __init__(self, sock: socket.socket, op: WatchOp) -> None:
        self._sock = sock
        self._op = op

    @property
    def ended(self) -> str | None:
        """Why the watch ended (``"removed"``), or None while it runs."""
        return self._op.value if self._op.done else None

    def wait_ready(self) -> None:
        """Block until the guest's watch is in place (the first frame)."""
        while not self._op.ready:
            step = self._op.next()
            assert step is not None
            self._op.receive(receive_frame(self._sock, step.deadline))

    def get(self, timeout: float | None = None) -> FileEvent | None:
        """The next event; None if ``timeout`` passed first or the watch has ended."""
        while (step := self._op.next()) is not None:
            if not readable(self._sock, timeout):
                return None
            self._op.receive(receive_frame(self._sock, step.deadline))
            if self._op.event is not None:
                return self._op.event
        return None

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> FileEvent:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        """Stop watching (safe to call twice)."""
        if self._sock.fileno() >= 0:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


class AsyncWatch(AsyncClosing):
    """:class:`Watch` for asyncio: ``async for event in watch``, ``await get(timeout)``."""

    def __init__(self, streams: streams.Streams, op: WatchOp) -> None:
        self._reader, self._writer = streams
        self._op = op
        self._next: Pending[Incoming] = Pending()

    @property
    def ended(self) -> str | None:
        return self._op.value if self._op.done else None

    async def wait_ready(self) -> None:
        while not self._op.ready:
            step = self._op.next()
            assert step is not None
            self._op.receive(await streams.receive_frame(self._reader, step.deadline))

    async def get(self, timeout: float | None = None) -> FileEvent | None:
        while (step := self._op.next()) is not None:
            arrived, frame = await self._next.take(
                timeout, streams.receive_frame, self._reader, step.deadline
            )
            if not arrived:
                return None
            self._op.receive(frame)
            if self._op.event is not None:
                return self._op.event
        return None

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> FileEvent:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        self._next.cancel()
        self._writer.transport.abort()
