"""An interactive program on a terminal in the guest: ``sb.pty()``, ``ember shell``.

A :class:`Terminal` is one ``pty`` connection to the agent (:mod:`ember.agent.terminal`).
Writes (keystrokes, a resize, a signal) may come from any thread while another reads,
so sends take a lock; reads wait with ``poll`` first, so a caller's own ``timeout``
never cuts a frame in half. Closing it hangs up: the guest program gets SIGHUP.
"""

from __future__ import annotations

import asyncio
import socket
import threading

from ember.client import streams
from ember.client.core import Incoming
from ember.client.interactive import TerminalOp, resize_payload, signal_payload
from ember.client.results import ExecResult
from ember.client.sockets import readable, receive_frame
from ember.client.streams import Pending
from ember.closing import AsyncClosing, Closing
from ember.protocol import Kind, write_frame

__all__ = ["KEYS_CHUNK", "AsyncTerminal", "Terminal"]

KEYS_CHUNK = 64 << 10  # keystrokes per frame: a paste goes as several


class Terminal(Closing):
    """A program on a guest terminal: ``write`` keys, ``read`` what it shows, ``wait``.

    ``read`` returns the next piece of output, ``b""`` if ``timeout`` passed first, and
    ``None`` once the program has ended (``result`` then says how).
    """

    def __init__(self, sock: socket.socket, op: TerminalOp) -> None:
        self._sock = sock
        self._op = op
        self._send_lock = threading.Lock()
        self._closed = False

    @property
    def result(self) -> ExecResult | None:
        return self._op.result

    def _send(self, kind: Kind, payload: bytes = b"") -> None:
        with self._send_lock:
            write_frame(self._sock, kind, payload)

    def write(self, data: bytes) -> None:
        """Type ``data`` (bytes as a keyboard sends them: ``b"\\x03"`` is ^C)."""
        for start in range(0, len(data), KEYS_CHUNK):
            self._send(Kind.STDIN, data[start : start + KEYS_CHUNK])

    def resize(self, rows: int, cols: int) -> None:
        self._send(Kind.DATA, resize_payload(rows, cols))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the terminal's foreground process group."""
        self._send(Kind.DATA, signal_payload(signum))

    def send_eof(self) -> None:
        """Type the terminal's end-of-file character (^D)."""
        self._send(Kind.STDIN_EOF)

    def read(self, timeout: float | None = None) -> bytes | None:
        while (step := self._op.next()) is not None:
            if not readable(self._sock, timeout):
                return b""
            chunk = self._op.receive(receive_frame(self._sock, step.deadline))
            if chunk is not None:
                return chunk.data
        return None

    def __iter__(self) -> Terminal:
        return self

    def __next__(self) -> bytes:
        data = self.read()
        if data is None:
            raise StopIteration
        return data

    def wait(self) -> ExecResult:
        """Read to the end; the result holds the output read here, as ``stdout``."""
        out = bytearray()
        while (data := self.read()) is not None:
            out += data
        assert self.result is not None  # the property: a subclass's transport may differ
        return _with_output(self.result, bytes(out))

    def close(self) -> None:
        """Hang up (the program gets SIGHUP if it still runs); safe to call twice."""
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


def _with_output(result: ExecResult, out: bytes) -> ExecResult:
    return ExecResult(result.exit_code, result.signal, out, b"", result.timed_out, result.duration)


class AsyncTerminal(AsyncClosing):
    """:class:`Terminal` for asyncio: the same methods, awaited."""

    def __init__(self, streams: streams.Streams, op: TerminalOp) -> None:
        self._reader, self._writer = streams
        self._op = op
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._next: Pending[Incoming] = Pending()

    @property
    def result(self) -> ExecResult | None:
        return self._op.result

    async def _send(self, kind: Kind, payload: bytes = b"") -> None:
        async with self._send_lock:
            await streams.send_frame(self._writer, kind, payload)

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), KEYS_CHUNK):
            await self._send(Kind.STDIN, data[start : start + KEYS_CHUNK])

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(Kind.DATA, resize_payload(rows, cols))

    async def signal(self, signum: int) -> None:
        await self._send(Kind.DATA, signal_payload(signum))

    async def send_eof(self) -> None:
        await self._send(Kind.STDIN_EOF)

    async def read(self, timeout: float | None = None) -> bytes | None:
        while (step := self._op.next()) is not None:
            arrived, frame = await self._next.take(
                timeout, streams.receive_frame, self._reader, step.deadline
            )
            if not arrived:
                return b""
            chunk = self._op.receive(frame)
            if chunk is not None:
                return chunk.data
        return None

    def __aiter__(self) -> AsyncTerminal:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if data is None:
            raise StopAsyncIteration
        return data

    async def wait(self) -> ExecResult:
        out = bytearray()
        while (data := await self.read()) is not None:
            out += data
        assert self.result is not None
        return _with_output(self.result, bytes(out))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._next.cancel()
            self._writer.transport.abort()
