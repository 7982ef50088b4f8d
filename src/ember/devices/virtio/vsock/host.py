"""The host side of hybrid vsock: the Unix listener, the CONNECT handshake, and a timer.

Firecracker's wire format, kept verbatim so ``socat`` and existing clients work
(its docs/vsock.md)::

    host -> listener at <uds_path>:   CONNECT <port>\\n
    guest accepted:                   OK <host_port>\\n      (then the stream)
    guest refused or no answer:       the socket is closed

The handshake is read without ever consuming a byte past the newline (a peek,
then a read of exactly the line), so data a client pipelines right behind its
CONNECT line stays in the socket for the guest.  A line that is not
``CONNECT <u32>`` or grows past :data:`MAX_LINE` bytes gets the client closed.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import time
from pathlib import Path

from ember.errors import ConfigError

MAX_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes
HANDSHAKE_TIMEOUT = 5.0  # seconds a client may take to send its CONNECT line
LISTEN_BACKLOG = 128
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class HandshakeError(Exception):
    """The client did not send a valid CONNECT line: close it."""


def parse_connect(line: bytes) -> int:
    """The port of a ``CONNECT <port>\\n`` line (keyword case-insensitive, like Firecracker)."""
    verb, port = parse_request(line)
    if verb != "CONNECT":
        raise HandshakeError(f"expected 'CONNECT <port>', got {line[:MAX_LINE]!r}")
    return port


def parse_request(line: bytes) -> tuple[str, int]:
    """``CONNECT <port>`` or Ember's ``RESUME <port>``: take over a guest connection that
    was open when the VM's snapshot was taken (an agent already waiting for a request)."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise HandshakeError("the CONNECT line is not ASCII") from None
    verbs = ("CONNECT", "RESUME")
    if len(words) != 2 or words[0].upper() not in verbs or not words[1].isdigit():
        raise HandshakeError(f"expected 'CONNECT <port>', got {line[:MAX_LINE]!r}")
    port = int(words[1])
    if port > 0xFFFF_FFFF:
        raise HandshakeError(f"port {port} does not fit 32 bits")
    return words[0].upper(), port


class PendingClient:
    """A host client that connected to the listener and has not sent its CONNECT line yet."""

    def __init__(self, sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.line = bytearray()
        self.deadline = time.monotonic() + timeout

    def read_line(self) -> tuple[str, int] | None:
        """Consume what arrived of the line; (verb, port) once it is complete, else None.

        Raises HandshakeError on end of file, garbage, or an overlong line.
        """
        try:
            data = self.sock.recv(MAX_LINE - len(self.line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise HandshakeError(f"read failed: {exc.strerror}") from None
        if not data:
            raise HandshakeError("the client closed before sending CONNECT")
        newline = data.find(b"\n")
        take = len(data) if newline < 0 else newline + 1
        self.line += self.sock.recv(take)  # exactly the bytes just peeked at
        if newline >= 0:
            return parse_request(bytes(self.line))
        if len(self.line) >= MAX_LINE:
            raise HandshakeError(f"no newline in the first {MAX_LINE} bytes")
        return None


def bind_listener(path: Path) -> socket.socket:
    """Listen at ``path``, replacing a stale socket file left by an earlier run."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(
            f"vsock socket path {path} is longer than {SUN_PATH_MAX} bytes: choose a shorter one"
        )
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot replace the stale vsock socket {path}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {path}: {exc.strerror} (is the directory writable, "
            "and is the path free of other files?)"
        ) from None
    sock.setblocking(False)
    return sock


# timerfd(2): Python 3.11 has no os.timerfd_create, so call libc directly.
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]
_libc.timerfd_settime.restype = ctypes.c_int


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Timer:
    """A one-shot CLOCK_MONOTONIC timerfd: readable once the armed delay has passed."""

    def __init__(self) -> None:
        self.fd = _check(_libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC))
        self.armed_at: float | None = None  # the monotonic deadline armed, if any

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (time.monotonic() seconds); None disarms."""
        if deadline == self.armed_at:
            return
        spec = _Itimerspec()
        if deadline is not None:
            # A zero it_value would disarm: fire in at least 1 ns.
            delay = max(deadline - time.monotonic(), 1e-9)
            spec.it_value.tv_sec = int(delay)
            spec.it_value.tv_nsec = max(1, int((delay - int(delay)) * 1e9))
        _check(_libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None))
        self.armed_at = deadline

    def clear(self) -> None:
        """Consume an expiry (the fd stays readable until read)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
