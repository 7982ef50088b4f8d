"""The asyncio transport: the same operations as :mod:`ember.client.blocking`, awaitable.

``connect`` is an async function returning a connected ``(StreamReader, StreamWriter)``
pair, e.g. ``lambda: asyncio.open_unix_connection(path)``; it is called once per
operation, as in the blocking client, so any number of operations may run concurrently
on one :class:`AsyncAgentClient`. What each operation means lives in
:mod:`ember.client.core`; only the waiting differs. Backpressure comes from
``StreamWriter.drain()``: an upload goes no faster than the guest takes it.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, BinaryIO, TypeVar

from ember.client.bounds import DEFAULT_CALL_TIMEOUT, DEFAULT_GRACE, DEFAULT_MAX_OUTPUT
from ember.client.code_ring import CodeRing
from ember.client.core import Command, ExecOp, Operation, PathArg
from ember.client.exec_aio import AsyncExecStream
from ember.client.file_ring import FileRing
from ember.client.kept import KeptSockets
from ember.client.output_ring_aio import AsyncOutputRing
from ember.client.results import CodeResult, DirEntry, ExecResult, FileStat, parse_code_result
from ember.client.session import (
    EXPIRY_SLACK_S,
    INLINE_WRITE_MAX,
    KeepalivePool,
    Session,
    streamed,
)
from ember.client.shm import HostRegion
from ember.client.streams import Streams, drive, hang_up, send_frame
from ember.client.terminal import AsyncTerminal
from ember.client.watch import AsyncWatch
from ember.client.wire import Source
from ember.errors import SandboxTimeout
from ember.protocol import Kind

__all__ = ["AsyncAgentClient", "AsyncConnect", "AsyncExecStream", "AsyncFiles", "Streams"]

AsyncConnect = Callable[[], Awaitable[Streams]]
Conn = Streams  # a connection to the agent (the blocking client's: its socket)
T = TypeVar("T")
_CLOCK = time.monotonic  # what asyncio's loop.time() is too


class AsyncFiles:
    """Async twin of :class:`ember.client.blocking.Files`."""

    def __init__(
        self,
        session: Session,
        run: Callable[..., Awaitable[Any]],
        ring: FileRing | None = None,
        start: Callable[[Operation[Any]], Awaitable[Streams]] | None = None,
    ) -> None:
        self._session = session
        self._run = run
        self._start = start  # opens a connection for a long-lived op (watch)
        # The shared region's path, tried first. Its waits are memory polls and eventfds,
        # so it runs in a worker thread (a cancelled call finishes its transfer there).
        self._ring = ring

    async def write(
        self, path: PathArg, data: Source, *, mode: int | None = None, append: bool = False
    ) -> int:
        op = self._session.write_file(path, data, mode, append)  # checks the arguments
        trailer = op.inline(INLINE_WRITE_MAX)  # small: one packet on a kept connection
        if trailer is None and self._ring is not None:
            size = await asyncio.to_thread(self._ring.write, op.request["path"], data, mode, append)
            if size is not None:
                return size
        written: int = await self._run(op, trailer or b"")
        return written

    async def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return await self._read(path, fileobj.write, None, small_first=False)

    async def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        buf = io.BytesIO()
        await self._read(path, buf.write, max_output, small_first=True)
        return buf.getvalue()

    async def _read(
        self, path: PathArg, sink: Callable[[bytes], object], limit: int | None, small_first: bool
    ) -> int:
        op = self._session.read_file(path, sink, limit)  # checks the arguments
        # A small file comes whole in one exchange; read_into is for big ones: straight on.
        get = self._session.get_file(path, op.limit) if small_first else None
        if get is not None:
            await self._run(get)
            if (data := self._session.got_file(get)) is not None:
                sink(data)
                return len(data)
        if self._ring is not None:
            size = await asyncio.to_thread(self._ring.read, os.fspath(path), sink, op.limit)
            if size is not None:
                return size
        read: int = await self._run(op)
        return read

    async def watch(self, path: PathArg, *, recursive: bool = False) -> AsyncWatch:
        """Changes under the directory ``path``; see ``Files.watch``."""
        op = self._session.watch(path, recursive)
        if self._start is None:
            raise RuntimeError("this client cannot open a watch")
        watch = AsyncWatch(await self._start(op), op)
        try:
            await watch.wait_ready()
        except BaseException:
            await watch.close()
            raise
        return watch

    async def stat(self, path: PathArg) -> FileStat:
        stat: FileStat = await self._run(self._session.stat(path))
        return stat

    async def list(self, path: PathArg) -> list[DirEntry]:
        entries: list[DirEntry] = await self._run(self._session.list(path))
        return entries

    async def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        await self._run(self._session.remove(path, recursive))


class AsyncAgentClient:
    """asyncio client for the guest agent; see :class:`ember.client.blocking.AgentClient`.

    Like the blocking client, short calls keep their connection for the next one
    (closed after ``KEEPALIVE_IDLE_S`` unused) and the first one may take over a
    connection carried over in a restored snapshot (``resume``); ``grace`` and
    ``call_timeout`` bound every wait on the agent the same way. With ``shm`` (the
    sandbox's shared region), an exec's output comes through a leased slot as the
    blocking client's does, its waits on the loop; file transfers through the region
    also need ``ring_connect`` (their waits block, so they run in a worker thread).
    """

    def __init__(
        self,
        connect: AsyncConnect,
        *,
        resume: Callable[[], Awaitable[Streams | None]] | None = None,
        grace: float = DEFAULT_GRACE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        announce_resume: bool = False,
        code_ring: CodeRing | None = None,
        shm: Callable[[], HostRegion | None] | None = None,
        ring_connect: Callable[[], socket.socket] | None = None,
    ) -> None:
        self._connect = connect
        self._code_ring = code_ring
        self._session = Session(
            grace=grace, call_timeout=call_timeout, announce_resume=announce_resume, clock=_CLOCK
        )
        if code_ring is not None:  # a restored VM's worker need not poll for other requests
            self._session.not_yet = code_ring.not_yet
        self._resume = resume
        self._shm = shm
        self._region: HostRegion | None = None  # self._shm(), once asked
        self._pool: KeepalivePool[Streams] = KeepalivePool(_CLOCK)
        self._expiry: asyncio.TimerHandle | None = None
        # The ring's transfers run in a worker thread on blocking sockets, so they keep their
        # connections apart from the streams the other calls keep (see ember.client.kept).
        self._ring_kept = KeptSockets(clock=_CLOCK)
        files_ring = None
        if shm is not None and ring_connect is not None:  # the ring's waits are blocking ones
            session = self._session
            files_ring = FileRing(
                shm, ring_connect, session.encode, session.bounds, self._ring_kept
            )
        self.files = AsyncFiles(self._session, self._run, files_ring, self._start)

    async def _start(self, op: Operation[Any], trailer: bytes = b"") -> Streams:
        """A connection with ``op``'s REQUEST (and ``trailer``) sent on it (a kept one if
        ``op`` may); see ``AgentClient._start``."""
        payload = self._session.request(op)
        streams = await self._take_kept() if op.keepalive else None
        if streams is not None:
            try:
                await send_frame(
                    streams[1], Kind.REQUEST, payload, op.send_deadline, trailer=trailer
                )
                return streams
            except SandboxTimeout:
                await hang_up(streams[1])
                raise
            except OSError:  # closed under us before the request left: nothing ran
                await hang_up(streams[1])
        streams = await self._connect()
        try:
            await send_frame(streams[1], Kind.REQUEST, payload, op.send_deadline, trailer=trailer)
        except BaseException:
            streams[1].transport.abort()  # a graceful close would wait to send the request
            raise
        return streams

    async def _lease_output(self) -> AsyncOutputRing | None:
        """A slot for an exec's output, or None (no region, every slot in use): frames then.
        The region is asked for once, in a worker thread: the first ask may be a request
        to the VMM over its control socket, which must not hold up the loop."""
        if self._shm is None:
            return None
        if self._region is None:
            self._region = await asyncio.to_thread(self._shm)
            if self._region is None:
                self._shm = None  # the sandbox has none (or an older VMM): never ask again
        return AsyncOutputRing.lease(self._region)

    async def _run(self, op: Operation[T], trailer: bytes = b"") -> T:
        streams = await self._start(op, trailer)
        try:
            return await drive(streams, op)
        finally:
            if op.reusable:
                self._keep(streams)
            else:
                await hang_up(streams[1])

    async def _take_kept(self) -> Streams | None:
        while (streams := self._pool.pop()) is not None:
            if not streams[0].at_eof() and not streams[1].is_closing():
                return streams
            streams[1].close()
        resume, self._resume = self._resume, None
        return await resume() if resume is not None else None

    def take_kept(self) -> Conn | None:
        """The newest kept connection, out of the pool; see ``AgentClient.take_kept``."""
        return self._pool.pop()

    def adopt(self, conn: Conn) -> None:
        """Take over a warmed VM's agent connection; see ``AgentClient.adopt``."""
        self._session.announced()
        self._keep(conn)

    def _keep(self, streams: Streams) -> None:
        if not self._pool.put(streams):
            streams[1].close()
        else:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        """A timer for when the oldest kept connection is due (none when none is kept)."""
        due = self._pool.next_expiry()
        if self._expiry is None and due is not None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(due + EXPIRY_SLACK_S, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        for _reader, writer in self._pool.expire():
            writer.close()
        self._arm_expiry()

    async def close(self) -> None:
        """Close the kept connections (the client stays usable)."""
        self._ring_kept.close()
        for _reader, writer in self._pool.drain():
            await hang_up(writer)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    async def ping(self) -> dict[str, Any]:
        """``{"pong", "version", "uptime", "pid", "worker"}``; see ``AgentClient.ping``."""
        return await self._run(self._session.ping())

    async def warm_pool(self) -> list[int]:
        """The pre-started interpreters rehearse a program's start; see
        ``AgentClient.warm_pool``."""
        return await self._run(self._session.warm_pool())

    async def pool_modules(self) -> list[str]:
        """The modules the pre-started interpreters imported; see
        ``AgentClient.pool_modules``."""
        return await self._run(self._session.pool_modules())

    async def pool_huge(self) -> list[int]:
        """Where the warm interpreters' heaps are in 2 MiB guest pages; see
        ``AgentClient.pool_huge``."""
        return await self._run(self._session.pool_huge())

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> AsyncExecStream:
        """Start ``cmd`` and stream its output; see ``AgentClient.exec_stream``."""
        op = self._session.exec(
            cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None, files=files
        )
        return self._exec(op, stdin)

    def _exec(self, op: ExecOp, stdin: Source | None) -> AsyncExecStream:
        return AsyncExecStream(
            op, stdin, start=self._start, lease=self._lease_output, keep=self._keep
        )

    async def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecResult:
        """Run ``cmd`` to completion; see ``AgentClient.exec``."""
        op = self._session.exec(
            cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None,
            collect=True, max_output=max_output, files=files,
        )  # fmt: skip
        async with self._exec(op, stdin) as stream:
            async for _ in stream:  # a collecting op keeps the output: no chunks come out
                pass
        return op.value

    async def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncTerminal:
        """A program on a terminal in the guest; see ``AgentClient.pty``."""
        op = self._session.pty(argv, rows=rows, cols=cols, env=env, cwd=cwd, timeout=timeout)
        return AsyncTerminal(await self._start(op), op)

    async def run_code(
        self,
        code: str,
        timeout: float | None = None,
        *,
        linger: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        """Python in the sandbox's persistent interpreter; see ``AgentClient.run_code``
        (the callbacks are called in the event loop's thread, so keep them quick)."""
        on_output = streamed(on_stdout, on_stderr)
        if self._code_ring is not None and on_output is None:
            loop = asyncio.get_running_loop()

            def agent(request: dict[str, Any]) -> dict[str, Any]:  # from the waiting thread
                call = self._run(self._session.code_ring(request))
                return asyncio.run_coroutine_threadsafe(call, loop).result()

            request = self._session.ring_request(code, linger)
            reply = await asyncio.to_thread(self._code_ring.call, request, timeout, agent)
            if reply is not None:
                return parse_code_result(reply)
        return await self._run(self._session.run_code(code, timeout, linger, on_output))

    async def shutdown(self) -> None:
        """Ask the agent to exit (tests and orderly teardown)."""
        await self._run(self._session.shutdown())
