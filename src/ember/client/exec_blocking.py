"""``exec_stream``'s output as it arrives, over a blocking connection to the agent.

The asyncio twin is :mod:`ember.client.exec_aio`. What the stream means (chunks, the
RESULT, a timeout) is :class:`ember.client.core.ExecOp`'s; this only moves its frames,
from the socket or from the output's memory ring, and owns the connection: handed back
to the client's keepalive pool when the agent kept it, else closed (which kills the
command), also when the stream is dropped unclosed.
"""

from __future__ import annotations

import socket
import threading
import weakref
from collections.abc import Callable

from ember.client.core import ExecOp, Send, stdin_frames
from ember.client.output_ring import OutputRing
from ember.client.results import ExecResult, OutputChunk
from ember.client.sockets import receive_frame, send_frame
from ember.client.wire import Source
from ember.closing import Closing

__all__ = ["ExecStream"]


class ExecStream(Closing):
    """Output of one command as it arrives; ``result`` is set once it is exhausted.

    Iteration yields :class:`OutputChunk` objects, then ends; if the command overran
    its timeout it raises :class:`SandboxTimeout` instead of ending (``result`` is set
    either way). So it does if the agent has not ended the stream by the host's
    deadline (the timeout plus a grace): then ``result`` has ``timed_out`` set and no
    exit status. Closing it early (or leaving a ``with`` block) hangs up, and the agent
    kills the command's process group.
    """

    def __init__(
        self,
        sock: socket.socket,
        op: ExecOp,
        stdin: Source | None,
        output: OutputRing | None = None,
        *,
        keep: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self._sock = sock
        self._op = op
        self._output = output  # the output's ring, when the request named one
        self._keep = keep  # takes the connection back when the agent kept it
        self._done = False
        # Dropped without close(): still hang up and give the ring slot back, or later
        # transfers would find every slot leased and fall back to vsock.
        self._finalizer = weakref.finalize(self, _abandon, sock, output)
        self._pump: threading.Thread | None = None
        if stdin is not None:
            # stdin goes in on its own thread: the process may need its output
            # read before it will read more input, and that is this thread's job.
            self._pump = threading.Thread(target=self._send_stdin, args=(stdin,), daemon=True)
            self._pump.start()

    @property
    def result(self) -> ExecResult | None:
        return self._op.result

    def _send_stdin(self, source: Source) -> None:
        try:
            for kind, piece in stdin_frames(source):
                send_frame(self._sock, kind, piece)
        except OSError:
            pass  # the process stopped reading, or the call ended: the RESULT says which
        except BaseException as exc:  # reading the caller's stdin failed: abort the call
            self._op.stdin_failed(exc)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> ExecStream:
        return self

    def __next__(self) -> OutputChunk:
        if self._done:
            raise StopIteration
        try:
            while (step := self._op.next()) is not None:
                assert not isinstance(step, Send)
                if self._output is not None:
                    frame = self._output.receive(self._sock, step.deadline)
                else:
                    frame = receive_frame(self._sock, step.deadline)
                chunk = self._op.receive(frame)
                if chunk is not None:
                    return chunk
        except BaseException:
            self.close()
            raise
        self._end()
        raise StopIteration

    def _end(self) -> None:
        """The RESULT came: hand a connection the agent kept back for the next request."""
        if self._keep is None or not self._op.reusable or self._pump is not None or self._done:
            self.close()
            return
        self._done = True
        self._finalizer.detach()
        if self._output is not None:
            self._output.close()
        self._keep(self._sock)

    def close(self) -> None:
        """Hang up (killing the command if it still runs); safe to call twice."""
        if self._done:
            return
        self._done = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # also unblocks the stdin thread
        except OSError:
            pass
        if self._pump is not None:
            self._pump.join()
        self._finalizer.detach()
        _abandon(self._sock, self._output)


def _abandon(sock: socket.socket, output: OutputRing | None) -> None:
    sock.close()
    if output is not None:
        output.close()
