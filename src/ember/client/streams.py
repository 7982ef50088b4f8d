"""Frames over asyncio streams, each wait bounded by a :class:`Deadline`: the asyncio
twin of :mod:`ember.client.sockets`, shared by the async client and its long-lived
transports (terminals, watches)."""

from __future__ import annotations

import asyncio
import time

from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming
from ember.client.wire import Frame, cut_short, frame_header, parse_header
from ember.protocol import HEADER, Kind, Payload

__all__ = ["Streams", "receive_frame", "send_frame"]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_CLOCK = time.monotonic  # what asyncio's loop.time() is too


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
) -> None:
    """Send one frame; with a ``deadline``, a guest that stops reading is given up on then."""
    header, view = frame_header(kind, payload)
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
