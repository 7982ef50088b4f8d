"""Frames over a blocking stream socket, each bounded as a whole by a :class:`Deadline`.

Used by the blocking client, the channel server and the launcher (the agent's ready
message). ``poll()`` rather than ``settimeout()`` for reads: another thread (an exec's
stdin pump) may be sending on the socket, and a timeout is a property of the whole
socket. What the bytes mean is :mod:`ember.client.wire`'s business.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from ember import protocol
from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Expired, Incoming, Operation, Send
from ember.client.wire import Frame, cut_short, frame_header, parse_header
from ember.errors import SandboxTimeout
from ember.protocol import HEADER, Kind, Payload

__all__ = [
    "drive",
    "read_frame",
    "readable",
    "receive_frame",
    "send_frame",
    "send_request",
    "still_open",
]

T = TypeVar("T")
_CLOCK = time.monotonic


def receive_frame(sock: socket.socket, deadline: Deadline | None) -> Incoming:
    """One whole frame, ``None`` at a clean EOF between frames, or EXPIRED at ``deadline``
    (a peer dripping one byte at a time cannot stretch it)."""
    header = _recv(sock, HEADER.size, deadline, eof_ok=True)
    if not isinstance(header, bytes):
        return header
    kind, length = parse_header(header)
    if length == 0:
        return kind, b""
    payload = _recv(sock, length, deadline, eof_ok=False)
    return (kind, payload) if isinstance(payload, bytes) else payload


def read_frame(sock: socket.socket, deadline: Deadline | None = None) -> Frame | None:
    """:func:`receive_frame`, raising the deadline's :class:`SandboxTimeout` when it passes."""
    frame = receive_frame(sock, deadline)
    if isinstance(frame, Expired):
        assert deadline is not None
        raise deadline.expired()
    return frame


def _recv(
    sock: socket.socket, n: int, deadline: Deadline | None, *, eof_ok: bool
) -> bytes | Expired | None:
    # poll() rather than settimeout(): another thread (an exec's stdin pump) may be sending
    # on this socket, and a timeout is a property of the whole socket.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    parts: list[bytes] = []
    got = 0
    while got < n:
        # Past the deadline, bytes already here are still taken; none are waited for.
        wait = None if deadline is None else max(math.ceil(deadline.remaining(_CLOCK()) * 1000), 0)
        if not poller.poll(wait):
            return EXPIRED
        try:
            data = sock.recv(n - got)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            if eof_ok and not got:
                return None
            raise cut_short(n - got)
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def send_frame(
    sock: socket.socket,
    kind: Kind,
    payload: Payload = b"",
    deadline: Deadline | None = None,
    *,
    trailer: bytes = b"",
) -> None:
    """Send one frame, given up (:class:`SandboxTimeout`) at ``deadline``: a guest that
    stops reading would otherwise block the sender once the buffers fill. Only for
    sockets no other thread sends on (the timeout is the whole socket's). ``trailer``
    (frames already encoded) leaves in the same write: one vsock packet, not several."""
    header, view = frame_header(kind, payload)  # too big a payload is refused before sending
    previous = sock.gettimeout()
    if deadline is not None:
        remaining = deadline.remaining(_CLOCK())
        if remaining <= 0:
            raise deadline.expired()
        sock.settimeout(remaining)
    try:
        if trailer:
            sock.sendall(b"".join((header, view, trailer)))
        else:
            protocol.write_frame(sock, kind, payload)
    except TimeoutError:
        assert deadline is not None
        raise deadline.expired() from None
    finally:
        if deadline is not None:
            sock.settimeout(previous)


def send_request(
    kept: socket.socket | None,
    connect: Callable[[], socket.socket],
    payload: bytes,
    deadline: Deadline | None,
    *,
    trailer: bytes = b"",
) -> socket.socket:
    """A connection with a REQUEST sent on it: ``kept`` when it still takes it, else a new
    one from ``connect``. A kept connection closed under us before the request left ran
    nothing, so the request goes on a new one; a timeout is the caller's."""
    if kept is not None:
        try:
            send_frame(kept, Kind.REQUEST, payload, deadline, trailer=trailer)
            return kept
        except SandboxTimeout:
            kept.close()
            raise
        except OSError:
            kept.close()
    sock = connect()
    try:
        send_frame(sock, Kind.REQUEST, payload, deadline, trailer=trailer)
    except BaseException:
        sock.close()
        raise
    return sock


def drive(sock: socket.socket, op: Operation[T]) -> T:
    """Run ``op`` on ``sock`` (its REQUEST sent) to its end; events are the op's own."""
    while (step := op.next()) is not None:
        if isinstance(step, Send):
            try:
                send_frame(sock, step.kind, step.payload, step.deadline)
            except SandboxTimeout:
                raise
            except OSError as exc:
                op.send_failed(exc)
        else:
            op.receive(receive_frame(sock, step.deadline))
    return op.value


def readable(sock: socket.socket, timeout: float | None) -> bool:
    """Whether a byte (or EOF) arrives within ``timeout`` (None: wait for it). A caller's own
    timeout waits here, never inside a frame, so it cannot cut one in half."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(int(timeout * 1000), 0)))


def still_open(sock: socket.socket) -> bool:
    """A kept connection is usable if nothing (EOF, a reset, stray bytes) is waiting on it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return not poller.poll(0)
