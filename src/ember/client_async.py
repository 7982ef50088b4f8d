"""asyncio twin of :mod:`ember.client`: same operations, same names, awaitable.

``connect`` is an async function returning a connected ``(StreamReader,
StreamWriter)`` pair, e.g. ``lambda: asyncio.open_unix_connection(path)``; it
is called once per operation, as in the blocking client, so any number of
operations may run concurrently on one :class:`AsyncAgentClient`.

Request building and answer checking are shared with the blocking client
(:mod:`ember.client_wire`); only the waiting differs. Backpressure comes from
``StreamWriter.drain()``: an upload goes no faster than the guest takes it.
So do the host's own deadlines (each wait under ``asyncio.timeout``) and the
``max_output`` bound of ``exec``/``files.read``.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

from ember.client import KEEPALIVE_IDLE_S, KEEPALIVE_MAX
from ember.client_errors import AgentError, ProtocolError, SandboxTimeout
from ember.client_wire import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_OUTPUT,
    WORKER_START_ALLOWANCE,
    CallBounds,
    CodeResult,
    Command,
    Deadline,
    DirEntry,
    ExecResult,
    FileStat,
    OutputChunk,
    PathArg,
    ResumeAnnouncer,
    Source,
    check_max_output,
    check_result,
    code_request,
    data_chunks,
    exec_request,
    file_too_large,
    host_timeout_result,
    output_too_large,
    parse_code_result,
    parse_exec_result,
    parse_list,
    parse_size,
    parse_stat,
    path_request,
    remote_error,
    unexpected,
    write_request,
)
from ember.protocol import (
    HEADER,
    KEEPALIVE_OPS,
    MAX_FRAME,
    Kind,
    Payload,
    encode_json,
    parse_header,
)
from ember.protocol import ProtocolError as WireProtocolError

__all__ = ["AsyncAgentClient", "AsyncExecStream", "AsyncFiles", "read_frame_async"]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
AsyncConnect = Callable[[], Awaitable[Streams]]
T = TypeVar("T")


async def _within(deadline: Deadline | None, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, or raise the deadline's :class:`SandboxTimeout` when it passes."""
    if deadline is None:
        return await awaitable
    limit = asyncio.timeout(max(deadline.remaining(), 0.0))
    try:
        async with limit:
            return await awaitable
    except TimeoutError:
        if limit.expired():
            raise deadline.expired() from None
        raise


async def read_frame_async(
    reader: asyncio.StreamReader, deadline: Deadline | None = None
) -> tuple[Kind, bytes] | None:
    """Read one frame; ``None`` on a clean EOF between frames. With a ``deadline``, the
    whole frame must be in by then (a peer dripping bytes cannot stretch it)."""
    return await _within(deadline, _read_frame(reader))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Kind, bytes] | None:
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed in the middle of a frame header") from None
    try:
        kind, length = parse_header(header)
    except WireProtocolError as exc:
        raise ProtocolError(str(exc)) from None
    if not length:
        return kind, b""
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"connection closed {length - len(exc.partial)} bytes short") from None


async def write_frame_async(
    writer: asyncio.StreamWriter,
    kind: Kind,
    payload: Payload = b"",
    deadline: Deadline | None = None,
) -> None:
    """Send one frame; with a ``deadline``, a guest that stops reading is given up on then."""
    view = memoryview(payload).cast("B")
    if view.nbytes > MAX_FRAME:
        raise ProtocolError(f"refusing to send a {view.nbytes}-byte frame (limit {MAX_FRAME})")
    writer.write(HEADER.pack(view.nbytes, kind))
    if view.nbytes:
        writer.write(view)
    await _within(deadline, writer.drain())


async def _close(writer: asyncio.StreamWriter) -> None:
    """Hang up without waiting on the guest: a graceful close first sends what is still
    buffered, and a guest that stopped reading would keep ``wait_closed()`` waiting for ever."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


class AsyncExecStream:
    """Async iterator of :class:`OutputChunk`; ``result`` is set once exhausted.

    Like :class:`ember.client.ExecStream`: a timeout (the agent's, or the host's
    timeout + grace) raises :class:`SandboxTimeout` at the end; :meth:`aclose`
    hangs up, which kills the command. The connection opens on the first
    ``__anext__``, and the host's deadline counts from then.
    """

    def __init__(self, client: AsyncAgentClient, request: dict[str, Any], stdin: Source | None):
        self._client = client
        self._request = request
        self._stdin = stdin
        self._deadline: Deadline | None = None
        self._started = 0.0
        self._streams: Streams | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pump_error: BaseException | None = None
        self._done = False
        self.result: ExecResult | None = None

    async def _send_stdin(self, writer: asyncio.StreamWriter, source: Source) -> None:
        try:
            for piece in data_chunks(source):
                await write_frame_async(writer, Kind.STDIN, piece)
            await write_frame_async(writer, Kind.STDIN_EOF)
        except OSError:
            pass  # the process stopped reading, or the call ended
        except Exception as exc:  # reading the caller's stdin failed: abort the call
            self._pump_error = exc
            writer.transport.abort()

    def __aiter__(self) -> AsyncExecStream:
        return self

    async def __anext__(self) -> OutputChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._streams is None:
                self._started = time.monotonic()
                timeout = self._request.get("timeout")
                if timeout is not None:
                    self._deadline = self._client._bounds.call("exec", timeout)
                self._streams = await self._client._open(self._request)
                if self._stdin is not None:
                    pump = self._send_stdin(self._streams[1], self._stdin)
                    self._pump = asyncio.create_task(pump)
            try:
                frame = await read_frame_async(self._streams[0], self._deadline)
            except SandboxTimeout as exc:  # the host's deadline: the agent never said
                self.result = host_timeout_result(self._started)
                raise SandboxTimeout(str(exc), self.result) from None
            if frame is not None and frame[0] is Kind.STDOUT:
                return OutputChunk("stdout", frame[1])
            if frame is not None and frame[0] is Kind.STDERR:
                return OutputChunk("stderr", frame[1])
            if frame is not None and frame[0] is Kind.ERROR:
                raise remote_error(frame[1])
            if frame is None and self._pump_error is not None:
                raise self._pump_error
            self.result = parse_exec_result(check_result(frame, "exec"))
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        if self.result.timed_out:
            raise SandboxTimeout(
                f"the command overran its timeout after {self.result.duration:.3g} s "
                "and its process group was killed",
                self.result,
            )
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Hang up (killing the command if it still runs); safe to call twice."""
        if self._done:
            return
        self._done = True
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
        if self._streams is not None:
            await _close(self._streams[1])

    async def __aenter__(self) -> AsyncExecStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncFiles:
    """Async twin of :class:`ember.client.Files`."""

    def __init__(self, client: AsyncAgentClient) -> None:
        self._client = client

    async def write(
        self, path: PathArg, data: Source, *, mode: int | None = None, append: bool = False
    ) -> int:
        reader, writer = await self._client._open(write_request(path, mode, append))
        try:
            sent_error: OSError | None = None
            sent = 0
            try:
                for piece in data_chunks(data):
                    deadline = self._client._bounds.frame(path)
                    await write_frame_async(writer, Kind.DATA, piece, deadline)
                    sent += memoryview(piece).nbytes
                await write_frame_async(
                    writer, Kind.DATA_EOF, b"", self._client._bounds.frame(path)
                )
            except SandboxTimeout:
                raise
            except OSError as exc:
                sent_error = exc
            frame = await read_frame_async(reader, self._client._bounds.call("file_write", None))
            if frame is None and sent_error is not None:
                raise ProtocolError(f"upload to {path} failed: {sent_error}") from sent_error
            size = parse_size(check_result(frame, "file_write"))
        finally:
            await _close(writer)
        if sent_error is None and size != sent:
            raise ProtocolError(f"file_write took {sent} bytes but said it wrote {size}")
        return size

    async def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return await self._receive(path, fileobj, None)

    async def _receive(self, path: PathArg, fileobj: BinaryIO, limit: int | None) -> int:
        reader, writer = await self._client._open(path_request("file_read", path))
        try:
            total = 0
            while True:
                frame = await read_frame_async(reader, self._client._bounds.frame(path))
                if frame is not None and frame[0] is Kind.DATA:
                    if limit is not None and total + len(frame[1]) > limit:
                        raise file_too_large(path, limit)
                    fileobj.write(frame[1])
                    total += len(frame[1])
                elif frame is not None and frame[0] is Kind.DATA_EOF:
                    deadline = self._client._bounds.call("file_read", None)
                    answer = await read_frame_async(reader, deadline)
                    size = parse_size(check_result(answer, "file_read"))
                    if size != total:
                        raise ProtocolError(f"file_read sent {total} bytes but said {size}")
                    return total
                elif frame is not None and frame[0] is Kind.ERROR:
                    raise remote_error(frame[1])
                else:
                    raise unexpected(frame, "file_read")
        finally:
            await _close(writer)

    async def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        limit = check_max_output(max_output)
        buf = io.BytesIO()
        await self._receive(path, buf, limit)
        return buf.getvalue()

    async def stat(self, path: PathArg) -> FileStat:
        return parse_stat(await self._client._call(path_request("stat", path)))

    async def list(self, path: PathArg) -> list[DirEntry]:
        return parse_list(await self._client._call(path_request("list", path)))

    async def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        await self._client._call(path_request("remove", path, recursive=recursive))


class AsyncAgentClient:
    """asyncio client for the guest agent; see :class:`ember.client.AgentClient`.

    Like the blocking client, short calls keep their connection for the next one
    (closed after ``KEEPALIVE_IDLE_S`` unused) and the first one may take over a
    connection carried over in a restored snapshot (``resume``); ``grace`` and
    ``call_timeout`` bound every wait on the agent the same way.
    """

    def __init__(
        self,
        connect: AsyncConnect,
        *,
        resume: Callable[[], Awaitable[Streams | None]] | None = None,
        grace: float = DEFAULT_GRACE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        announce_resume: bool = False,
    ) -> None:
        self._connect = connect
        self._bounds = CallBounds(grace, call_timeout)
        self._resume = resume
        # A new VMM (restored, forked): its first request carries the host's clock and
        # entropy, applied by the agent before anything else runs (client_wire.resume_announcement).
        self._announcer = ResumeAnnouncer(announce_resume)
        self.files = AsyncFiles(self)
        self._kept: list[tuple[Streams, float]] = []
        self._expiry: asyncio.TimerHandle | None = None

    async def _open(self, request: dict[str, Any]) -> Streams:
        reader, writer = await self._connect()
        try:
            deadline = self._bounds.send()
            payload = encode_json(self._announcer.stamp(request))
            await write_frame_async(writer, Kind.REQUEST, payload, deadline)
        except BaseException:
            writer.transport.abort()  # a graceful close would wait to send the request
            raise
        return reader, writer

    async def _call(self, request: dict[str, Any], *, unbounded: bool = False) -> dict[str, Any]:
        """One short exchange under ``call_timeout`` + ``grace`` (see AgentClient._call)."""
        op = str(request["op"])
        return await self._exchange(request, None if unbounded else self._bounds.call(op, None))

    async def _exchange(self, request: dict[str, Any], deadline: Deadline | None) -> dict[str, Any]:
        op = str(request["op"])
        if op not in KEEPALIVE_OPS:
            reader, writer = await self._open(request)
            try:
                return check_result(await read_frame_async(reader, deadline), op)
            finally:
                await _close(writer)
        payload = encode_json({**self._announcer.stamp(request), "keepalive": True})
        sending = deadline or self._bounds.send()
        streams = await self._take_kept()
        if streams is not None:
            try:
                await write_frame_async(streams[1], Kind.REQUEST, payload, sending)
            except SandboxTimeout:
                await _close(streams[1])
                raise
            except OSError:  # closed under us before the request left: nothing ran
                await _close(streams[1])
                streams = None
        if streams is None:
            streams = await self._connect()
            try:
                await write_frame_async(streams[1], Kind.REQUEST, payload, sending)
            except BaseException:
                await _close(streams[1])
                raise
        try:
            result = check_result(await read_frame_async(streams[0], deadline), op)
        except AgentError:
            self._keep(streams)  # an error reply ends the exchange cleanly
            raise
        except BaseException:
            await _close(streams[1])
            raise
        self._keep(streams)
        return result

    async def _take_kept(self) -> Streams | None:
        while self._kept:
            (reader, writer), _ = self._kept.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        resume, self._resume = self._resume, None
        return await resume() if resume is not None else None

    def _keep(self, streams: Streams) -> None:
        if len(self._kept) >= KEEPALIVE_MAX:
            streams[1].close()
            return
        loop = asyncio.get_running_loop()
        self._kept.append((streams, loop.time()))
        if self._expiry is None:
            self._expiry = loop.call_later(KEEPALIVE_IDLE_S, self._expire)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = None
        fresh = []
        for streams, since in self._kept:
            if loop.time() - since >= KEEPALIVE_IDLE_S:
                streams[1].close()
            else:
                fresh.append((streams, since))
        self._kept = fresh
        if fresh:
            self._expiry = loop.call_later(KEEPALIVE_IDLE_S, self._expire)

    async def close(self) -> None:
        """Close the kept connections (the client stays usable)."""
        kept, self._kept = self._kept, []
        for (_reader, writer), _ in kept:
            await _close(writer)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    async def ping(self) -> dict[str, Any]:
        return await self._call({"op": "ping"})

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
    ) -> AsyncExecStream:
        request = exec_request(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None)
        return AsyncExecStream(self, request, stdin)

    async def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        limit = check_max_output(max_output)
        out, err = bytearray(), bytearray()
        stream = self.exec_stream(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin)
        try:
            async with stream:
                async for chunk in stream:
                    if limit is not None and len(out) + len(err) + len(chunk.data) > limit:
                        raise output_too_large(limit)
                    (out if chunk.stream == "stdout" else err).extend(chunk.data)
        except SandboxTimeout as exc:
            assert exc.result is not None
            partial = replace(exc.result, stdout=bytes(out), stderr=bytes(err))
            raise SandboxTimeout(str(exc), partial) from None
        assert stream.result is not None
        return replace(stream.result, stdout=bytes(out), stderr=bytes(err))

    async def run_code(self, code: str, timeout: float | None = None) -> CodeResult:
        request = code_request(code, timeout)
        if timeout is None:
            return parse_code_result(await self._call(request, unbounded=True))
        deadline = self._bounds.call("run_code", timeout, WORKER_START_ALLOWANCE)
        return parse_code_result(await self._exchange(request, deadline))

    async def shutdown(self) -> None:
        await self._call({"op": "shutdown"})
