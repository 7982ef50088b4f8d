"""Framing between the host and the guest agent: the only module both sides share.

Every byte on an agent connection is a frame::

    +----------------+---------+------------------+
    | u32 length, LE | u8 kind | payload (length) |
    +----------------+---------+------------------+

``length`` counts the payload only and is checked against :data:`MAX_FRAME`
*before* anything is allocated, so a peer cannot make the reader buffer more
than a megabyte by lying in a header. Each connection carries one request: the
client's first frame is a ``REQUEST`` (a JSON object with an ``"op"``), then the
two sides exchange the frames that op defines, and the agent ends with one
``RESULT`` or ``ERROR``. Bulk bytes (process output, file contents, channel
messages) travel raw in their own frames, never inside JSON.

This file is copied into the guest image beside the agent, where every import
costs real time (a syscall is ~0.3 ms and a page fault ~5 ms there), so it
imports only ``enum``, ``socket`` and ``struct`` (``socket`` needs ``enum``
anyway), not even ``typing``, and loads ``json`` on first use: a guest program
that only *sends* channel frames never pays for ``json`` and ``re``.
"""

from __future__ import annotations

import enum
import socket
import struct

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the guest `re` too
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

__all__ = [
    "AGENT_PORT",
    "CHANNEL_PORT",
    "CHUNK_SIZE",
    "FILE_GET_MAX",
    "HEADER",
    "HOST_CID",
    "KEEPALIVE_OPS",
    "KEPT_STREAM_OPS",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "READY_PORT",
    "Kind",
    "Payload",
    "ProtocolError",
    "decode_json",
    "encode_json",
    "error_payload",
    "interrupted_result",
    "parse_header",
    "read_frame",
    "valid_channel_name",
    "write_frame",
    "write_frames",
    "write_json",
]

PROTOCOL_VERSION = 1
AGENT_PORT = 1024  # the agent listens here (vsock, any CID)
READY_PORT = 1025  # the agent connects to the host here once, to say it is up
CHANNEL_PORT = 1026  # guest code connects to the host here to open a data channel
# Requests that may ask (``"keepalive": true``) to keep their connection for the next request:
# one REQUEST frame in, one RESULT or ERROR frame out (``file_get``: a DATA frame before its
# RESULT, sent with it), nothing else on the connection.
KEEPALIVE_OPS = frozenset(
    {"ping", "run_code", "code_ring", "stat", "list", "remove", "pool", "file_get"}
)
# Streams that may keep their connection too: an ``exec`` without stdin (nothing follows its
# REQUEST from the host) and a ``file_write`` (the agent reads every frame up to DATA_EOF,
# even after a failure), and the region's file transfers (the host keeps the connection only
# if it sent no wake-up byte on it: ``ember.client.file_ring``). The agent agrees by putting
# ``"keepalive": true`` in the RESULT; an agent that does not (an older one), or any ERROR
# reply, ends the connection. On this host a new vsock connection costs the guest ~30 ms
# more than a kept one.
KEPT_STREAM_OPS = frozenset({"exec", "file_write", "file_ring_read", "file_ring_write"})
HOST_CID = 2  # VMADDR_CID_HOST
# Where ``ember run`` puts its script (``ember.cli.runclient.GUEST_DIR``, kept literal there:
# that client imports nothing it can avoid). The agent makes it before the template is
# taken: made per run, it cost each ``ember run`` a failed create, a stat and a mkdir,
# ~19,000 emulated instructions.
RUN_DIR = "/tmp/ember-run"

MAX_FRAME = 1 << 20  # largest payload either side accepts
CHUNK_SIZE = 256 << 10  # file and stdin data are cut into frames of at most this
# What ``file_get`` asks for at most: a file up to this size comes whole in one answer on a
# kept connection; a larger one is read by ``file_read`` or the file ring.
FILE_GET_MAX = 64 << 10
HEADER = struct.Struct("<IB")

_COALESCE = 64 << 10  # below this, copying header + payload beats a second syscall


class Kind(enum.IntEnum):
    """What a frame's payload is; values are wire format, never renumber them."""

    REQUEST = 1  # JSON object with "op": the first frame of every connection
    STDIN = 2  # bytes for an exec'd process's stdin
    STDIN_EOF = 3  # empty: close that stdin
    STDOUT = 4  # bytes a process wrote to stdout
    STDERR = 5  # bytes a process wrote to stderr
    DATA = 6  # file bytes or one channel message
    DATA_EOF = 7  # empty: end of a DATA stream
    RESULT = 8  # JSON object: the op succeeded
    ERROR = 9  # JSON object {"type", "message"}: the op failed


_KINDS = {k.value: k for k in Kind}


class ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot be trusted any more."""


Payload = bytes | bytearray | memoryview


def parse_header(header: bytes) -> tuple[Kind, int]:
    """Decode and check a 5-byte header; shared by the socket and asyncio readers."""
    length, raw_kind = HEADER.unpack(header)
    kind = _KINDS.get(raw_kind)
    if kind is None:
        raise ProtocolError(f"unknown frame kind {raw_kind}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    return kind, length


def _recv_exact(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    # The common case is one recv that returns everything: no joins, no copies.
    data = sock.recv(n)
    if len(data) == n:
        return data
    if not data:
        if eof_ok:
            return None
        raise ProtocolError(f"connection closed {n} bytes short of a frame's end")
    parts = [data]
    got = len(data)
    while got < n:
        more = sock.recv(n - got)
        if not more:
            raise ProtocolError(f"connection closed {n - got} bytes short of a frame's end")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_frame(sock: socket.socket) -> tuple[Kind, bytes] | None:
    """Read one frame; ``None`` means the peer closed cleanly between frames.

    Raises :class:`ProtocolError` for a bad header or a frame cut short, and
    lets ``OSError`` (reset, timeout) through.
    """
    header = _recv_exact(sock, HEADER.size, eof_ok=True)
    if header is None:
        return None
    kind, length = parse_header(header)
    if length == 0:
        return kind, b""
    payload = _recv_exact(sock, length, eof_ok=False)
    assert payload is not None
    return kind, payload


def write_frame(sock: socket.socket, kind: Kind, payload: Payload = b"") -> None:
    """Send one frame whole (blocking: a slow reader slows the writer, by design)."""
    write_frames(sock, ((kind, payload),))


def write_frames(sock: socket.socket, frames: Iterable[tuple[Kind, Payload]]) -> None:
    """Send frames in order by one write where the socket takes them all: in the guest each
    write is a vsock packet through the emulated kernel, so a DATA frame and its RESULT go
    as one."""
    parts: list[Payload] = []
    payloads = 0  # bytes to copy if joined (headers are few and small)
    for kind, payload in frames:
        view = memoryview(payload).cast("B")
        size = view.nbytes
        if size > MAX_FRAME:
            raise ProtocolError(f"refusing to send a {size}-byte frame (limit {MAX_FRAME})")
        parts += (HEADER.pack(size, kind), view) if size else (HEADER.pack(size, kind),)
        payloads += size
    if payloads <= _COALESCE:
        sock.sendall(b"".join(parts))
        return
    # Big payloads go out by scatter-gather rather than by copying them into a
    # fresh buffer: in the guest a fresh 256 KiB buffer is 64 page faults.
    sent = sock.sendmsg(parts)
    for part in parts:
        size = memoryview(part).nbytes
        if sent < size:
            sock.sendall(memoryview(part)[sent:])
        sent = max(0, sent - size)


def encode_json(obj: object) -> bytes:
    """Compact, ASCII-only JSON: lone surrogates from odd file names survive the trip."""
    import json

    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def decode_json(payload: bytes) -> dict[str, Any]:
    """Parse a JSON object payload; anything else is a :class:`ProtocolError`."""
    import json

    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(sock: socket.socket, kind: Kind, obj: object) -> None:
    """Send a REQUEST, RESULT or ERROR frame."""
    write_frame(sock, kind, encode_json(obj))


def error_payload(type_name: str, message: str) -> bytes:
    """The body of an ERROR frame: the remote exception's class name and text."""
    return encode_json({"type": type_name, "message": message})


def valid_channel_name(name: object) -> bool:
    """Channel names are 1-128 characters of ``[A-Za-z0-9._-]``.

    The narrow alphabet lets the guest side build its REQUEST without loading
    ``json`` and keeps names safe to show in logs and use in paths.
    """
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isascii():
        return False
    return all(c.isalnum() or c in "._-" for c in name)


def interrupted_result(result: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """What a ``run_code`` caller gets for a cell the agent interrupted at its timeout.

    The worker's own result for such a cell has ``KeyboardInterrupt`` as its error: reported
    as ``WorkerTimeout``, the one error callers already handle for an overrun, but saying that
    the worker and its namespace are kept, with the output the cell made and the traceback of
    where it was stopped. A cell that finished, or caught the interrupt, within the agent's
    grace keeps its own result. Both ends use this: the agent for a call over vsock, the host
    for one over the code rings.
    """
    error = result.get("error")
    if not isinstance(error, dict) or error.get("type") != "KeyboardInterrupt":
        return result
    message = (
        f"the code ran longer than {timeout or 0:g} s and was interrupted (KeyboardInterrupt); "
        "the worker and its state (variables, imports) are kept"
    )
    return {
        **result,
        "value": None,
        "error": {**error, "type": "WorkerTimeout", "message": message},
    }
