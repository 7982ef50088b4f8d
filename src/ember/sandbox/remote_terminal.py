"""A daemon's terminal: ``RemoteSandbox.pty()`` over ``/sandboxes/ID/pty/ws``.

:class:`RemoteTerminal` and :class:`AsyncRemoteTerminal` have the methods of
the in-process :class:`~ember.client.terminal.Terminal` and its asyncio twin
(and are ones, so code typed for ``sb.pty()`` takes either), but speak the
daemon's WebSocket (:mod:`ember.serve.terminal_ws`) instead of the agent's
frames: keystrokes are binary messages, a resize, a signal and ^D small JSON
texts, the output binary messages and the end one ``exit`` text.  What a
message means is decided once, in :class:`_Events`, for both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import NoReturn

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as sync_connect

from ember.client import ExecResult
from ember.client.interactive import pty_request, resize_payload, signal_payload
from ember.client.terminal import KEYS_CHUNK, AsyncTerminal, Terminal
from ember.errors import SandboxError
from ember.sandbox import wire

__all__ = ["AsyncRemoteTerminal", "RemoteTerminal", "open_async", "open_sync", "request"]

OPEN_TIMEOUT = 10.0
NO_RESULT = "the daemon closed the terminal without saying how the program ended"


def request(
    argv: Sequence[str] | None,
    *,
    rows: int,
    cols: int,
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> str:
    """The socket's first message: the terminal asked for (checked as the in-process one is)."""
    body = pty_request(
        None if argv is None else list(argv), rows=rows, cols=cols, env=env, cwd=cwd,
        timeout=timeout,
    )  # fmt: skip
    del body["op"]
    return json.dumps(body)


def _control(kind: str, payload: bytes) -> str:
    """A control message: the agent's own payload (checked there) with its ``type``."""
    return json.dumps({"type": kind, **json.loads(payload)})


def _ws_url(server: str, path: str) -> str:
    scheme, sep, rest = server.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise SandboxError(f"the Ember daemon's URL {server!r} is not http(s)://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


def _refused(server: str, exc: Exception) -> SandboxError:
    if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
        return wire.ServerError("unauthorized", "the daemon refused the token", 401)
    if isinstance(exc, InvalidStatus):
        return wire.ServerError("bad_request", f"the daemon refused the terminal: {exc}", 400)
    return SandboxError(f"cannot reach the Ember daemon at {server}: {exc}")


class _Events:
    """What the daemon's messages mean: output, the end, or an error (raised)."""

    def __init__(self) -> None:
        self.result: ExecResult | None = None
        self.ended = False

    def take(self, message: str | bytes) -> bytes | None:
        """Output, or None once the program has ended (``result`` says how)."""
        if isinstance(message, bytes):
            return message
        event = json.loads(message)
        self.ended = True
        if not isinstance(event, dict):
            raise SandboxError(f"the daemon sent {message[:200]!r} on a terminal")
        if event.get("type") == "exit":
            self.result = wire.exec_result(event)
            return None
        error = event.get("error")
        code = str(error.get("code")) if isinstance(error, dict) else "internal"
        wire.raise_for(wire.STATUS.get(code, 500), event)
        raise SandboxError(f"the daemon sent {message[:200]!r} on a terminal")

    def closed(self) -> NoReturn:
        self.ended = True
        raise SandboxError(NO_RESULT)


def _gone(exc: ConnectionClosed) -> BrokenPipeError:
    """Sending on a terminal that is gone: an OSError, as from the in-process one."""
    return BrokenPipeError(f"the terminal's connection is closed ({exc})")


def _with_output(result: ExecResult, out: bytes) -> ExecResult:
    return ExecResult(result.exit_code, result.signal, out, b"", result.timed_out, result.duration)


def open_sync(server: str, authorization: str, path: str, first: str) -> RemoteTerminal:
    """Connect to ``path`` (``/sandboxes/ID/pty/ws``) of the daemon at ``server``."""
    # Entered as a context (websockets >= 17 warns about a connection used otherwise),
    # left by the terminal's close().
    stack = contextlib.ExitStack()
    try:
        url, headers = _ws_url(server, path), {"Authorization": authorization}
        connecting = sync_connect(
            url, additional_headers=headers, open_timeout=OPEN_TIMEOUT, compression=None
        )
        ws = stack.enter_context(connecting)
    except (OSError, InvalidStatus, InvalidURI, TimeoutError) as exc:
        raise _refused(server, exc) from exc
    try:
        ws.send(first)
    except BaseException:
        stack.close()
        raise
    return RemoteTerminal(ws, stack)


class RemoteTerminal(Terminal):
    """A program on a terminal of a daemon's sandbox (see :class:`Terminal`).

    The connection's own thread answers the daemon's pings, so a caller may leave
    a quiet terminal unread for as long as it likes.
    """

    def __init__(self, ws: ClientConnection, stack: contextlib.ExitStack) -> None:
        # Terminal's state (an agent socket and its op) has no use here: not initialised.
        self._ws, self._stack = ws, stack
        self._events = _Events()

    @property
    def result(self) -> ExecResult | None:
        return self._events.result

    def _put(self, message: str | bytes) -> None:
        try:
            self._ws.send(message)
        except ConnectionClosed as exc:
            raise _gone(exc) from exc

    def write(self, data: bytes) -> None:
        """Type ``data`` (bytes as a keyboard sends them: ``b"\\x03"`` is ^C)."""
        for start in range(0, len(data), KEYS_CHUNK):
            self._put(bytes(data[start : start + KEYS_CHUNK]))

    def resize(self, rows: int, cols: int) -> None:
        self._put(_control("resize", resize_payload(rows, cols)))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the terminal's foreground process group."""
        self._put(_control("signal", signal_payload(signum)))

    def send_eof(self) -> None:
        """Type the terminal's end-of-file character (^D)."""
        self._put(json.dumps({"type": "eof"}))

    def read(self, timeout: float | None = None) -> bytes | None:
        if self._events.ended:
            return None
        try:
            message = self._ws.recv(None if timeout is None else max(timeout, 0.0))
        except TimeoutError:
            return b""
        except ConnectionClosed:
            self._events.closed()
        data = self._events.take(message)
        if data is None:
            self.close()
        return data

    def close(self) -> None:
        """Hang up (the program gets SIGHUP if it still runs); safe to call twice."""
        self._stack.close()


async def open_async(server: str, authorization: str, path: str, first: str) -> AsyncRemoteTerminal:
    """:func:`open_sync` for asyncio."""
    try:
        ws = await async_connect(
            _ws_url(server, path), additional_headers={"Authorization": authorization},
            open_timeout=OPEN_TIMEOUT, compression=None,
        )  # fmt: skip
    except (OSError, InvalidStatus, InvalidURI, TimeoutError) as exc:
        raise _refused(server, exc) from exc
    try:
        await ws.send(first)
    except BaseException:
        await ws.close()
        raise
    return AsyncRemoteTerminal(ws)


class AsyncRemoteTerminal(AsyncTerminal):
    """:class:`RemoteTerminal` for asyncio: the same methods, awaited."""

    def __init__(self, ws: AsyncConnection) -> None:
        # AsyncTerminal's state (agent streams and an op) has no use here: not initialised.
        self._ws = ws
        self._events = _Events()

    @property
    def result(self) -> ExecResult | None:
        return self._events.result

    async def _put(self, message: str | bytes) -> None:
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise _gone(exc) from exc

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), KEYS_CHUNK):
            await self._put(bytes(data[start : start + KEYS_CHUNK]))

    async def resize(self, rows: int, cols: int) -> None:
        await self._put(_control("resize", resize_payload(rows, cols)))

    async def signal(self, signum: int) -> None:
        await self._put(_control("signal", signal_payload(signum)))

    async def send_eof(self) -> None:
        await self._put(json.dumps({"type": "eof"}))

    async def read(self, timeout: float | None = None) -> bytes | None:
        if self._events.ended:
            return None
        try:
            # cancelling recv() loses nothing: the message waits for the next call
            async with asyncio.timeout(timeout):
                message = await self._ws.recv()
        except TimeoutError:
            return b""
        except ConnectionClosed:
            self._events.closed()
        data = self._events.take(message)
        if data is None:
            await self.close()
        return data

    async def close(self) -> None:
        await self._ws.close()
