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
"""

from __future__ import annotations

import os
import socket

from ember.protocol import (
    CHANNEL_PORT,
    HEADER,
    HOST_CID,
    MAX_FRAME,
    Kind,
    valid_channel_name,
    write_frame,
)

TYPE_CHECKING = False  # typing would drag `re` into every guest program that sends
if TYPE_CHECKING:
    from types import TracebackType

    from ember.protocol import Payload

__all__ = ["Channel", "channel"]

UNIX_ENV = "EMBER_CHANNEL_UNIX"


class Channel:
    """One open channel; use it as a context manager so the host sees the end."""

    def __init__(self, sock: socket.socket, name: str, *, buffer_size: int = 0) -> None:
        self.name = name
        self._sock: socket.socket | None = sock
        self._buffer_size = buffer_size
        self._pending = bytearray()

    def send(self, data: Payload) -> None:
        """Send one message (kept whole unless over 1 MiB, then cut into frames)."""
        sock = self._require_open()
        view = memoryview(data).cast("B")
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
    try:
        sock.connect(address)
        # The name's alphabet needs no escaping, so no json import here.
        write_frame(sock, Kind.REQUEST, b'{"op":"channel","name":"%s"}' % name.encode())
    except BaseException:
        sock.close()
        raise
    return Channel(sock, name, buffer_size=buffer_size)
