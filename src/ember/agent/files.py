"""File ops: ``file_write``, ``file_read``, ``stat``, ``list``, ``remove``.

Contents always travel as raw ``DATA`` frames (≤256 KiB each) ended by
``DATA_EOF``, so files of any size move in bounded memory on both sides:

* ``file_write {"path", "mode"?, "append"?, "size"?}`` then the client's DATA frames and
  DATA_EOF → ``RESULT {"size"}``. A plain write goes to a temporary file in the
  target's directory and is renamed over it, so a reader never sees half a
  file and a failed upload leaves the old one intact; missing parent
  directories are created. If anything fails, the agent still reads up to
  DATA_EOF before answering ``ERROR``: the client sends everything before it
  reads, and an early close would turn the real error into a broken pipe.
  ``size``, when the client knows it, is what it will send: the temporary file
  takes that length first (:class:`Sink`), so that the guest's tmpfs, mounted
  ``huge=within_size``, stores each whole 2 MiB of it in one huge page.
  Targets a rename would break are written where they are, as a shell's ``>`` writes
  them: a device (renaming over ``/dev/null`` would leave a plain file there) and an
  existing file whose directory takes no new files (``/proc``, ``/sys``). A FIFO or a
  socket is refused: opening one can wait forever for a reader.
* ``file_read {"path"}`` → DATA frames, DATA_EOF, ``RESULT {"size"}``.
* ``file_get {"path", "max"}`` → a file of at most ``max`` bytes (≤ ``CHUNK_SIZE - 1``)
  whole: one DATA frame and ``RESULT {"size", "whole": true}``, written together; a larger
  one: ``RESULT {"size": null, "whole": false}`` alone, and the host reads it with
  ``file_read`` or the file ring. A short exchange (``KEEPALIVE_OPS``): its connection
  carries the next request. Why: a ``file_read`` is a new connection (~30 ms more here)
  and three frames (each a packet through the emulated kernel), so reading a 12-byte file
  cost ~110-150 ms against a ping's ~20 ms.
* ``stat`` → ``RESULT {"size", "mode", "mtime", "is_dir", "is_file"}``;
  ``list`` → ``RESULT {"entries": [{"name", "size", "is_dir"}], "truncated"}``;
  ``remove {"path", "recursive"?}`` → ``RESULT {}``.

OS errors propagate as-is; the server turns them into ``ERROR`` frames named
after the exception class (``FileNotFoundError``, ``PermissionError``, ...).
The module avoids ``shutil`` and ``tempfile``: in the guest their imports
(which drag in ``re``, ``random``, ...) would cost more than these few lines.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import stat
import threading
from collections.abc import Iterator
from typing import Any

from ember.agent.common import BadRequest, ClientGone, kept_stream, opt_bool, opt_int, req_path
from ember.agent.filemap import MappedFile, mapped
from ember.protocol import (
    CHUNK_SIZE,
    MAX_FRAME,
    Kind,
    ProtocolError,
    encode_json,
    read_frame,
    write_frame,
    write_frames,
    write_json,
)

__all__ = ["FILE_OPS", "Sink", "Upload"]

_tmp_ids = itertools.count()
# A PMD-mapped page (x86-64): tmpfs with huge=within_size uses one for each whole 2 MiB of a
# file's length, which on this host writes 10 MiB in 3.5 s instead of 5.0 s and reads it back
# in 2.25 s instead of 2.85 s (one page allocation and cache insertion per 512 pages).
HPAGE_PMD_SIZE = 2 << 20
# Why a directory may refuse the temporary file of a file it holds (/proc: ENOENT).
_NO_NEW_FILES = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM})
# Read buffers are reused: in the guest a fresh 256 KiB buffer costs 64 page faults.
_buffers: list[bytearray] = []


@contextlib.contextmanager
def _chunk_buffer() -> Iterator[bytearray]:
    """A CHUNK_SIZE buffer of the reused ones (a new one when all are in use), given back."""
    try:
        buf = _buffers.pop()
    except IndexError:
        buf = bytearray(CHUNK_SIZE)
    try:
        yield buf
    finally:
        _buffers.append(buf)


def _create(tmp: str, directory: str, *, make_parents: bool) -> int:
    """The temporary file, its missing parents made first if ``make_parents``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # read too: a shared mapping
    try:
        return os.open(tmp, flags, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        if not make_parents:
            raise
        os.makedirs(directory or "/", exist_ok=True)
        return os.open(tmp, flags, 0o600)


class Sink:
    """Where file_write puts bytes: a temp file to rename, or the target for appends."""

    def __init__(self, path: str, mode: int | None, append: bool, size: int | None = None) -> None:
        if mode is not None and not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:#o} is not a permission mode (0 to 0o7777)")
        self.path = path
        self.tmp: str | None = None
        self.written = 0
        self.presized = 0  # the length the temporary file was given before its bytes
        self.mapped: MappedFile | None = None  # its first presized bytes, when mapped
        directory, base = os.path.split(path)
        if append:
            os.makedirs(directory or "/", exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if mode is not None:
                os.fchmod(self.fd, mode)
            return
        # As few system calls as the promise allows: each costs a restored guest thousands of
        # emulated kernel instructions, and `ember run` writes its script here. One stat says
        # whether the target is a directory and which mode a replaced file keeps; the parents
        # are made only when the temporary file cannot be created without them (makedirs
        # alone is three calls, one of them a failing mkdir): ~45,000 -> ~22,000 instructions.
        try:
            found: os.stat_result | None = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):  # (a file for a parent: makedirs says)
            found = None
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if found is not None and (stat.S_ISFIFO(found.st_mode) or stat.S_ISSOCK(found.st_mode)):
            kind = "a FIFO" if stat.S_ISFIFO(found.st_mode) else "a socket"
            raise BadRequest(f"{path} is {kind}: files.write writes files and devices")
        if found is not None and not stat.S_ISREG(found.st_mode):  # a device
            self._in_place(mode, truncate=False)
            return
        tmp = os.path.join(
            directory, f".{base}.ember-{os.getpid()}-{threading.get_ident()}-{next(_tmp_ids)}"
        )
        try:
            self.fd = _create(tmp, directory, make_parents=found is None)
        except OSError as exc:
            if found is None or exc.errno not in _NO_NEW_FILES:
                raise OSError(exc.errno, exc.strerror, path) from None  # the caller's name
            self._in_place(mode, truncate=True)  # e.g. /proc/sys/...: it takes no new files
            return
        self.tmp = tmp
        if mode is None:
            mode = stat.S_IMODE(found.st_mode) if found is not None else 0o644  # kept
        os.fchmod(self.fd, mode)
        if size is not None and size >= HPAGE_PMD_SIZE:
            # The length lets tmpfs choose huge pages as the bytes arrive; then the bytes go
            # through a mapping where that is cheaper than write (ember.agent.filemap).
            try:
                os.ftruncate(self.fd, size)
                self.presized = size
            except OSError:
                pass  # too big for the file system: the writes will say so
            else:
                self.mapped = mapped(self.fd, size)

    def _in_place(self, mode: int | None, *, truncate: bool) -> None:
        """Write the target itself: not atomic, as the cases that need it cannot be."""
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(self.path, flags)
        if mode is not None:
            os.fchmod(self.fd, mode)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self.mapped is not None:
            n = self.mapped.put(self.written, view)
            self.written += n
            view = view[n:]
            if view:  # more than the client said: the rest with write, from here
                self._unmap()
                os.lseek(self.fd, self.written, os.SEEK_SET)
        while view:
            n = os.write(self.fd, view)
            self.written += n
            view = view[n:]

    def _unmap(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None

    def commit(self) -> None:
        self._unmap()
        if self.presized and self.written != self.presized:
            os.ftruncate(self.fd, self.written)  # the client sent other than it said
        os.close(self.fd)
        self.fd = -1
        if self.tmp is not None:
            os.rename(self.tmp, self.path)
            self.tmp = None

    def abort(self) -> None:
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class Upload:
    """An upload's destination that keeps the first failure for the end: the agent reads
    on to the end before answering, because the host sends everything before it reads."""

    def __init__(self, req: dict[str, Any]) -> None:
        path, mode, append = req_path(req), opt_int(req, "mode"), opt_bool(req, "append")
        expected = opt_int(req, "size")
        self.size = 0
        self._failure: Exception | None = None
        self._sink: Sink | None = None
        try:
            self._sink = Sink(path, mode, append, expected)
        except (OSError, ValueError) as exc:
            self._failure = exc

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._sink is not None and self._failure is None:
            try:
                self._sink.write(data)
            except OSError as exc:
                self._failure = exc

    def finish(self) -> None:
        """All bytes are in: the file is in place, or the first failure is raised."""
        if self._failure is not None:
            raise self._failure
        assert self._sink is not None
        self._sink.commit()

    def abort(self) -> None:
        """Drop a temporary file not committed (nothing after :meth:`finish`)."""
        if self._sink is not None:
            self._sink.abort()


def handle_file_write(conn: socket.socket, req: dict[str, Any]) -> None:
    upload = Upload(req)
    try:
        while True:
            frame = read_frame(conn)
            if frame is None:
                raise ClientGone
            kind, payload = frame
            if kind is Kind.DATA_EOF:
                break
            if kind is not Kind.DATA:
                raise ProtocolError(f"expected DATA or DATA_EOF, got {kind.name}")
            upload.write(payload)
        upload.finish()
    finally:
        upload.abort()
    keep = {"keepalive": True} if kept_stream(req) else {}
    write_json(conn, Kind.RESULT, {"size": upload.size, **keep})


def handle_file_read(conn: socket.socket, req: dict[str, Any]) -> None:
    path = req_path(req)
    with open(path, "rb", buffering=0) as f, _chunk_buffer() as buf, memoryview(buf) as view:
        total = 0
        while n := f.readinto(buf):
            write_frame(conn, Kind.DATA, view[:n])
            total += n
    write_frame(conn, Kind.DATA_EOF)
    write_json(conn, Kind.RESULT, {"size": total})


def handle_file_get(conn: socket.socket, req: dict[str, Any]) -> None:
    path, limit = req_path(req), opt_int(req, "max")
    if limit is None or not 0 <= limit < CHUNK_SIZE:
        raise BadRequest(f"'max' must be an integer from 0 to {CHUNK_SIZE - 1}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # as open() would: its errors, its waits
    try:
        found = os.fstat(fd)
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if stat.S_ISREG(found.st_mode) and found.st_size > limit:
            # Said at once: copying max + 1 bytes out of the page cache to find out costs
            # the emulated kernel ~20-40 ms per 64 KiB here.
            write_json(conn, Kind.RESULT, {"size": None, "whole": False})
            return
        with _chunk_buffer() as buf, memoryview(buf) as whole:
            # One byte more than asked for: a size the kernel does not know (/proc, a
            # device) is learnt by reading.
            view = whole[: limit + 1]
            size = 0
            while size < len(view) and (n := os.readv(fd, [view[size:]])):
                size += n
            if size > limit:
                write_json(conn, Kind.RESULT, {"size": None, "whole": False})
                return
            result = encode_json({"size": size, "whole": True})
            write_frames(conn, ((Kind.DATA, view[:size]), (Kind.RESULT, result)))
    finally:
        os.close(fd)


def handle_stat(conn: socket.socket, req: dict[str, Any]) -> None:
    st = os.stat(req_path(req))
    write_json(
        conn,
        Kind.RESULT,
        {
            "size": st.st_size,
            "mode": st.st_mode,
            "mtime": st.st_mtime,
            "is_dir": stat.S_ISDIR(st.st_mode),
            "is_file": stat.S_ISREG(st.st_mode),
        },
    )


def handle_list(conn: socket.socket, req: dict[str, Any]) -> None:
    entries: list[dict[str, Any]] = []
    with os.scandir(req_path(req)) as it:
        for entry in it:
            try:
                size = entry.stat(follow_symlinks=False).st_size
                is_dir = entry.is_dir()
            except OSError:
                size, is_dir = 0, False  # vanished while we looked
            entries.append({"name": entry.name, "size": size, "is_dir": is_dir})
    entries.sort(key=lambda e: e["name"])
    truncated = False
    payload = encode_json({"entries": entries, "truncated": truncated})
    while len(payload) > MAX_FRAME:  # a huge directory: send what fits and say so
        keep = len(entries) * MAX_FRAME // len(payload) * 9 // 10
        entries, truncated = entries[:keep], True
        payload = encode_json({"entries": entries, "truncated": truncated})
    write_frame(conn, Kind.RESULT, payload)


def _rmtree(path: str) -> None:
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                _rmtree(entry.path)
            else:
                os.unlink(entry.path)
    os.rmdir(path)


def handle_remove(conn: socket.socket, req: dict[str, Any]) -> None:
    path, recursive = req_path(req), opt_bool(req, "recursive")
    if stat.S_ISDIR(os.lstat(path).st_mode):
        if recursive:
            _rmtree(path)
        else:
            os.rmdir(path)  # only an empty directory goes without recursive=true
    else:
        os.unlink(path)
    write_json(conn, Kind.RESULT, {})


FILE_OPS = {
    "file_write": handle_file_write,
    "file_read": handle_file_read,
    "file_get": handle_file_get,
    "stat": handle_stat,
    "list": handle_list,
    "remove": handle_remove,
}
