"""The ``watch`` op: changes under a directory, streamed as they happen (inotify).

Request: ``{"op": "watch", "path": "/abs/dir", "recursive": false}``. Reply: ``DATA``
frames, each a JSON object. The first is ``{"type": "ready", "path"}``, sent once the
watch is in place, so that anything done after it is seen. Then one per event::

    {"type": "create" | "write" | "remove" | "rename" | "chmod",
     "path": "/abs/file", "is_dir": false}

(``rename`` names the old path; the new one comes as ``create``: the names E2B's
``watch_dir`` uses.) ``{"type": "overflow"}`` says the kernel's queue overflowed and
events were lost. The stream ends when the host hangs up, or with ``RESULT {"reason":
"removed"}`` when the watched directory itself goes away. A path that is missing or not
a directory is an ``ERROR`` (``FileNotFoundError``, ``NotADirectoryError``).

Bounded by construction: events are read from the kernel only as fast as the host takes
them, and the kernel's own queue (``max_queued_events``) is the only buffer: past it,
one ``overflow`` event, never unbounded memory in the agent. A burst of identical events
(one ``write`` per chunk of a big file) within one read is sent once.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import threading
from typing import Any

from ember.agent.common import ClientGone, opt_bool, req_path
from ember.protocol import Kind, encode_json, write_frame, write_json

__all__ = ["MAX_WATCHES", "handle_watch", "parse_events"]

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF
)  # fmt: skip
_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MODIFY, "write"),
    (IN_DELETE, "remove"),
    (IN_MOVED_FROM, "rename"),
    (IN_ATTRIB, "chmod"),
)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (name follows)
MAX_WATCHES = 4096  # directories one recursive watch may cover
_libc_lock = threading.Lock()
_libc: Any = None


def parse_events(buffer: bytes) -> list[tuple[int, int, str]]:
    """``(wd, mask, name)`` for each ``struct inotify_event`` in one read's worth."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(buffer):
        wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
        offset += _EVENT.size
        raw = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append((wd, mask, os.fsdecode(raw)))
    return events


def _c() -> Any:
    """glibc, loaded on first use: ``ctypes`` is a real import cost in this guest."""
    global _libc
    with _libc_lock:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


class _Watcher:
    """One inotify instance and the directories it covers (wd -> path)."""

    def __init__(self, root: str, recursive: bool) -> None:
        self.root, self.recursive = root, recursive
        self.paths: dict[int, str] = {}
        fd = _c().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = _errno()
            raise OSError(err, f"inotify unavailable: {os.strerror(err)}")
        self.fd = fd
        try:
            self.add(root, must=True)
        except BaseException:
            os.close(fd)
            raise

    def add(self, path: str, *, must: bool = False) -> None:
        if len(self.paths) >= MAX_WATCHES:
            return  # the rest of a huge tree goes unwatched rather than exhausting the guest
        wd = _c().inotify_add_watch(self.fd, os.fsencode(path), _MASK)
        if wd < 0:
            err = _errno()
            if must:
                raise OSError(err, os.strerror(err), path)
            return  # a directory gone before we got to it
        self.paths[wd] = path
        if self.recursive:
            try:
                entries = list(os.scandir(path))
            except OSError:
                return
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    self.add(entry.path)

    def events(self) -> tuple[list[dict[str, Any]], bool]:
        """What one read holds, as wire events; and whether the root is gone."""
        try:
            buffer = os.read(self.fd, 64 << 10)
        except BlockingIOError:
            return [], False
        out: list[dict[str, Any]] = []
        gone = False
        for wd, mask, name in parse_events(buffer):
            if mask & IN_Q_OVERFLOW:
                out.append({"type": "overflow"})
                continue
            base = self.paths.get(wd)
            if base is None:
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) and not name:
                if base == self.root and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    gone = True
                if mask & IN_IGNORED:
                    self.paths.pop(wd, None)
                continue
            path = os.path.join(base, name) if name else base
            is_dir = bool(mask & IN_ISDIR)
            for bits, kind in _TYPES:
                if mask & bits:
                    event = {"type": kind, "path": path, "is_dir": is_dir}
                    if not out or out[-1] != event:
                        out.append(event)
            if self.recursive and is_dir and mask & (IN_CREATE | IN_MOVED_TO):
                self.add(path)
        return out, gone

    def close(self) -> None:
        os.close(self.fd)


def handle_watch(conn: socket.socket, req: dict[str, Any]) -> None:
    """Serve one ``watch`` request on ``conn`` (see the module docstring)."""
    path = os.path.normpath(req_path(req))
    recursive = opt_bool(req, "recursive")
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise NotADirectoryError(f"not a directory: {path}")
    watcher = _Watcher(path, recursive)
    try:
        write_frame(conn, Kind.DATA, encode_json({"type": "ready", "path": path}))
        poller = select.poll()
        poller.register(watcher.fd, select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == conn.fileno():
                    if not conn.recv(1, socket.MSG_PEEK):
                        raise ClientGone()  # the host stopped watching
                    conn.recv(4096)  # the host sends nothing on a watch; drop it
                    continue
                events, gone = watcher.events()
                for event in events:
                    write_frame(conn, Kind.DATA, encode_json(event))
                if gone:
                    write_json(conn, Kind.RESULT, {"reason": "removed"})
                    return
    finally:
        watcher.close()
