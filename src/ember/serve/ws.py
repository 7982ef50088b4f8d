"""Exec over a WebSocket: output as it comes, stdin as the client sends it.

::

    client -> {"cmd": [...], "timeout": S, "env": {...}, "cwd": "..."}     first, as text
    client -> binary messages: the process's stdin;  {"type": "eof"}: close its stdin
    server -> {"type": "stdout"|"stderr", "data": BASE64} ... {"type": "exit", ...ExecResult}
              or {"type": "error", "error": {"code", "message"}}; then the server closes

The exec runs on a worker thread (the SDK is blocking); stdin goes through a
pipe whose read end is the exec's stdin, so the process reads what arrives
when it arrives.  A client that goes away closes the exec (its process group
is killed by the agent when the connection drops).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ember.client import OutputChunk
from ember.sandbox import Sandbox, wire
from ember.serve import models
from ember.serve.manager import Manager, NotFound


class WsExecBody(models.Strict):
    cmd: models.Cmd
    timeout: models.Seconds | None = None
    env: models.Env | None = None
    cwd: models.Cwd | None = None
    stdin: bool = False  # binary messages and {"type": "eof"} follow


class StdinPipe:
    """The exec's stdin: a pipe whose write end is closed exactly once (a second close
    could hit a descriptor number some other thread has been given since)."""

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, "rb", buffering=0)
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            while view and self._write_fd >= 0:
                view = view[os.write(self._write_fd, view) :]

    def close_write(self) -> None:
        with self._lock:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1

    def close(self) -> None:
        self.close_write()
        self.reader.close()


def register(
    app: FastAPI, call: Callable[[str, Callable[[Sandbox], Any]], Any], manager: Manager
) -> None:
    """The ``/exec/ws`` route; a running exec holds its sandbox from the idle reaper."""

    @app.websocket("/sandboxes/{sandbox_id}/exec/ws")
    async def exec_ws(ws: WebSocket, sandbox_id: str) -> None:
        await ws.accept()
        try:
            body = WsExecBody.model_validate_json(await ws.receive_text())
        except (ValidationError, WebSocketDisconnect, KeyError) as exc:
            message = "the first message must be an exec request (JSON)"
            if isinstance(exc, ValidationError):
                message = f"{message}: {exc.errors()[0]['msg']}"
            await _close_with(ws, {"type": "error", "error": {"code": "invalid_request",
                                                              "message": message}})  # fmt: skip
            return
        pipe = StdinPipe() if body.stdin else None

        def start(sb: Sandbox) -> Iterator[OutputChunk]:
            stdin = pipe.reader if pipe is not None else None
            return sb.exec_stream(
                body.cmd, timeout=body.timeout, env=body.env, cwd=body.cwd, stdin=stdin
            )

        try:
            stream = await anyio.to_thread.run_sync(call, sandbox_id, start)
        except Exception as exc:
            if pipe is not None:
                pipe.close()
            await _close_with(ws, {"type": "error", **wire.error_body(exc)[1]})
            return
        with contextlib.ExitStack() as held:
            with contextlib.suppress(NotFound):  # deleted meanwhile: the stream ends too
                held.enter_context(manager.holding(sandbox_id))  # never idle while it runs
            async with anyio.create_task_group() as tasks:
                if pipe is not None:
                    tasks.start_soon(_feed_stdin, ws, pipe)
                try:
                    await anyio.to_thread.run_sync(_drain, ws, stream)
                finally:
                    tasks.cancel_scope.cancel()
                    if pipe is not None:
                        # EOF for the exec's stdin pump, which then ends and drops (closes)
                        # the reader: closing it here could pull it from under a read.
                        pipe.close_write()
        with contextlib.suppress(Exception):
            await ws.close()


async def _close_with(ws: WebSocket, event: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(event))
        await ws.close(1008)


async def _feed_stdin(ws: WebSocket, pipe: StdinPipe) -> None:
    """Client messages into the pipe: bytes are stdin, {"type": "eof"} (or leaving) ends it."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data:
                await anyio.to_thread.run_sync(pipe.write, data)
            elif message.get("text") and json.loads(message["text"]).get("type") == "eof":
                return
    except (ValueError, OSError):
        return
    finally:
        pipe.close_write()


def _drain(ws: WebSocket, stream: Iterator[OutputChunk]) -> None:
    """On a worker thread: the exec's output to the socket, then its result."""

    def send(text: str) -> None:
        anyio.from_thread.run(ws.send_text, text)

    try:
        while True:
            try:
                chunk = next(stream)
            except StopIteration as stop:
                send(json.dumps({"type": "exit", **wire.exec_result_json(stop.value)}))
                return
            send(json.dumps({"type": chunk.stream, "data": wire.b64(chunk.data)}))
    except Exception as exc:
        with contextlib.suppress(Exception):
            send(json.dumps({"type": "error", **wire.error_body(exc)[1]}))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
