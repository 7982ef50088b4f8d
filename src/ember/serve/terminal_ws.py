"""A terminal over a WebSocket: ``sb.pty()`` through the daemon, for ``ember shell``.

::

    client -> {"argv": [...], "rows": R, "cols": C, "env": {...}, "cwd": "...", "timeout": S}
              first, as text (every key optional: ``{}`` is a login shell on 24x80)
    client -> binary messages: keystrokes (b"\\x03" is ^C);  text: {"type": "resize", "rows",
              "cols"}, {"type": "signal", "signal": N} (the foreground process group),
              {"type": "eof"} (types ^D)
    server -> binary messages: what the terminal shows;  then {"type": "exit", "exit_code",
              "signal", "timed_out", "duration"}, or {"type": "error", "error": {"code",
              "message"}}; then the server closes (1008 when the terminal never opened)

Why it is built this way: the parameters come in a first message, as for
``/exec/ws``, because ``env`` is a mapping a query string carries badly.  The
terminal (:class:`~ember.client.terminal.Terminal`) is blocking, so its output
is relayed by a worker thread while the event loop reads the client; that
thread alone closes the terminal, so no socket is closed under a read in
progress, and it reads in short slices to notice the client leaving.  A client
that hangs up closes the terminal, and the guest program gets SIGHUP.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import Field, TypeAdapter, ValidationError

from ember.client.terminal import Terminal
from ember.sandbox import Sandbox, wire
from ember.serve import models
from ember.serve.manager import Manager, NotFound

POLL = 0.25  # how often the relay looks whether the client has gone (no output meanwhile)
Size = Annotated[int, Field(ge=1, le=10_000)]


class WsPtyBody(models.Strict):
    argv: list[Annotated[str, Field(max_length=1 << 20)]] | None = Field(
        None, min_length=1, max_length=4096, description="default: the guest's login shell"
    )
    rows: Size = 24
    cols: Size = 80
    env: models.Env | None = None
    cwd: models.Cwd | None = None
    timeout: models.Seconds | None = None


class Resize(models.Strict):
    type: Literal["resize"]
    rows: Size
    cols: Size


class Signal(models.Strict):
    type: Literal["signal"]
    signal: Annotated[int, Field(ge=1, le=64)]


class Eof(models.Strict):
    type: Literal["eof"]


CONTROL = TypeAdapter(Annotated[Resize | Signal | Eof, Field(discriminator="type")])


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"code": code, "message": message}}


class _Session:
    """One terminal and its client: who ended it, and the error to report if any."""

    def __init__(self, ws: WebSocket, term: Terminal) -> None:
        self.ws, self.term = ws, term
        self.gone = threading.Event()  # the client left, or must be dropped: stop relaying
        self.error: dict[str, Any] | None = None

    async def keys(self) -> None:
        """Client messages into the terminal until the client leaves (or is cancelled)."""
        try:
            while True:
                try:
                    message = await self.ws.receive()
                except (WebSocketDisconnect, RuntimeError):  # the connection is gone
                    return
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is not None:
                    await anyio.to_thread.run_sync(self._type, data)
                    continue
                try:
                    control = CONTROL.validate_json(message.get("text") or "")
                except ValidationError as exc:
                    problem = exc.errors()[0]["msg"]
                    self.error = _error("invalid_request", f"not a terminal message: {problem}")
                    return
                await anyio.to_thread.run_sync(self._control, control)
        finally:
            self.gone.set()

    def _type(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the program has ended: its result is coming
            self.term.write(data)

    def _control(self, control: Resize | Signal | Eof) -> None:
        with contextlib.suppress(OSError):
            if isinstance(control, Resize):
                self.term.resize(control.rows, control.cols)
            elif isinstance(control, Signal):
                self.term.signal(control.signal)
            else:
                self.term.send_eof()

    def relay(self) -> None:
        """On a worker thread: the terminal's output to the client, then how it ended."""
        try:
            while not self.gone.is_set():
                data = self.term.read(POLL)
                if data is None:
                    result = self.term.result
                    assert result is not None
                    exit_event = {"type": "exit", **wire.exec_result_json(result)}
                    for key in ("stdout", "stderr"):  # the output went out as it came
                        del exit_event[key]
                    self._send(json.dumps(exit_event))
                    return
                if data:
                    self._send(data)
        except _ClientGone:
            self.gone.set()
        except Exception as exc:
            if self.error is None:
                self.error = {"type": "error", **wire.error_body(exc)[1]}
        finally:
            self.term.close()  # the guest program gets SIGHUP if it still runs

    def _send(self, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                anyio.from_thread.run(self.ws.send_text, message)
            else:
                anyio.from_thread.run(self.ws.send_bytes, message)
        except Exception as exc:
            raise _ClientGone() from exc


class _ClientGone(Exception):
    """Sending to the client failed: it has gone."""


def register(
    app: FastAPI, call: Callable[[str, Callable[[Sandbox], Any]], Any], manager: Manager
) -> None:
    """The ``/pty/ws`` route; an open terminal holds its sandbox from the idle reaper."""

    @app.websocket("/sandboxes/{sandbox_id}/pty/ws")
    async def pty_ws(ws: WebSocket, sandbox_id: str) -> None:
        await ws.accept()
        try:
            body = WsPtyBody.model_validate_json(await ws.receive_text())
        except (ValidationError, WebSocketDisconnect, KeyError) as exc:
            message = "the first message must be a terminal request (JSON)"
            if isinstance(exc, ValidationError):
                message = f"{message}: {exc.errors()[0]['msg']}"
            await _close_with(ws, _error("invalid_request", message))
            return

        def start(sb: Sandbox) -> Terminal:
            return sb.pty(
                body.argv, rows=body.rows, cols=body.cols, env=body.env, cwd=body.cwd,
                timeout=body.timeout,
            )  # fmt: skip

        try:
            term = await anyio.to_thread.run_sync(call, sandbox_id, start)
        except NotFound:
            await _close_with(ws, _error("not_found", f"no sandbox {sandbox_id!r}"))
            return
        except Exception as exc:
            await _close_with(ws, {"type": "error", **wire.error_body(exc)[1]})
            return
        session = _Session(ws, term)
        with contextlib.ExitStack() as held:
            with contextlib.suppress(NotFound):  # deleted meanwhile: its terminal ends too
                held.enter_context(manager.holding(sandbox_id))
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(session.keys)
                await anyio.to_thread.run_sync(session.relay)
                tasks.cancel_scope.cancel()
        with contextlib.suppress(Exception):
            if session.error is not None:
                await ws.send_text(json.dumps(session.error))
            await ws.close()


async def _close_with(ws: WebSocket, event: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(event))
        await ws.close(1008)
