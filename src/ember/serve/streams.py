"""The daemon's long-lived streams: a directory watch, run_code's output, a data channel.

::

    GET  /sandboxes/ID/files/watch?path=/dir&recursive=false     NDJSON
         {"type": "ready", "path"}, then {"type": "create"|..., "path", "is_dir"} per
         event, until {"type": "end", "reason": "removed"} (or {"type": "error", ...})
    POST /sandboxes/ID/run_code {"code", "stream": true}          NDJSON
         {"type": "stdout"|"stderr", "text"} as the cell writes, then {"type": "result",
         ...CodeReply} (or {"type": "error", ...})
    WS   /sandboxes/ID/channels/NAME/ws?timeout=S
         server -> {"type": "open"} (text) once the guest opened NAME, then one binary
         message per message the guest sent, in order, then {"type": "end"} or
         {"type": "error", "error": {...}} (text); then the server closes

Each stream is set up before its reply starts (a bad path, a missing sandbox: the usual
JSON error with its status), so a client that sees ``ready`` knows the guest watches.
The SDK's calls block, so each stream's guest side runs on a worker thread that the
event loop polls or is woken by; a client that goes away ends the stream: the watch's
guest connection is closed within ``POLL`` seconds, and a channel is abandoned (the
guest's next ``send`` fails) when it next delivers a message.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ember.client.watch import Watch
from ember.errors import SandboxTimeout
from ember.sandbox import Sandbox, wire
from ember.serve import models
from ember.serve.guard import json_lines
from ember.serve.manager import Manager, NotFound

Call = Callable[[str, Callable[[Sandbox], Any]], Any]
NDJSON = "application/x-ndjson"
POLL = 1.0  # seconds between looks at a quiet watch or an unopened channel: how soon a
# client's leaving is noticed there
QUEUE = 256  # channel messages held for a slow WebSocket client before the guest waits
_END = object()


def _error(exc: BaseException) -> dict[str, Any]:
    """An error line or message: the body an HTTP route would have replied."""
    if isinstance(exc, NotFound):  # app.py's handler says this for the HTTP routes
        kind = exc.args[1] if len(exc.args) > 1 else "sandbox"
        message = f"no {kind} {exc.args[0]!r}"
        return {"type": "error", "error": {"code": "not_found", "message": message}}
    return {"type": "error", **wire.error_body(exc)[1]}


# --- run_code, streamed
def run_code_lines(
    manager: Manager, call: Call, sandbox_id: str, body: models.CodeBody
) -> StreamingResponse:
    """``run_code`` with the cell's output as NDJSON lines while it runs, then its result."""
    call(sandbox_id, lambda _sb: None)  # a missing or paused sandbox: an error reply, not lines
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def out(stream: str) -> Callable[[str], None]:
        return lambda text: events.put({"type": stream, "text": text})

    def run(sb: Sandbox) -> dict[str, Any]:
        r = sb.run_code(body.code, timeout=body.timeout, on_stdout=out("stdout"),
                        on_stderr=out("stderr"))  # fmt: skip
        return {"type": "result", **wire.code_result_json(r)}

    def work() -> None:
        try:
            with manager.holding(sandbox_id):
                events.put(call(sandbox_id, run))
        except Exception as exc:
            events.put(_error(exc))
        finally:
            events.put(None)

    # The cell runs to its end even if the client leaves (as an unstreamed call does).
    threading.Thread(target=work, name=f"ember-code-{sandbox_id}", daemon=True).start()

    def lines() -> Iterator[bytes]:
        while (event := events.get()) is not None:
            yield json_lines(event)

    return StreamingResponse(lines(), media_type=NDJSON)


# --- files/watch
async def _watch_lines(watch: Watch, path: str, busy: ExitStack) -> AsyncIterator[bytes]:
    """The watch's events as NDJSON; the guest watch is closed however this ends (a client
    that leaves cancels it, at the latest ``POLL`` seconds later), and ``busy`` with it."""
    try:
        yield json_lines({"type": "ready", "path": path})
        while True:
            try:
                event = await anyio.to_thread.run_sync(watch.get, POLL)
            except Exception as exc:
                yield json_lines(_error(exc))
                return
            if event is not None:
                yield json_lines({"type": event.type, "path": event.path, "is_dir": event.is_dir})
            elif watch.ended is not None:
                yield json_lines({"type": "end", "reason": watch.ended})
                return
    finally:
        watch.close()
        busy.close()


# --- channels
class _Relay:
    """One channel's messages, from the thread that reads them to the WebSocket's task."""

    def __init__(self, name: str, timeout: float | None) -> None:
        self.name, self.timeout = name, timeout
        self.items: queue.Queue[bytes | dict[str, Any] | object] = queue.Queue(QUEUE)
        self.gone = threading.Event()  # the client left

    def _put(self, item: bytes | dict[str, Any] | object) -> bool:
        while not self.gone.is_set():
            with contextlib.suppress(queue.Full):
                self.items.put(item, timeout=POLL)
                return True
        return False

    def _open(self, sb: Sandbox) -> Iterator[bytes] | None:
        """The channel once the guest opened it (None: the client left first)."""
        waited = 0.0
        while not self.gone.is_set():
            step = POLL if self.timeout is None else min(POLL, self.timeout - waited)
            try:
                return sb.channel(self.name, timeout=max(step, 0.0))
            except SandboxTimeout:
                waited += step
                if self.timeout is not None and waited >= self.timeout:
                    raise SandboxTimeout(
                        f"the guest did not open channel {self.name!r} in time"
                    ) from None
        return None

    def pump(self, manager: Manager, call: Call, sandbox_id: str) -> None:
        """On its own thread: the guest's messages into ``items``, then how it ended."""
        frames: Iterator[bytes] | None = None
        busy = ExitStack()
        try:
            busy.enter_context(manager.holding(sandbox_id))  # a client listens: not idle
            frames = call(sandbox_id, self._open)
            if frames is None or not self._put({"type": "open"}):
                return
            for frame in frames:
                if not self._put(frame):
                    return  # closing ``frames`` below abandons it: the guest's send fails
            self._put({"type": "end"})
        except Exception as exc:
            self._put(_error(exc))
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            busy.close()
            self._put(_END)

    def next(self) -> bytes | dict[str, Any] | object:
        """The next item, or ``_END`` (waits at most ``POLL`` seconds: None then)."""
        try:
            return self.items.get(timeout=POLL)
        except queue.Empty:
            return None


async def _watch_for_leaving(ws: WebSocket, relay: _Relay, scope: anyio.CancelScope) -> None:
    """The client sends nothing; whatever arrives, its leaving ends the stream."""
    with contextlib.suppress(Exception):
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    relay.gone.set()
    scope.cancel()


async def _relay(ws: WebSocket, relay: _Relay, counted: Callable[[int], None]) -> None:
    while True:
        item = await anyio.to_thread.run_sync(relay.next)
        if item is None:
            continue
        if item is _END:
            return
        try:
            if isinstance(item, bytes):
                await ws.send_bytes(item)
                counted(len(item))
            else:
                await ws.send_text(json.dumps(item))
        except Exception:  # the client left (starlette raises more than one kind for it)
            relay.gone.set()
            return


def register(
    app: FastAPI, manager: Manager, call: Call, counted: Callable[[int], None] = lambda n: None
) -> None:
    """The streaming routes: ``files/watch``, ``channels/NAME/ws`` (run_code's is in app.py,
    which hands ``"stream": true`` bodies to :func:`run_code_lines`); ``counted`` is told
    the size of each channel message relayed (the daemon's metrics)."""

    @app.get("/sandboxes/{sandbox_id}/files/watch",
             responses={200: {"content": {NDJSON: {}}}})  # fmt: skip
    def watch(
        sandbox_id: str,
        path: Annotated[str, Query(min_length=1, max_length=4096, description="a guest dir")],
        recursive: bool = False,
    ) -> StreamingResponse:
        """NDJSON: ``ready`` once the guest watches ``path``, then one line per change,
        until the directory goes (``end``) or the client hangs up."""
        found: Watch = call(sandbox_id, lambda sb: sb.files.watch(path, recursive=recursive))
        busy = ExitStack()
        try:
            busy.enter_context(manager.holding(sandbox_id))
        except BaseException:
            found.close()
            raise
        lines = _watch_lines(found, posixpath.normpath(path), busy)

        # Also when the reply never started (a client gone at once): the lines' finally
        # then never runs, this does.
        def done() -> None:
            found.close()
            busy.close()

        return StreamingResponse(lines, media_type=NDJSON, background=BackgroundTask(done))

    @app.websocket("/sandboxes/{sandbox_id}/channels/{name}/ws")
    async def channel_ws(
        ws: WebSocket,
        sandbox_id: str,
        name: str,
        timeout: Annotated[float | None, Query(gt=0, le=30 * 86400)] = None,
    ) -> None:
        await ws.accept()
        relay = _Relay(name, timeout)
        thread = threading.Thread(target=relay.pump, args=(manager, call, sandbox_id), daemon=True,
                                  name=f"ember-channel-{sandbox_id}")  # fmt: skip
        thread.start()
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_watch_for_leaving, ws, relay, tasks.cancel_scope)
                await _relay(ws, relay, counted)
                tasks.cancel_scope.cancel()
        finally:
            relay.gone.set()  # the pump stops at its next look
        with contextlib.suppress(Exception):
            await ws.close()
