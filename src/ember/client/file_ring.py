"""``files.write``/``files.read`` through the shared region: the host's end.

The guest's end is :mod:`ember.agent.filering` (the protocol is described there). Over
vsock each byte crosses the emulated guest kernel as a packet and again into the page
cache; through a leased slot of the region only the page-cache copy is left, and on
this side the bytes are plain memory copies.

:class:`FileRing` returns None, having changed nothing in the guest, whenever the ring
cannot carry a transfer: no region, every slot leased to channels, an agent that does
not know the ops (built before them) or cannot see the slot. The caller then uses
vsock. Everything the guest writes is checked: records by :class:`ember.ring.RingReader`
against this side's capacity, sizes against what crossed, and a guest that stops making
progress for the call timeout ends the transfer with :class:`SandboxTimeout`.

With ``kept`` (a client's kept blocking connections, :mod:`ember.client.kept`) a transfer
rides a kept connection and asks to keep it: a new vsock connection costs the guest an
accept and a hand-over between the agent's threads, ~70 ms of a small transfer's ~100 here.
The connection also carries the wake-up bytes of a side that sleeps, and one this side sends
may arrive after the guest stopped waiting for it (it saw the ring move first) and be left
unread, where the next request would be read from. So a connection on which this side sent a
wake-up is closed after the transfer, never kept: only a transfer that never filled the
ring, or never found the guest asleep, keeps it, and those are the small ones this is for.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ember.client import results
from ember.client.bounds import CallBounds, Deadline, file_too_large
from ember.client.shm import HostRegion, Lease, drain_doorbell, nudge, spin
from ember.client.sockets import read_frame, send_request
from ember.client.wire import (
    Frame,
    Source,
    check_result,
    data_chunks,
    remote_error,
    source_size,
    unexpected,
)
from ember.errors import ProtocolError, SandboxTimeout
from ember.protocol import Kind
from ember.ring import TAIL, RingError, RingWriter

__all__ = ["FileRing"]

POLL_S = 0.05  # a waiting side looks at the ring, the connection and its clock this often
FALLBACK_TYPES = ("RingUnavailable",)

Connect = Callable[[], socket.socket]
Encode = Callable[[dict[str, Any]], bytes]


class Kept(Protocol):
    """Where kept connections come from and go back to (the client's pool)."""

    def take(self) -> socket.socket | None: ...
    def keep(self, sock: socket.socket) -> None: ...


class _AgentSpoke(Exception):
    """A frame arrived while the host was still producing: read it."""


class _Progress:
    """The transfer's clock: SandboxTimeout once the ring has not moved for ``bounds``'
    call timeout (a slow guest that keeps moving is never cut off)."""

    def __init__(self, bounds: CallBounds, what: str) -> None:
        self._bounds = bounds
        self._what = what
        self._mark = -1
        self._since = bounds.clock()

    def check(self, position: int) -> None:
        now = self._bounds.clock()
        if position != self._mark:
            self._mark, self._since = position, now
        elif now - self._since > self._bounds.call_timeout:
            raise SandboxTimeout(
                f"{self._what}: the guest made no progress for {self._bounds.call_timeout:g} s"
            )


class FileRing:
    """One sandbox's file transfers through its region.

    ``region`` gives the region shared with the sandbox's channels (their leases and
    these come from one pool); ``connect`` opens an agent connection; ``encode`` turns
    a request into its REQUEST payload (it carries a restored VM's resume announcement);
    ``kept``, if given, lends kept connections and takes back those the agent agreed to keep.
    """

    def __init__(
        self,
        region: Callable[[], HostRegion | None],
        connect: Connect,
        encode: Encode,
        bounds: CallBounds,
        kept: Kept | None = None,
    ) -> None:
        self._region = region
        self._connect = connect
        self._encode = encode
        self._bounds = bounds
        self._kept = kept
        self.supported = True  # False once the agent turned out not to know the ops
        self.transfers = 0  # transfers carried by the ring (tests and benchmarks read it)

    def write(self, path: str, data: Source, mode: int | None, append: bool) -> int | None:
        """Bytes written, or None when the ring cannot carry it (nothing was sent)."""
        request: dict[str, Any] = {"op": "file_ring_write", "path": path, "append": append}
        if mode is not None:
            request["mode"] = mode
        size = source_size(data)
        if size is not None and not append:
            request["size"] = size
        with self._leased() as lease:
            if lease is None:
                return None
            region, held = lease
            request = {**request, "slot": held.slot, "lease": held.token}
            sock = self._open(request, self._bounds.call("file_ring_write", None))
            with self._closed_unless_kept(sock) as done:
                # Bytes in hand are written into the ring at once, before the agent says it
                # took the slot (a round trip saved); a declined request then leaves them
                # for vsock. A stream is read only once the ring is known to be taken.
                taken = not isinstance(data, bytes | bytearray | memoryview)
                if taken and not self._taken(sock):
                    return None
                produced = self._produce(sock, region, held, data, path, taken)
                if produced is None:
                    return None
                size, done.result, done.nudged = produced
        self.transfers += 1
        return size

    def read(self, path: str, sink: Callable[[bytes], object], limit: int | None) -> int | None:
        """Bytes read into ``sink``, or None when the ring cannot carry it."""
        with self._leased() as lease:
            if lease is None:
                return None
            held = lease[1]
            request = {"op": "file_ring_read", "path": path, "slot": held.slot, "lease": held.token}
            sock = self._open(request, self._bounds.send())
            with self._closed_unless_kept(sock) as done:
                read = self._consume(sock, held, path, sink, limit)
                if read is None:
                    return None
                size, done.result, done.nudged = read
        self.transfers += 1
        return size

    # -- the connection ---------------------------------------------------------------

    def _open(self, request: dict[str, Any], deadline: Deadline) -> socket.socket:
        """A connection with ``request`` sent on it: a kept one when there is one."""
        kept = None
        if self._kept is not None:
            request = {**request, "keepalive": True}
            kept = self._kept.take()
        return send_request(kept, self._connect, self._encode(request), deadline)

    @contextlib.contextmanager
    def _closed_unless_kept(self, sock: socket.socket) -> Iterator[_Ending]:
        """Closes ``sock`` after the transfer, unless it ended well with the agent agreeing
        to keep the connection and no wake-up byte of ours possibly left unread on it."""
        done = _Ending()
        kept = False
        try:
            yield done
            kept = (
                self._kept is not None and done.nudged == 0 and done.result.get("keepalive") is True
            )
        finally:
            if kept:
                assert self._kept is not None
                self._kept.keep(sock)
            else:
                sock.close()

    # -- the two directions -------------------------------------------------------------

    @contextlib.contextmanager
    def _leased(self) -> Iterator[tuple[HostRegion, Lease] | None]:
        """A free slot for one transfer (None: use vsock), released afterwards."""
        region = self._region() if self.supported else None
        held = None if region is None else region.lease(0)
        if region is None or held is None:
            yield None
            return
        try:
            yield region, held
        except ValueError:  # the region was unmapped under us
            if region.closed:
                raise ConnectionResetError("the sandbox was closed") from None
            raise
        finally:
            region.release(held)

    def _declined(self, frame: Frame | None) -> bool:
        if frame is None or frame[0] is not Kind.ERROR:
            return False
        error = remote_error(frame[1])
        if error.type == "BadRequest" and error.message.startswith("unknown op"):
            self.supported = False  # an agent from before the file rings
            return True
        if error.type in FALLBACK_TYPES:
            return True
        raise error

    def _taken(self, sock: socket.socket) -> bool:
        """The agent's first answer to a ``file_ring_write``: True for "the ring is taken",
        False for "use vsock"; anything else raises."""
        first = read_frame(sock, self._bounds.call("file_ring_write", None))
        if self._declined(first):
            return False
        if first is None or first[0] is not Kind.DATA or first[1]:
            raise unexpected(first, "file_ring_write")
        return True

    def _produce(
        self,
        sock: socket.socket,
        region: HostRegion,
        held: Lease,
        data: Source,
        path: str,
        taken: bool,
    ) -> tuple[int, dict[str, Any], int] | None:
        """Bytes sent, the RESULT, and how many wake-up bytes went on the connection; None:
        the agent declined the slot (only when not ``taken`` yet: nothing was consumed)."""
        ctl, ring_data, doorbell = region.slot(held.slot)
        progress = _Progress(self._bounds, f"writing {path}")
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(doorbell, select.POLLIN)

        declined = False

        def room() -> None:  # the guest frees room as it writes the file
            nonlocal taken, declined
            progress.check(int(ctl[TAIL]))  # what the guest has consumed
            for fd, _ in poller.poll(POLL_S * 1000):
                if fd == doorbell:
                    drain_doorbell(doorbell)
                elif taken:
                    raise _AgentSpoke
                elif not (taken := self._taken(sock)):
                    declined = True
                    raise _AgentSpoke

        bell = _Bell(sock)
        writer = RingWriter(ctl, ring_data, bell, room)
        sent = 0
        try:
            for piece in data_chunks(data):
                view = memoryview(piece).cast("B")
                if view.nbytes:
                    writer.send(view)
                    sent += view.nbytes
            writer.send(memoryview(b""))  # the end
        except _AgentSpoke:
            pass  # the agent answered early (an error, or it went away): read it
        except BrokenPipeError:
            raise ProtocolError(f"the guest took the ring back while writing {path}") from None
        if declined or not (taken or self._taken(sock)):
            return None
        frame = self._await_frame(sock, lambda: int(ctl[TAIL]), progress)
        result = check_result(frame, "file_ring_write")
        size = results.parse_size(result)
        if size != sent:
            raise ProtocolError(f"file_ring_write took {sent} bytes but said it wrote {size}")
        return size, result, bell.rung

    def _await_frame(
        self, sock: socket.socket, position: Callable[[], int], progress: _Progress
    ) -> Frame | None:
        """The agent's answer, however long the guest takes while the ring still moves."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not poller.poll(POLL_S * 1000):
            progress.check(position())
        return read_frame(sock, self._bounds.call("file_ring", None))

    def _consume(
        self,
        sock: socket.socket,
        held: Lease,
        path: str,
        sink: Callable[[bytes], object],
        limit: int | None,
    ) -> tuple[int, dict[str, Any], int] | None:
        """Bytes read, the RESULT, and how many wake-up bytes went on the connection; None:
        the agent declined before sending anything (use vsock)."""
        reader = held.reader
        progress = _Progress(self._bounds, f"reading {path}")
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(held.doorbell, select.POLLIN)
        total = nudged = 0

        def use(view: memoryview) -> bool:
            nonlocal total
            if limit is not None and total + view.nbytes > limit:
                raise file_too_large(path, limit)
            sink(bytes(view))  # the sink may keep it; the ring's memory is reused
            total += view.nbytes
            return True

        answer: Frame | None = None
        answered = False
        try:
            while True:
                if reader.take(use):
                    if reader.producer_waiting():
                        nudge(sock)
                        nudged += 1
                    continue
                if answered:  # every record was published before the answer was sent
                    break
                progress.check(total)
                if spin(reader):
                    continue
                reader.sleep(True)
                events = [] if reader.available() else poller.poll(POLL_S * 1000)
                reader.sleep(False)
                for fd, _ in events:
                    if fd == held.doorbell:
                        drain_doorbell(fd)
                        continue
                    answer, answered = read_frame(sock, self._bounds.call("file_ring", None)), True
                    if answer is not None and answer[0] is Kind.ERROR:
                        if not total and self._declined(answer):
                            return None
                        raise remote_error(answer[1])
                    poller.unregister(sock)
        except RingError as exc:
            raise ProtocolError(f"the guest broke its ring while sending {path}: {exc}") from None
        result = check_result(answer, "file_ring_read")
        size = results.parse_size(result)
        if size != total:
            raise ProtocolError(f"file_ring_read sent {total} bytes but said {size}")
        return total, result, nudged


class _Ending:
    """How a transfer ended, for whether its connection may be kept."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.nudged = 0


class _Bell:
    """The request ring's doorbell towards a sleeping guest: a byte on the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.rung = 0

    def __setitem__(self, index: int, value: int) -> None:
        nudge(self._sock)
        self.rung += 1
