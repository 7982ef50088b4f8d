"""``client.files``: file transfer and inspection over blocking connections to the agent.

The asyncio twin is :class:`ember.client.aio.AsyncFiles`. What each operation means
lives in :mod:`ember.client.core`; this picks the cheapest way to move its bytes: a
small write rides inline with its request (one packet on a kept connection), a larger write
and any read go through the shared region's ring when a slot is free, on a kept connection
(:mod:`ember.client.file_ring`), a small read without a slot comes whole in one short
exchange (:mod:`ember.client.file_get`), and the rest over a connection to the agent.
:class:`Files` holds no connection of its own: the
:class:`~ember.client.blocking.AgentClient` that owns it lends its ``_run`` and ``_start``.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from typing import Any, BinaryIO

from ember.client.bounds import DEFAULT_MAX_OUTPUT
from ember.client.core import Operation, PathArg
from ember.client.file_ring import FileRing
from ember.client.results import DirEntry, FileStat
from ember.client.session import INLINE_WRITE_MAX, Session
from ember.client.watch import Watch
from ember.client.wire import Source

__all__ = ["Files"]


class Files:
    """File transfer and inspection inside the sandbox (paths are absolute)."""

    def __init__(
        self,
        session: Session,
        run: Callable[..., Any],
        ring: FileRing | None = None,
        start: Callable[[Operation[Any]], socket.socket] | None = None,
    ) -> None:
        self._session = session
        self._run = run  # (op, trailer): see AgentClient._run
        self._start = start  # opens a connection for a long-lived op (watch)
        self._ring = ring  # the shared region's path, tried first (ember.client.file_ring)

    def write(
        self, path: PathArg, data: Source, *, mode: int | None = None, append: bool = False
    ) -> int:
        """Write ``data`` (bytes or a binary file) to ``path``; return the size written.

        Replacement is atomic (temp file + rename) and keeps the old file's mode
        unless ``mode`` is given; parent directories are created.
        """
        op = self._session.write_file(path, data, mode, append)  # checks the arguments
        trailer = op.inline(INLINE_WRITE_MAX)  # small: one packet on a kept connection
        if trailer is None and self._ring is not None:
            size = self._ring.write(op.request["path"], data, mode, append)
            if size is not None:
                return size
        written: int = self._run(op, trailer or b"")
        return written

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        """Stream the file at ``path`` into ``fileobj``; return its size."""
        return self._read(path, fileobj.write, None, small_first=False)

    def _read(
        self, path: PathArg, sink: Callable[[bytes], object], limit: int | None, small_first: bool
    ) -> int:
        op = self._session.read_file(path, sink, limit)  # checks the arguments
        # The ring rides a kept connection: a small file costs what file_get costs, and a
        # larger one is not asked about first. Without a free slot, a small file still comes
        # whole in one exchange (read_into is for big ones: straight on).
        if self._ring is not None:
            size = self._ring.read(os.fspath(path), sink, op.limit)
            if size is not None:
                return size
        get = self._session.get_file(path, op.limit) if small_first else None
        if get is not None:
            self._run(get)
            if (data := self._session.got_file(get)) is not None:
                sink(data)
                return len(data)
        read: int = self._run(op)
        return read

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The whole file at ``path``; more than ``max_output`` bytes raises
        :class:`~ember.errors.OutputTooLarge` (use :meth:`read_into` for big files)."""
        buf = io.BytesIO()
        self._read(path, buf.write, max_output, small_first=True)
        return buf.getvalue()

    def watch(self, path: PathArg, *, recursive: bool = False) -> Watch:
        """Changes under the directory ``path`` (and its subdirectories with ``recursive``),
        as :class:`FileEvent` objects; returns once the guest watches, so what the caller
        does next is seen. Iterate it; close it (or leave its ``with``) to stop."""
        op = self._session.watch(path, recursive)
        if self._start is None:
            raise RuntimeError("this client cannot open a watch")
        watch = Watch(self._start(op), op)
        try:
            watch.wait_ready()
        except BaseException:
            watch.close()
            raise
        return watch

    def stat(self, path: PathArg) -> FileStat:
        stat: FileStat = self._run(self._session.stat(path))
        return stat

    def list(self, path: PathArg) -> list[DirEntry]:
        """Entries of a directory, sorted by name."""
        entries: list[DirEntry] = self._run(self._session.list(path))
        return entries

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        """Remove a file, an empty directory, or with ``recursive`` a whole tree."""
        self._run(self._session.remove(path, recursive))
