"""Frames over asyncio streams, each wait bounded by a :class:`Deadline`: the asyncio
twin of :mod:`ember.client.sockets`, shared by the async client and its long-lived
transports (terminals, watches)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming
from ember.client.wire import Frame, cut_short, frame_header, parse_header
from ember.protocol import HEADER, Kind, Payload

__all__ = ["Pending", "Streams", "receive_frame", "send_frame"]

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


async def receive_frame(reader: asyncio.StreamReader, deadline: Deadline | None) -> Incoming:
    """One whole frame, ``None`` at a clean EOF between frames, or EXPIRED at ``deadline``."""
    if deadline is None:
        return await _read_frame(reader)
    limit = asyncio.timeout(max(deadline.remaining(_CLOCK()), 0.0))
    try:
        async with limit:
            return await _read_frame(reader)
    except TimeoutError:
        if limit.expired():
            return EXPIRED
        raise


async def _read_frame(reader: asyncio.StreamReader) -> Frame | None:
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
