"""Host side of data channels: receive named message streams from guest code.

Guest code calls ``ember.agent.channel("results")`` and sends messages; each
channel is one connection to the host's channel port (with the VMM's vsock,
a Unix socket ``<uds>_1026``). A :class:`ChannelServer` accepts them on a
listening socket it is given and hands each stream out by name::

    with ChannelServer(listener) as channels:
        for message in channels.channel("results"):   # ends at the guest's close()
            handle(message)

Messages arrive whole and in order, none lost: a stream socket guarantees it,
and nothing here ever drops a frame. Memory is bounded per channel and in
total: once ``max_buffer`` bytes of one channel are waiting for its consumer,
or ``max_pending`` bytes of all channels nobody has asked for yet (finished
ones included: the guest may open and close many), the server stops reading
those connections, the socket buffers fill and the guest's ``send`` blocks
until the host catches up. A channel someone is reading is never held up by
unread ones. A channel nobody has asked for keeps its connection slot until
it is asked for, so at most ``max_connections`` are open or waiting at once;
later connections wait in the listener's backlog. The flip side: channels
nobody reads stall their senders.

Memory channels (issue 16): given the sandbox's shared region (``shm``), a
guest request with ``"ring": 1`` leases a slot, the guest learns it in a DATA
frame (slot, lease), and its messages then come through that slot's ring
(:mod:`ember.ring`), read from this process's own mapping of the region. The
connection stays open: the guest ends the stream with DATA_EOF there, and this
side wakes a guest waiting for room by writing a byte to it. The receiving
thread drains the ring, spins for ~``SPIN_S`` when it runs dry, then says it
sleeps and waits for the slot's doorbell (an ioeventfd the guest writes) or the
connection; no slot free, or no region: the answer is DATA_EOF and the guest
uses the connection itself as before.

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
import struct
import threading
import time
from collections.abc import Callable, Iterator

from ember import protocol
from ember.client.shm import HostRegion, pump_ring
from ember.client.sockets import read_frame
from ember.client.wire import decode
from ember.closing import Closing
from ember.errors import ProtocolError, SandboxTimeout
from ember.protocol import Kind

__all__ = ["ChannelServer"]

_EOF = object()
LEASE = struct.Struct("<QQ")  # slot, lease: the answer to a ring request


class _Stream:
    """One guest connection's messages, bounded by the bytes it holds and by the server's
    budget for unclaimed streams; ``cond`` is the server's, shared by every stream, so
    one claim or read can wake the receivers waiting on the shared budget."""

    def __init__(
        self, name: str, max_buffer: int, budget: _Budget, cond: threading.Condition
    ) -> None:
        self.name = name
        self._max = max_buffer
        self._budget = budget
        self._cond = cond
        self._items: collections.deque[bytes | object] = collections.deque()
        self._size = 0
        self.abandoned = False
        self.claimed = False  # handed to a consumer by ChannelServer.channel()
        self.holds_slot = False  # its connection ended before anyone claimed it

    def _full(self, size: int) -> bool:
        if self._size and self._size + size > self._max:
            return True
        budget = self._budget
        return not self.claimed and budget.held > 0 and budget.held + size > budget.limit

    def put(self, item: bytes | object) -> bool:
        """Queue an item, waiting while full; False if nobody will ever read it."""
        with self._cond:
            if isinstance(item, bytes):
                while self._full(len(item)) and not self.abandoned:
                    self._cond.wait()
                if not self.abandoned:
                    self._size += len(item)
                    if not self.claimed:
                        self._budget.held += len(item)
            if self.abandoned:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def claim(self) -> None:
        """A consumer took this stream (lock held): its bytes leave the unclaimed budget."""
        self.claimed = True
        self._budget.held -= self._size
        self._cond.notify_all()

    def get(self) -> bytes | object:
        with self._cond:
            while not self._items and not self.abandoned:
                self._cond.wait()
            if not self._items:  # the server closed under its consumer, who must not hang
                return "the channel server was closed"
            item = self._items.popleft()
            if isinstance(item, bytes):
                self._size -= len(item)
                self._cond.notify_all()
            return item

    def abandon(self) -> None:
        with self._cond:
            self.abandoned = True
            if not self.claimed:
                self._budget.held -= self._size
            self._size = 0
            self._items.clear()
            self._cond.notify_all()


class _Budget:
    """Bytes held across all streams nobody has claimed yet (guarded by the server's lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class ChannelServer(Closing):
    """Accepts guest channel connections on ``listener`` (which it then owns).

    ``shm`` returns the sandbox's shared region (asked once, on the first ring
    request; the server then owns and closes it).

    ``max_buffer`` bounds what one channel holds for its consumer,
    ``max_pending`` what all channels nobody has asked for yet hold together, and
    ``max_connections`` how many channels may be open or waiting to be asked for.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        max_buffer: int = 8 << 20,
        max_pending: int = 16 << 20,
        max_connections: int = 64,
        shm: Callable[[], HostRegion | None] | None = None,
    ) -> None:
        self._listener = listener
        self._shm_factory = shm
        self._shm: HostRegion | None = None
        self._shm_lock = threading.Lock()
        self._max_buffer = max_buffer
        self._budget = _Budget(max_pending)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque[_Stream]] = {}
        self._conns: set[socket.socket] = set()
        self._streams: set[_Stream] = set()
        self._closed = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC)  # close() wakes the accept loop: one fd
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
                    raise SandboxTimeout(
                        f"the guest did not open channel {name!r} in time{self._unread_hint()}"
                    )
                self._cond.wait(remaining)
            stream = self._waiting[name].popleft()
            if not self._waiting[name]:
                del self._waiting[name]
            stream.claim()
            if stream.holds_slot:
                stream.holds_slot = False
                self._slots.release()
            return stream

    def _region(self) -> HostRegion | None:
        """The sandbox's shared region, asked of the VMM on the first ring request only.

        Concurrent first requests wait for that one answer (under ``_shm_lock``):
        one that went on without it would fall back to vsock while a slot is free.
        """
        with self._shm_lock:
            factory, self._shm_factory = self._shm_factory, None
            if factory is not None:
                region = factory()
                with self._cond:
                    if self._closed:
                        if region is not None:
                            region.close()
                        return None
                    self._shm = region
            return self._shm

    @property
    def ring_leases(self) -> int:
        """Channels that went through shared memory so far (0 without a region)."""
        return self._shm.leases if self._shm is not None else 0

    def _unread_hint(self) -> str:
        """Unread channels hold slots and budget a late one may need (lock held)."""
        unread = {name: len(q) for name, q in self._waiting.items()}
        if not unread:
            return ""
        names = ", ".join(f"{n!r} x{c}" for n, c in sorted(unread.items())[:8])
        return (
            f" (channels nobody has read yet hold the server's buffers and slots and may be "
            f"holding it up: {names}; read them, or leave their loops early to drop them)"
        )

    @property
    def pending_bytes(self) -> int:
        """Bytes held for channels nobody has asked for yet (at most ``max_pending``,
        or one message when a single message is bigger)."""
        with self._cond:
            return self._budget.held

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
        poller.register(self._wake, select.POLLIN)
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
            lease = None
            if request.get("ring"):
                region = self._region()
                lease = region.lease(self._max_buffer) if region is not None else None
                if lease is None:
                    protocol.write_frame(conn, Kind.DATA_EOF)  # no ring: use this connection
                else:
                    protocol.write_frame(conn, Kind.DATA, LEASE.pack(lease.slot, lease.token))
            stream = started = _Stream(name, self._max_buffer, self._budget, self._cond)
            with self._cond:
                self._waiting.setdefault(name, collections.deque()).append(stream)
                self._streams.add(stream)
                self._cond.notify_all()
            if lease is not None:
                assert self._shm is not None
                try:
                    pump_ring(conn, stream.put, lease, _EOF)
                finally:
                    self._shm.release(lease)
                stream = None
                return
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
            release = True
            with self._cond:
                self._conns.discard(conn)
                if started is not None:
                    self._streams.discard(started)
                    # An unclaimed stream keeps its slot until claimed (_take releases it
                    # then), so that the guest cannot pile up finished streams without limit.
                    # Decided under the lock: exactly one of us and _take releases the slot.
                    if not (started.claimed or started.abandoned or self._closed):
                        started.holds_slot = True
                        release = False
            conn.close()
            if release:
                self._slots.release()

    def close(self) -> None:
        """Stop accepting and hang up on every open channel."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conns, streams = list(self._conns), list(self._streams)
            streams += [stream for queue in self._waiting.values() for stream in queue]
            self._waiting.clear()
            self._cond.notify_all()
        for stream in streams:
            stream.abandon()  # unblocks receivers waiting for room
        os.eventfd_write(self._wake, 1)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        if self._shm is not None:
            self._shm.close()
        self._listener.close()
        os.close(self._wake)
