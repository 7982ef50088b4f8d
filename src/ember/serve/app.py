"""The daemon's HTTP API (FastAPI): sandboxes by id, exec (JSON or NDJSON), run_code, files.

Handlers are plain functions, so FastAPI runs them on its thread pool: the
SDK's Sandbox is blocking and thread-safe (one agent connection per call).
Every failure is a JSON ``{"error": {"code", "message"}}`` with a stable code
(:mod:`ember.sandbox.wire`); a traceback only ever reaches the daemon's log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException

from ember.errors import EmberError, SandboxCrashed
from ember.sandbox import Sandbox, wire
from ember.serve import models, streams, terminal_ws
from ember.serve.guard import Guard, json_lines
from ember.serve.manager import CreateArgs, Entry, ForkArgs, Manager, NotFound
from ember.serve.mcp_http import McpMount
from ember.serve.metrics import Metrics
from ember.serve.state import valid_id

log = logging.getLogger("ember.serve")
T = TypeVar("T")
THREADS = 256  # blocking handlers and streams at once (each exec stream holds one)
PathQ = Annotated[str, Query(min_length=1, max_length=4096, description="a path in the guest")]
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": models.ErrorReply} for s in (401, 404, 409, 413, 422, 504)
}


def create_app(manager: Manager, *, token: str, max_body: int = 128 << 20) -> Guard:
    """The API app behind its token and size guard."""
    metrics = Metrics()
    manager._on_event = metrics.event
    mcp = McpMount(manager)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with mcp.running():
            yield

    app = FastAPI(
        title="Ember", version="0.1.0", lifespan=lifespan, responses=ERRORS,
        description="MicroVM sandboxes as a service. Every request needs "
        "`Authorization: Bearer TOKEN` (the daemon's token file). Bytes are base64.",
        dependencies=[],
    )  # fmt: skip
    bearer = HTTPBearer(auto_error=False)  # documents the scheme; Guard enforces it
    from fastapi import Depends

    app.router.dependencies.append(Depends(bearer))
    app.mount("/mcp", mcp.app)  # MCP over streamable HTTP (ember.serve.mcp_http)

    def entry(sandbox_id: str) -> Entry:
        if not valid_id(sandbox_id):
            raise NotFound(sandbox_id)
        return manager.get(sandbox_id)

    def noting_crash(sandbox_id: str, op: Callable[[Entry], T]) -> T:
        """``op`` on a sandbox's entry; a crash found on the way is recorded as such."""
        e = entry(sandbox_id)
        seen = e.sandbox  # a pause and resume meanwhile replace it: that one is not crashed
        try:
            return op(e)
        except SandboxCrashed as exc:
            manager.mark_crashed(e, str(exc), exc.console_tail, seen=seen)
            raise

    def call(sandbox_id: str, op: Callable[[Sandbox], T]) -> T:
        """``op`` on a running sandbox; a crash found on the way is recorded as such."""
        return noting_crash(sandbox_id, lambda e: op(manager.running(e.record.id)[1]))

    # --- errors
    @app.exception_handler(RequestValidationError)
    async def invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg"))} for e in exc.errors()]
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": "the request is malformed",
                       "details": details}}, status_code=422,
        )  # fmt: skip

    @app.exception_handler(HTTPException)
    async def http_error(_r: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 401: "unauthorized"}.get(exc.status_code, "bad_request")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code
        )

    @app.exception_handler(NotFound)
    async def not_found(_r: Request, exc: NotFound) -> JSONResponse:
        kind = exc.args[1] if len(exc.args) > 1 else "sandbox"
        return JSONResponse(
            {"error": {"code": "not_found", "message": f"no {kind} {exc.args[0]!r}"}},
            status_code=404,
        )

    @app.exception_handler(EmberError)
    @app.exception_handler(ValueError)
    @app.exception_handler(Exception)
    async def failed(_r: Request, exc: Exception) -> JSONResponse:
        status, body = wire.error_body(exc)
        if status >= 500 and body["error"]["code"] == "internal":
            log.error("request failed", exc_info=exc)
        return JSONResponse(body, status_code=status)

    # --- sandboxes
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "sandboxes": manager.counts()}

    @app.post("/sandboxes", status_code=201, response_model=models.SandboxInfo)
    def create(body: models.CreateBody) -> dict[str, Any]:
        started = time.perf_counter()
        e = manager.create(CreateArgs(**body.model_dump()))
        metrics.create_seconds.observe(time.perf_counter() - started)
        return e.json()

    @app.get("/sandboxes", response_model=models.SandboxList)
    def list_(
        metadata: Annotated[list[str] | None, Query(description="KEY=VALUE, all match")] = None,
        state: Annotated[str | None, Query(pattern="^(running|paused|crashed)$")] = None,
    ) -> dict[str, Any]:
        want: dict[str, str] = {}
        for item in metadata or []:
            key, sep, value = item.partition("=")
            if not sep:
                problem = {"loc": ["query", "metadata"], "msg": "metadata filters are KEY=VALUE"}
                raise RequestValidationError([problem])
            want[key] = value
        return {"sandboxes": [e.json() for e in manager.find(want, state)]}

    @app.get("/sandboxes/{sandbox_id}", response_model=models.SandboxInfo)
    def get(sandbox_id: str) -> dict[str, Any]:
        return entry(sandbox_id).json()

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    def delete(sandbox_id: str) -> Response:
        manager.delete(entry(sandbox_id).record.id)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/timeout", response_model=models.SandboxInfo)
    def set_timeout(sandbox_id: str, body: models.TimeoutBody) -> dict[str, Any]:
        return manager.set_timeout(entry(sandbox_id).record.id, body.timeout).json()

    @app.post("/sandboxes/{sandbox_id}/pause", response_model=models.SandboxInfo)
    def pause(sandbox_id: str) -> dict[str, Any]:
        """Snapshot to disk and stop the VMM (no CPU, memory back to the host)."""
        return manager.pause(entry(sandbox_id).record.id).json()

    @app.post("/sandboxes/{sandbox_id}/resume", response_model=models.SandboxInfo)
    def resume(sandbox_id: str) -> dict[str, Any]:
        """Restore a paused sandbox from its snapshot, state intact."""
        started = time.perf_counter()
        info = manager.resume(entry(sandbox_id).record.id).json()
        metrics.create_seconds.observe(time.perf_counter() - started)
        return info

    @app.post("/sandboxes/{sandbox_id}/fork", status_code=201,
              response_model=models.SandboxInfo)  # fmt: skip
    def fork(sandbox_id: str, body: models.ForkBody | None = None) -> dict[str, Any]:
        """A new sandbox (its own id) continuing from this one's state: memory, processes,
        files. Connections open in the parent are not carried over; the two then diverge."""
        body = body or models.ForkBody()
        args = ForkArgs(metadata=body.metadata, timeout=body.timeout,
                        keep_timeout="timeout" not in body.model_fields_set)  # fmt: skip
        started = time.perf_counter()
        info = noting_crash(sandbox_id, lambda e: manager.fork(e.record.id, args)).json()
        metrics.create_seconds.observe(time.perf_counter() - started)
        return info

    @app.post("/sandboxes/{sandbox_id}/snapshot", status_code=201,
              response_model=models.TemplateReply)  # fmt: skip
    def snapshot(sandbox_id: str, body: models.SnapshotBody) -> dict[str, str]:
        """Save the sandbox as it is now as a template: ``POST /sandboxes {"template": NAME}``
        then starts sandboxes from it. The sandbox runs on."""
        noting_crash(sandbox_id, lambda e: manager.snapshot(e.record.id, body.name))
        return {"template": body.name}

    @app.post("/sandboxes/{sandbox_id}/expose", response_model=models.ExposeReply)
    def expose(sandbox_id: str, body: models.ExposeBody) -> dict[str, Any]:
        """Forward a TCP port of a networked sandbox (``network`` at create): connect to
        the address and port answered, from the daemon's host."""
        address, port = noting_crash(sandbox_id, lambda e: manager.expose(e.record.id, body.port))
        return {"address": address, "port": port}

    @app.get("/sandboxes/{sandbox_id}/console")
    def console(
        sandbox_id: str, lines: Annotated[int, Query(ge=1, le=1000)] = 30
    ) -> dict[str, str]:
        """The tail of the guest console (a crashed sandbox's: as it was when it crashed)."""
        e = entry(sandbox_id)
        sb = e.sandbox
        return {"console": sb._vmm.console_tail(lines) if sb is not None else e.console}

    @app.get("/sandboxes/{sandbox_id}/ping")
    def ping(sandbox_id: str) -> dict[str, Any]:
        return call(sandbox_id, lambda sb: sb.ping())

    @app.get("/sandboxes/{sandbox_id}/metrics")
    def sandbox_metrics(sandbox_id: str) -> dict[str, Any]:
        """The sandbox's CPU and memory (its cgroup) and, running, the guest's own memory
        statistics through the balloon (``guest``: virtio-balloon names, bytes)."""
        e = entry(sandbox_id)
        group = e.sandbox.cgroup if e.sandbox is not None else None
        guest: dict[str, int] | None = None
        if e.sandbox is not None and e.state.value == "running":
            with contextlib.suppress(EmberError, OSError):
                guest = e.sandbox.memory_stats(timeout=5.0)
        return {
            "id": e.record.id, "state": e.state.value,
            "cpu_seconds": group.cpu_usage_seconds() if group is not None else None,
            "memory_peak_bytes": group.memory_peak_bytes() if group is not None else None,
            "memory_bytes": group.memory_current_bytes() if group is not None else None,
            "guest": guest,
        }  # fmt: skip

    # --- processes and code
    @app.post("/sandboxes/{sandbox_id}/exec", response_model=models.ExecReply,
              responses={200: {"content": {"application/x-ndjson": {}}}})  # fmt: skip
    def exec_(sandbox_id: str, body: models.ExecBody) -> Any:
        stdin = wire.unb64(body.stdin) if body.stdin is not None else None
        files = None if body.files is None else {
            path: wire.unb64(data) for path, data in body.files.items()}  # fmt: skip
        kwargs: dict[str, Any] = {"timeout": body.timeout, "env": body.env, "cwd": body.cwd,
                                  "stdin": stdin, "files": files}  # fmt: skip
        if not body.stream:
            started = time.perf_counter()
            r = call(sandbox_id, lambda sb: sb.exec(body.cmd, max_output=body.max_output, **kwargs))
            metrics.exec_seconds.labels("exec").observe(time.perf_counter() - started)
            return wire.exec_result_json(r)
        stream = call(sandbox_id, lambda sb: sb.exec_stream(body.cmd, **kwargs))
        held = manager.streaming(entry(sandbox_id), stream)  # never idle while it streams
        return StreamingResponse(_ndjson(held), media_type="application/x-ndjson")

    @app.post("/sandboxes/{sandbox_id}/run_code", response_model=models.CodeReply,
              responses={200: {"content": {"application/x-ndjson": {}}}})  # fmt: skip
    def run_code(sandbox_id: str, body: models.CodeBody) -> Any:
        if body.stream:
            return streams.run_code_lines(manager, call, sandbox_id, body)
        started = time.perf_counter()
        r = call(sandbox_id, lambda sb: sb.run_code(body.code, timeout=body.timeout))
        metrics.exec_seconds.labels("run_code").observe(time.perf_counter() - started)
        return wire.code_result_json(r)

    # --- files
    @app.get("/sandboxes/{sandbox_id}/files", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})  # fmt: skip
    def read_file(
        sandbox_id: str, path: PathQ,
        max_output: Annotated[int, Query(ge=0, le=1 << 30)] = 64 << 20,
    ) -> Response:  # fmt: skip
        data = call(sandbox_id, lambda sb: sb.files.read(path, max_output=max_output))
        metrics.file_bytes.labels("read").inc(len(data))
        return Response(data, media_type="application/octet-stream")

    raw_body: dict[str, Any] = {"requestBody": {"content": {"application/octet-stream": {}}}}

    @app.put("/sandboxes/{sandbox_id}/files", response_model=models.WriteReply,
             openapi_extra=raw_body)  # fmt: skip
    async def write_file(
        sandbox_id: str, path: PathQ, request: Request,
        mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None,
    ) -> dict[str, int]:  # fmt: skip
        data = await request.body()
        size = await anyio.to_thread.run_sync(
            lambda: call(sandbox_id, lambda sb: sb.files.write(path, data, mode=mode))
        )
        metrics.file_bytes.labels("write").inc(len(data))
        return {"size": size}

    @app.get("/sandboxes/{sandbox_id}/files/stat", response_model=models.FileStatReply)
    def stat(sandbox_id: str, path: PathQ) -> dict[str, Any]:
        return wire.stat_json(call(sandbox_id, lambda sb: sb.files.stat(path)))

    @app.get("/sandboxes/{sandbox_id}/files/list", response_model=models.DirList)
    def list_dir(sandbox_id: str, path: PathQ) -> dict[str, Any]:
        found = call(sandbox_id, lambda sb: sb.files.list(path))
        return {"entries": [wire.entry_json(e) for e in found]}

    @app.delete("/sandboxes/{sandbox_id}/files", status_code=204)
    def remove(sandbox_id: str, path: PathQ, recursive: bool = False) -> Response:
        call(sandbox_id, lambda sb: sb.files.remove(path, recursive=recursive))
        return Response(status_code=204)

    # --- the daemon
    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(manager), media_type="text/plain; version=0.0.4")

    from ember.serve import processes, ws

    ws.register(app, call, manager)
    terminal_ws.register(app, call, manager)
    streams.register(app, manager, call, metrics.channel_bytes.inc)
    background = processes.register(app, manager, call)

    def on_event(event: str, sandbox_id: str) -> None:
        metrics.event(event, sandbox_id)
        if event in ("deleted", "crashed", "paused"):
            background.forget(sandbox_id)

    manager._on_event = on_event
    app.state.manager = manager
    app.state.metrics = metrics
    return Guard(app, token=token, max_body=max_body)


def _ndjson(stream: Iterator[Any]) -> Iterator[bytes]:
    """An exec stream as NDJSON lines: stdout/stderr chunks, then exit (or error)."""
    try:
        while True:
            try:
                chunk = next(stream)
            except StopIteration as stop:
                yield json_lines({"type": "exit", **wire.exec_result_json(stop.value)})
                return
            yield json_lines({"type": chunk.stream, "data": wire.b64(chunk.data)})
    except Exception as exc:
        _status, body = wire.error_body(exc)
        yield json_lines({"type": "error", **body})
