"""Frames over asyncio streams, each wait bounded by a :class:`Deadline`: the asyncio
twin of :mod:`ember.client.sockets`, shared by the async client and its long-lived
transports (terminals, watches, the exec output ring)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming, Operation, Send
from ember.client.wire import Frame, cut_short, frame_header, parse_header
from ember.errors import SandboxTimeout
from ember.protocol import HEADER, Kind, Payload

__all__ = [
    "Pending",
    "Streams",
    "drive",
    "hang_up",
    "in_loop",
    "read_frame",
    "receive_frame",
    "send_frame",
]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_CLOCK = time.monotonic  # what asyncio's loop.time() is too
T = TypeVar("T")


class Pending(Generic[T]):
    """One read kept across a caller's timeouts: a timeout leaves it running for the next
    call instead of cancelling it, so no frame (or line) is cut in half or lost."""

    def __init__(self) -> None:
        self._task: asyncio.Future[T] | None = None

    async def take(
        self, timeout: float | None, read: Callable[..., Awaitable[T]], *args: Any
    ) -> tuple[bool, T | None]:
        """``(True, value)`` of the read (``read(*args)`` begins one if none runs), or
        ``(False, None)`` if ``timeout`` passed first."""
        if self._task is None:
            self._task = asyncio.ensure_future(read(*args))
        if timeout is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                return False, None
        task, self._task = self._task, None
        return True, await task

    def cancel(self) -> asyncio.Future[T] | None:
        """Give the read up; the cancelled task (None if none ran), to wait for if need be."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task


def in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Call ``callback`` in ``loop``'s thread: at once from there, else soon. A finalizer
    (of a stream dropped unclosed) may run in any thread, and neither tasks nor transports
    may be touched from another; a closed loop has nothing left to tidy."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback()
        return
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed
        pass


async def receive_frame(reader: asyncio.StreamReader, deadline: Deadline | None) -> Incoming:
    """One whole frame, ``None`` at a clean EOF between frames, or EXPIRED at ``deadline``."""
    if deadline is None:
        return await read_frame(reader)
    limit = asyncio.timeout(max(deadline.remaining(_CLOCK()), 0.0))
    try:
        async with limit:
            return await read_frame(reader)
    except TimeoutError:
        if limit.expired():
            return EXPIRED
        raise


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """One whole frame, ``None`` at a clean EOF between frames; no deadline of its own (the
    caller bounds it, e.g. by waiting on it as a task, as the output ring does)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise cut_short(HEADER.size - len(exc.partial)) from None
    kind, length = parse_header(header)
    if not length:
        return kind, b""
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise cut_short(length - len(exc.partial)) from None


async def send_frame(
    writer: asyncio.StreamWriter,
    kind: Kind,
    payload: Payload = b"",
    deadline: Deadline | None = None,
    *,
    trailer: bytes = b"",
) -> None:
    """Send one frame (and ``trailer``, frames already encoded, in the same write); with a
    ``deadline``, a guest that stops reading is given up on then."""
    header, view = frame_header(kind, payload)
    if trailer:
        writer.write(b"".join((header, view, trailer)))
    else:
        writer.write(header)
        if view.nbytes:
            writer.write(view)
    if deadline is None:
        await writer.drain()
        return
    limit = asyncio.timeout(max(deadline.remaining(_CLOCK()), 0.0))
    try:
        async with limit:
            await writer.drain()
    except TimeoutError:
        if limit.expired():
            raise deadline.expired() from None
        raise


async def drive(streams: Streams, op: Operation[T]) -> T:
    """Run ``op`` on ``streams`` (its REQUEST sent) to its end."""
    while (step := op.next()) is not None:
        if isinstance(step, Send):
            try:
                await send_frame(streams[1], step.kind, step.payload, step.deadline)
            except SandboxTimeout:
                raise
            except OSError as exc:
                op.send_failed(exc)
        else:
            op.receive(await receive_frame(streams[0], step.deadline))
    return op.value


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Hang up without waiting on the guest: a graceful close first sends what is still
    buffered, and a guest that stopped reading would keep ``wait_closed()`` waiting for ever."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
