"""Host side of data channels: receive named message streams from guest code.

Guest code calls ``ember.agent.channel("results")`` and sends messages; each
channel is one connection to the host's channel port (with the VMM's vsock,
a Unix socket ``<uds>_1026``). A :class:`ChannelServer` accepts them on a
listening socket it is given and hands each stream out by name::

    with ChannelServer(listener) as channels:
        for message in channels.channel("results"):   # ends at the guest's close()
            handle(message)

Messages arrive whole and in order, none lost: a stream socket guarantees it,
and nothing here ever drops a frame. Memory is bounded per channel: once
``max_buffer`` bytes are waiting for a consumer, the server stops reading that
connection, the socket buffers fill and the guest's ``send`` blocks until
the host catches up. The flip side: a channel nobody reads stalls its sender.

``channel(name)`` returns the next stream opened under that name (FIFO), so a
guest may open the same name again after closing it. A stream that ends
without DATA_EOF (guest crash, reset) raises :class:`ProtocolError` after the
messages that did arrive.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from ember import protocol
from ember.client_errors import ProtocolError, SandboxTimeout
from ember.client_wire import decode, read_frame
from ember.protocol import Kind

__all__ = ["ChannelServer"]

_EOF = object()


class _Stream:
    """One guest connection's messages, bounded by bytes held."""

    def __init__(self, name: str, max_buffer: int) -> None:
        self.name = name
        self._max = max_buffer
        self._items: collections.deque[bytes | object] = collections.deque()
        self._size = 0
        self._cond = threading.Condition()
        self.abandoned = False

    def put(self, item: bytes | object) -> bool:
        """Queue an item, waiting while full; False if nobody will ever read it."""
        with self._cond:
            if isinstance(item, bytes):
                while self._size and self._size + len(item) > self._max and not self.abandoned:
                    self._cond.wait()
                self._size += len(item)
            if self.abandoned:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> bytes | object:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            if isinstance(item, bytes):
                self._size -= len(item)
                self._cond.notify_all()
            return item

    def abandon(self) -> None:
        with self._cond:
            self.abandoned = True
            self._items.clear()
            self._cond.notify_all()


class ChannelServer:
    """Accepts guest channel connections on ``listener`` (which it then owns)."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        max_buffer: int = 8 << 20,
        max_connections: int = 64,
    ) -> None:
        self._listener = listener
        self._max_buffer = max_buffer
        self._slots = threading.BoundedSemaphore(max_connections)
        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque[_Stream]] = {}
        self._conns: set[socket.socket] = set()
        self._streams: set[_Stream] = set()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="channels", daemon=True)
        self._thread.start()

    def channel(self, name: str, *, timeout: float | None = None) -> Iterator[bytes]:
        """Messages of the next stream called ``name``, in order, until the guest closes it.

        Waits up to ``timeout`` seconds for the guest to open it (then raises
        :class:`SandboxTimeout`). Leaving the loop early hangs up on the guest.
        """
        if not protocol.valid_channel_name(name):
            raise ValueError(f"bad channel name {name!r}: use 1-128 characters of [A-Za-z0-9._-]")
        stream = self._take(name, timeout)
        return self._iterate(stream)

    def _take(self, name: str, timeout: float | None) -> _Stream:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._waiting.get(name):
                if self._closed:
                    raise ProtocolError("the channel server is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise SandboxTimeout(f"the guest did not open channel {name!r} in time")
                self._cond.wait(remaining)
            return self._waiting[name].popleft()

    @staticmethod
    def _iterate(stream: _Stream) -> Iterator[bytes]:
        try:
            while (item := stream.get()) is not _EOF:
                if isinstance(item, bytes):
                    yield item
                else:
                    raise ProtocolError(f"channel {stream.name!r}: {item}")
        finally:
            stream.abandon()

    # -- background threads ---------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        self._listener.setblocking(False)
        while not self._closed:
            if not self._slots.acquire(timeout=0.5):
                continue  # every slot busy: the guest's connect waits in the backlog
            if not self._accept_one(poller):
                self._slots.release()

    def _accept_one(self, poller: select.poll) -> bool:
        while not self._closed:
            poller.poll()
            if self._closed:
                break
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                time.sleep(0.05)
                continue
            conn.setblocking(True)
            with self._cond:
                self._conns.add(conn)
            threading.Thread(target=self._receive, args=(conn,), daemon=True).start()
            return True
        return False

    def _receive(self, conn: socket.socket) -> None:
        stream: _Stream | None = None
        started: _Stream | None = None
        try:
            frame = read_frame(conn)
            if frame is None or frame[0] is not Kind.REQUEST:
                return
            request = decode(frame[1])
            name = request.get("name")
            if request.get("op") != "channel" or not protocol.valid_channel_name(name):
                return
            assert isinstance(name, str)
            stream = started = _Stream(name, self._max_buffer)
            with self._cond:
                self._waiting.setdefault(name, collections.deque()).append(stream)
                self._streams.add(stream)
                self._cond.notify_all()
            while (frame := read_frame(conn)) is not None:
                if frame[0] is Kind.DATA_EOF:
                    stream.put(_EOF)
                    stream = None
                    return
                if frame[0] is not Kind.DATA:
                    raise ProtocolError(f"unexpected {frame[0].name} frame")
                if not stream.put(frame[1]):
                    return  # the consumer left: hang up so the guest's send fails
            stream.put("the guest closed the connection without DATA_EOF")
            stream = None
        except (OSError, ProtocolError) as exc:
            if stream is not None:
                stream.put(f"connection failed: {exc}")
                stream = None
        finally:
            with self._cond:
                self._conns.discard(conn)
                if started is not None:
                    self._streams.discard(started)
            conn.close()
            self._slots.release()

    def close(self) -> None:
        """Stop accepting and hang up on every open channel."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conns, streams = list(self._conns), list(self._streams)
            self._cond.notify_all()
        for stream in streams:
            stream.abandon()  # unblocks receivers waiting for room
        os.write(self._wake_w, b"!")
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> ChannelServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
