"""Guest side of data channels: ordered, backpressured byte messages to the host.

A channel is one stream connection from the guest to the host's
:data:`~ember.protocol.CHANNEL_PORT` (vsock CID 2; under tests, the Unix socket
named by ``$EMBER_CHANNEL_UNIX``). It opens with ``REQUEST {"op": "channel",
"name": ...}``; each :meth:`Channel.send` is one ``DATA`` frame (larger
messages are cut into 1 MiB frames); :meth:`Channel.close` sends ``DATA_EOF``.

A stream socket keeps order and loses nothing, and when the host stops reading
its buffers fill and ``send`` blocks: that *is* the flow control.

Each frame is a syscall, ~0.3 ms in the guest, so a program sending many small
messages should pass ``buffer_size``: frames then accumulate in memory and go
out together (still as separate frames) when the buffer fills, on
:meth:`Channel.flush`, and on close.

Memory channels (issue 16): when the VMM's shared region is mapped
(:mod:`ember.agent.shm`), the request says ``"ring": 1`` and the host answers
with one DATA frame of a slot and its lease (``<QQ``), or DATA_EOF for "use
vsock". Messages then go through that slot's ring at memory speed, with no
syscall per message; the connection stays open for the end (DATA_EOF after the
last record), for the host's wake-ups when the ring was full (any bytes), and so
that an idle VMM does not park the guest mid-stream. ``buffer_size`` is moot there.
"""

from __future__ import annotations

import os
import socket
import struct

from ember.protocol import (
    CHANNEL_PORT,
    HEADER,
    HOST_CID,
    MAX_FRAME,
    Kind,
    read_frame,
    valid_channel_name,
    write_frame,
)

TYPE_CHECKING = False  # typing would drag `re` into every guest program that sends
if TYPE_CHECKING:
    from types import TracebackType

    from ember.protocol import Payload
    from ember.ring import RingWriter

__all__ = ["Channel", "channel", "wait_for_wake"]

UNIX_ENV = "EMBER_CHANNEL_UNIX"
LEASE = struct.Struct("<QQ")  # the host's answer to a ring request: slot, lease
WAKE_WAIT_S = 0.05  # a producer of a full ring, or a consumer of an empty one, looks again


class Channel:
    """One open channel; use it as a context manager so the host sees the end."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        *,
        buffer_size: int = 0,
        ring: RingWriter | None = None,
    ) -> None:
        self.name = name
        self._sock: socket.socket | None = sock
        self._buffer_size = buffer_size
        self._pending = bytearray()
        self._ring = ring

    @property
    def uses_memory(self) -> bool:
        """True when messages go through the shared-memory ring, False over vsock."""
        return self._ring is not None

    def send(self, data: Payload) -> None:
        """Send one message (kept whole unless over 1 MiB, then cut into frames)."""
        sock = self._require_open()
        view = memoryview(data).cast("B")
        if self._ring is not None:
            self._ring.send(view)
            return
        for start in range(0, max(view.nbytes, 1), MAX_FRAME):
            piece = view[start : start + MAX_FRAME]
            if self._buffer_size <= 0:
                write_frame(sock, Kind.DATA, piece)
                continue
            self._pending += HEADER.pack(piece.nbytes, Kind.DATA)
            self._pending += piece
            if len(self._pending) >= self._buffer_size:
                self.flush()

    def flush(self) -> None:
        """Push out frames held back by ``buffer_size``."""
        sock = self._require_open()
        if self._pending:
            sock.sendall(self._pending)
            self._pending.clear()

    def close(self) -> None:
        """Flush, send DATA_EOF and close; calling it again does nothing."""
        sock = self._sock
        if sock is None:
            return
        try:
            self.flush()
            write_frame(sock, Kind.DATA_EOF)
        finally:
            self._sock = None
            sock.close()

    def _require_open(self) -> socket.socket:
        if self._sock is None:
            raise ValueError(f"channel {self.name!r} is closed")
        return self._sock

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def channel(name: str, *, buffer_size: int = 0) -> Channel:
    """Open a channel called ``name`` to the host.

    ``name`` is 1-128 characters of ``[A-Za-z0-9._-]``. Raises ``OSError`` when
    no host side is listening (``ConnectionRefusedError``/``ConnectionResetError``).
    """
    if not valid_channel_name(name):
        raise ValueError(f"bad channel name {name!r}: use 1-128 characters of [A-Za-z0-9._-]")
    path = os.environ.get(UNIX_ENV)
    if path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[int, int] = path
    else:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        address = (HOST_CID, CHANNEL_PORT)
    region = None
    if not path:
        from ember.agent import shm

        region = shm.region()
    ring = b',"ring":1' if region is not None else b""
    try:
        sock.connect(address)
        # The name's alphabet needs no escaping, so no json import here.
        write_frame(sock, Kind.REQUEST, b'{"op":"channel","name":"%s"%s}' % (name.encode(), ring))
        writer = None
        if region is not None:
            frame = read_frame(sock)
            if frame is None:
                raise ConnectionResetError("the host closed the channel")
            if frame[0] is Kind.DATA and len(frame[1]) == LEASE.size:
                slot, lease = LEASE.unpack(frame[1])
                writer = region.writer(slot, lease, lambda: wait_for_wake(sock))
    except BaseException:
        sock.close()
        raise
    return Channel(sock, name, buffer_size=buffer_size, ring=writer)


def wait_for_wake(sock: socket.socket, closed: type[Exception] = ConnectionResetError) -> None:
    """Wait for the host's wake-up (any bytes), or a short while: a full ring waiting for
    room, or an empty one waiting for data. The host hanging up raises ``closed``."""
    sock.settimeout(WAKE_WAIT_S)
    try:
        if not sock.recv(4096):
            raise closed("the host closed the connection")
    except TimeoutError:
        pass
    finally:
        sock.settimeout(None)
