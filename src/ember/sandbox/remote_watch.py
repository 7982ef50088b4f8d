"""``sb.files.watch(path)`` of a daemon's sandbox: the daemon's NDJSON watch stream.

:class:`RemoteWatch` and :class:`AsyncRemoteWatch` have the methods of the in-process
:class:`~ember.client.watch.Watch` and ``AsyncWatch``: they are returned once the guest
watches (the daemon's ``ready`` line), iterate :class:`FileEvent` objects until the
directory goes (``ended == "removed"``), poll with ``get(timeout)``, and closing them
hangs up, which ends the guest's watch.

The blocking one reads its reply on a thread of its own: an HTTP read cannot be given up
after a timeout and resumed, and ``get(timeout)`` must not lose a line.  That thread
holds at most ``QUEUE`` events (then the daemon, and the guest's kernel queue behind it,
wait), and ``close`` shuts the connection's socket down under it, so it never outlives
the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ember.client import PathArg
from ember.client.results import FileEvent, parse_file_event
from ember.client.streams import Pending
from ember.closing import AsyncClosing, Closing
from ember.errors import ProtocolError
from ember.sandbox import daemon, wire

if TYPE_CHECKING:
    import httpx

__all__ = ["AsyncRemoteWatch", "RemoteWatch", "watch_event", "watch_params"]

QUEUE = 1024
_POLL = 0.5  # how often a reader waiting for room looks whether the watch was closed


class _End:
    def __init__(self, reason: str) -> None:
        self.reason = reason


_CLOSED = _End("")  # wakes a get() blocked when another thread closes the watch


def watch_params(path: PathArg, recursive: bool) -> dict[str, Any]:
    return {"path": str(path), "recursive": "true" if recursive else "false"}


def watch_event(line: str) -> FileEvent | _End | None:
    """One line of the daemon's watch stream: an event, its end, or None (ready, a blank);
    an error line is raised as the SDK's exception."""
    if not line:
        return None
    event = json.loads(line)
    kind = event.get("type") if isinstance(event, dict) else None
    if kind == "ready":
        return None
    if kind == "end":
        return _End(str(event.get("reason", "ended")))
    if kind == "error":
        wire.raise_for(wire.STATUS.get(str(event["error"].get("code")), 500), event)
    if not isinstance(kind, str):
        raise ProtocolError(f"a watch line without a type: {line[:80]!r}")
    return parse_file_event(event)


def _expect_ready(line: str | None) -> None:
    event = json.loads(line) if line else None
    if not isinstance(event, dict) or event.get("type") != "ready":
        raise ProtocolError(f"the daemon's watch began with {line!r:.80} instead of ready")


class RemoteWatch(Closing):
    """File events under one guest directory of a daemon's sandbox (see ``Watch``)."""

    def __init__(self, opened: contextlib.AbstractContextManager[httpx.Response], url: str) -> None:
        self._opened, self._url = opened, url
        reply = opened.__enter__()
        try:
            if reply.status_code >= 400:
                reply.read()
                daemon.raise_for(reply)
            self._lines = reply.iter_lines()
            _expect_ready(next(self._lines, None))
        except BaseException:
            opened.__exit__(None, None, None)
            raise
        stream = reply.extensions.get("network_stream")
        self._sock: socket.socket | None = (
            stream.get_extra_info("socket") if stream is not None else None
        )
        self._items: queue.Queue[FileEvent | _End | BaseException] = queue.Queue(QUEUE)
        self._closed = threading.Event()
        self._ended: str | None = None
        self._done = False
        self._thread = threading.Thread(target=self._read, name="ember-watch", daemon=True)
        self._thread.start()

    def _put(self, item: FileEvent | _End | BaseException) -> bool:
        while not self._closed.is_set():
            with contextlib.suppress(queue.Full):
                self._items.put(item, timeout=_POLL)
                return True
        return False

    def _read(self) -> None:
        """On its own thread: the reply's lines into the queue, until the end or close."""
        try:
            with daemon.reaching(self._url):
                for line in self._lines:
                    event = watch_event(line)
                    if event is not None and not self._put(event):
                        return
                    if isinstance(event, _End):
                        return
            self._put(ProtocolError("the daemon ended the watch without saying why"))
        except Exception as exc:
            if not self._closed.is_set():
                self._put(exc)
        finally:
            with contextlib.suppress(Exception):
                self._opened.__exit__(None, None, None)

    @property
    def ended(self) -> str | None:
        """Why the watch ended (``"removed"``), or None while it runs."""
        return self._ended

    def wait_ready(self) -> None:
        """Nothing to wait for: a RemoteWatch is made once the guest watches."""

    def get(self, timeout: float | None = None) -> FileEvent | None:
        """The next event; None if ``timeout`` passed first or the watch has ended."""
        if self._done:
            return None
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, FileEvent):
            return item
        self._done = True
        if isinstance(item, _End):
            self._ended = item.reason if item is not _CLOSED else None
            return None
        raise item

    def __iter__(self) -> RemoteWatch:
        return self

    def __next__(self) -> FileEvent:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        """Stop watching (safe to call twice): the daemon hangs up on the guest's watch."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._done = True
        if self._sock is None:  # no socket to shut down (another transport): hang up
            with contextlib.suppress(Exception):
                self._opened.__exit__(None, None, None)
            with contextlib.suppress(queue.Full):
                self._items.put_nowait(_CLOSED)
            return
        with contextlib.suppress(OSError):  # wakes the reading thread; the daemon sees us leave
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        with contextlib.suppress(queue.Full):  # a full queue wakes a blocked get() anyway
            self._items.put_nowait(_CLOSED)


class AsyncRemoteWatch(AsyncClosing):
    """:class:`RemoteWatch` for asyncio: ``async for event in watch``, ``await get(timeout)``."""

    def __init__(
        self, opened: contextlib.AbstractAsyncContextManager[httpx.Response], url: str
    ) -> None:
        self._opened, self._url = opened, url
        self._lines: AsyncIterator[str] | None = None
        self._next: Pending[str] = Pending()
        self._ended: str | None = None
        self._done = False

    async def _open(self) -> AsyncRemoteWatch:
        """Send the request and wait for the daemon's ``ready`` line."""
        reply = await self._opened.__aenter__()
        try:
            if reply.status_code >= 400:
                await reply.aread()
                daemon.raise_for(reply)
            self._lines = reply.aiter_lines()
            _expect_ready(await anext(self._lines, None))
        except BaseException:
            await self._opened.__aexit__(None, None, None)
            raise
        return self

    @property
    def ended(self) -> str | None:
        return self._ended

    async def wait_ready(self) -> None:
        """Nothing to wait for: an AsyncRemoteWatch is returned once the guest watches."""

    async def get(self, timeout: float | None = None) -> FileEvent | None:
        while not self._done and self._lines is not None:
            try:
                with daemon.reaching(self._url):
                    arrived, line = await self._next.take(timeout, anext, self._lines)
                    if not arrived:
                        return None
                    assert line is not None
                    event = watch_event(line)
            except StopAsyncIteration:
                self._done = True
                raise ProtocolError("the daemon ended the watch without saying why") from None
            except BaseException:
                self._done = True
                raise
            if isinstance(event, _End):
                self._done, self._ended = True, event.reason
                return None
            if event is not None:
                return event
        return None

    def __aiter__(self) -> AsyncRemoteWatch:
        return self

    async def __anext__(self) -> FileEvent:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        """Stop watching (safe to call twice)."""
        self._done = True
        task = self._next.cancel()
        if task is not None:
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: a read that failed as it was given up
        if self._lines is not None:
            self._lines = None
            with contextlib.suppress(Exception):
                await self._opened.__aexit__(None, None, None)
