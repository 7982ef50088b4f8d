"""run_code's streamed output and data channels of a daemon's sandbox, blocking and asyncio.

``run_code(..., on_stdout=, on_stderr=)`` asks the daemon for NDJSON (``"stream": true``)
and calls back for each output line before it returns the closing ``result`` line's
:class:`CodeResult`; without a callback the facades keep the one-request call.
``channel(name)`` is a WebSocket (:mod:`ember.serve.streams`): a text ``open`` once the
guest opened the channel, one binary message per message, then a text ``end`` or
``error``.  Leaving a channel's loop early closes the socket, and the daemon abandons the
channel as the in-process SDK does (the guest's next ``send`` fails).

``websockets`` is imported only here, when a channel is asked for: the in-process SDK
never needs it.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ember.client import CodeResult
from ember.errors import EmberError, ProtocolError, SandboxError
from ember.sandbox import daemon, wire

if TYPE_CHECKING:
    import httpx

__all__ = [
    "aio_channel",
    "aio_run_code",
    "channel",
    "code_body",
    "code_event",
    "run_code",
]

MAX_MESSAGE = 1 << 30  # a channel message from the daemon (the guest's are far smaller)
Output = Callable[[str], object] | None
NO_RESULT = "the daemon ended the run_code stream without a result"


# --- run_code
def code_body(code: str, timeout: float | None) -> dict[str, Any]:
    return {"code": code, "timeout": timeout, "stream": True}


def code_event(line: str, on_stdout: Output, on_stderr: Output) -> CodeResult | None:
    """One line of a streamed run_code: output goes to its callback (None then), the last
    line is the result; an error line is raised as the SDK's exception."""
    if not line:
        return None
    event = json.loads(line)
    kind = event.get("type") if isinstance(event, dict) else None
    if kind in ("stdout", "stderr"):
        callback = on_stdout if kind == "stdout" else on_stderr
        if callback is not None:
            callback(str(event["text"]))
        return None
    if kind == "result":
        return wire.code_result(event)
    if kind == "error":
        wire.raise_for(wire.STATUS.get(str(event["error"].get("code")), 500), event)
    raise ProtocolError(f"an unexpected run_code line from the daemon: {line[:80]!r}")


def run_code(
    http: httpx.Client, url: str, path: str, body: dict[str, Any], out: Output, err: Output
) -> CodeResult:
    with daemon.reaching(url), http.stream("POST", path, json=body) as reply:
        if reply.status_code >= 400:
            reply.read()
            daemon.raise_for(reply)
        for line in reply.iter_lines():
            if (result := code_event(line, out, err)) is not None:
                return result
    raise SandboxError(NO_RESULT)


async def aio_run_code(
    http: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], out: Output, err: Output
) -> CodeResult:
    with daemon.reaching(url):
        async with http.stream("POST", path, json=body) as reply:
            if reply.status_code >= 400:
                await reply.aread()
                daemon.raise_for(reply)
            async for line in reply.aiter_lines():
                if (result := code_event(line, out, err)) is not None:
                    return result
    raise SandboxError(NO_RESULT)


# --- channels
def _ws_url(base: str, path: str, name: str, timeout: float | None) -> str:
    scheme, sep, rest = base.partition("://")
    ws = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme) + sep + rest
    query = "" if timeout is None else "?" + urlencode({"timeout": timeout})
    return f"{ws}{path}/channels/{quote(name, safe='')}/ws{query}"


def _control(message: str) -> bool:
    """A text message: True for ``open``, False for ``end``; an error is raised."""
    event = json.loads(message)
    kind = event.get("type") if isinstance(event, dict) else None
    if kind == "error":
        wire.raise_for(wire.STATUS.get(str(event["error"].get("code")), 500), event)
    if kind not in ("open", "end"):
        raise ProtocolError(f"an unexpected channel message from the daemon: {message[:80]!r}")
    return bool(kind == "open")


@contextlib.contextmanager
def _refusals(base: str) -> Iterator[None]:
    """The daemon out of reach, refusing the socket (a bad token) or dropping it: the SDK's
    errors; the daemon's own (a SandboxTimeout, ...) pass as they are."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    try:
        yield
    except EmberError:
        raise
    except InvalidHandshake as exc:
        raise SandboxError(f"the Ember daemon at {base} refused the channel: {exc}") from exc
    except ConnectionClosed as exc:
        raise ProtocolError(f"the channel's connection to the daemon broke: {exc}") from exc
    except OSError as exc:
        raise SandboxError(f"cannot reach the Ember daemon at {base}: {exc}") from exc


def _opened(first: str | bytes) -> None:
    if isinstance(first, bytes) or not _control(first):
        raise ProtocolError("the daemon's channel did not begin with open")


def channel(
    base: str, headers: dict[str, str], path: str, name: str, timeout: float | None
) -> Iterator[bytes]:
    """Connect, wait for the guest to open ``name`` (up to ``timeout``), then its messages."""
    from websockets.sync.client import connect

    with _refusals(base):
        ws = connect(_ws_url(base, path, name, timeout), additional_headers=headers,
                     max_size=MAX_MESSAGE, open_timeout=daemon.CONNECT_TIMEOUT)  # fmt: skip
        ws.__enter__()  # the context manager's connection (closed by _frames or below)
    try:
        with _refusals(base):
            _opened(ws.recv())
    except BaseException:
        ws.close()
        raise
    return _Frames(base, ws)


class _Frames:
    """A channel's messages as they arrive; closing it (or dropping it, or leaving a loop
    over it early) closes the WebSocket, which abandons the channel in the daemon."""

    def __init__(self, base: str, ws: Any) -> None:
        self._base, self._ws = base, ws
        self._done = False

    def __iter__(self) -> _Frames:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            with _refusals(self._base):
                while True:
                    message = self._ws.recv()
                    if isinstance(message, bytes):
                        return message
                    if not _control(message):
                        break
        except BaseException:
            self.close()
            raise
        self._done = True
        self._ws.close()  # the daemon said end: an orderly close
        raise StopIteration

    def close(self) -> None:
        """Hang up now: messages still on their way would hold up an orderly close (the
        connection stops reading while its queue is full), and the channel is given up."""
        if not self._done:
            self._done = True
            with contextlib.suppress(OSError):
                self._ws.socket.shutdown(socket.SHUT_RDWR)
            self._ws.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


async def aio_channel(
    base: str, headers: dict[str, str], path: str, name: str, timeout: float | None
) -> AsyncGenerator[bytes, None]:
    """:func:`channel` for asyncio (the socket opens at the first ``anext``)."""
    from websockets.asyncio.client import connect

    url = _ws_url(base, path, name, timeout)
    with _refusals(base):
        async with connect(url, additional_headers=headers, max_size=MAX_MESSAGE,
                           open_timeout=daemon.CONNECT_TIMEOUT) as ws:  # fmt: skip
            _opened(await ws.recv())
            ended = False
            try:
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        yield message
                    elif not _control(message):
                        ended = True
                        return
            finally:
                if not ended:  # given up early: hang up now (see _Frames.close)
                    ws.transport.abort()
