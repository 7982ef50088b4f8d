"""An exec on the asyncio client: :class:`AsyncExecStream`, the twin of
:class:`ember.client.exec_blocking.ExecStream`.

The stream opens its connection on the first ``__anext__``; when the client's sandbox
has a shared region with a free slot, the request names it and the output comes
through it (:mod:`ember.client.output_ring_aio`), else in frames. Either way the
:class:`~ember.client.core.ExecOp` is fed the same frames, so ``max_output``, timeouts
and partial results are the op's, unchanged. The slot goes back on every end: the
RESULT, :meth:`AsyncExecStream.aclose`, an exception or cancellation, and a stream
dropped unclosed (its finalizer also hangs up).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from ember.client.core import ExecOp, Send, stdin_frames
from ember.client.output_ring_aio import AsyncOutputRing
from ember.client.results import ExecResult, OutputChunk
from ember.client.streams import Streams, hang_up, in_loop, receive_frame, send_frame
from ember.client.wire import Source

__all__ = ["AsyncExecStream"]


class AsyncExecStream:
    """Async iterator of :class:`OutputChunk`; ``result`` is set once exhausted.

    Like :class:`ember.client.exec_blocking.ExecStream`: a timeout (the agent's, or the
    host's timeout + grace) raises :class:`SandboxTimeout` at the end; :meth:`aclose`
    hangs up, which kills the command. The connection opens on the first
    ``__anext__``, and the host's deadline counts from then. The output comes through a
    leased slot of the shared region when the client has one free
    (:mod:`ember.client.output_ring_aio`), else in frames.
    """

    def __init__(
        self,
        op: ExecOp,
        stdin: Source | None,
        *,
        start: Callable[[ExecOp], Awaitable[Streams]],
        lease: Callable[[], Awaitable[AsyncOutputRing | None]],
        keep: Callable[[Streams], None],
    ) -> None:
        self._start = start  # sends the REQUEST on a connection (a kept one if it may)
        self._lease = lease  # a slot of the shared region for the output, if one is free
        self._keep = keep  # takes the connection back when the agent kept it
        self._op = op
        self._stdin = stdin
        self._streams: Streams | None = None
        self._output: AsyncOutputRing | None = None  # the output's ring, when the request named one
        self._finalizer: weakref.finalize[Any, AsyncExecStream] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._done = False

    @property
    def result(self) -> ExecResult | None:
        return self._op.result

    async def _send_stdin(self, writer: asyncio.StreamWriter, source: Source) -> None:
        try:
            for kind, piece in stdin_frames(source):
                await send_frame(writer, kind, piece)
        except OSError:
            pass  # the process stopped reading, or the call ended
        except Exception as exc:  # reading the caller's stdin failed: abort the call
            self._op.stdin_failed(exc)
            writer.transport.abort()

    def __aiter__(self) -> AsyncExecStream:
        return self

    async def _open(self) -> Streams:
        """Lease a slot if there is one, then send the request (see AgentClient._exec)."""
        self._op.keepalive = self._stdin is None
        self._output = await self._lease()
        if self._output is not None:
            self._op.request.update(self._output.fields())
        streams = self._streams = await self._start(self._op)
        # Dropped without aclose(): still hang up and give the ring slot back, or later
        # transfers would find every slot leased and fall back to vsock.
        loop = asyncio.get_running_loop()
        self._finalizer = weakref.finalize(self, _abandon, loop, streams[1], self._output)
        if self._stdin is not None:
            self._pump = asyncio.create_task(self._send_stdin(streams[1], self._stdin))
        return streams

    async def __anext__(self) -> OutputChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            streams = self._streams or await self._open()
            while (step := self._op.next()) is not None:
                assert not isinstance(step, Send)
                if self._output is not None:
                    frame = await self._output.receive(streams[0], step.deadline)
                else:
                    frame = await receive_frame(streams[0], step.deadline)
                chunk = self._op.receive(frame)
                if chunk is not None:
                    return chunk
        except BaseException:
            await self.aclose()
            raise
        if self._op.reusable and self._pump is None:
            self._done = True  # the agent kept the connection: the next request may use it
            self._release()
            self._keep(streams)
        else:
            await self.aclose()
        raise StopAsyncIteration

    def _release(self) -> None:
        """Give the slot back (no await: nothing can cut it short)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._output is not None:
            self._output.close()

    async def aclose(self) -> None:
        """Hang up (killing the command if it still runs); safe to call twice."""
        if self._done:
            return
        self._done = True
        self._release()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
        if self._streams is not None:
            await hang_up(self._streams[1])

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _abandon(
    loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, output: AsyncOutputRing | None
) -> None:
    """An exec stream dropped unclosed: hang up and give its slot back (from any thread)."""
    in_loop(loop, writer.transport.abort)
    if output is not None:
        output.close()
