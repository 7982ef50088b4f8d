"""The agent protocol's operations as sans-IO state machines (the pattern of h11/wsproto).

One operation is one REQUEST and its answer on one connection. Each is an object
that tells its transport what to do next and is fed what came back::

    op = session.stat("/etc/hosts")           # checks the arguments, builds the REQUEST
    send(session.request(op), op.send_deadline)
    while (step := op.next()) is not None:
        if isinstance(step, Send):             # a frame to send (upload data)
            try: send(step.kind, step.payload, step.deadline)
            except OSError as exc: op.send_failed(exc)
        else:                                  # Receive: a frame, None at EOF, or EXPIRED
            event = op.receive(read(step.deadline))   # OutputChunk or None
    op.value                                   # FileStat; errors were raised by receive

Nothing here opens a socket, waits or reads a clock of its own (the :class:`Session` is
given one): the blocking and asyncio transports, and any later one (HTTP, WebSocket),
only move frames. Every rule of an operation lives here once: which frames may come
in which order, what an ERROR frame raises, ``max_output``, the host's deadlines and
what a timeout leaves behind, whether the connection may carry the next request.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ember.client import results
from ember.client.bounds import CallBounds, Deadline, file_too_large, output_too_large
from ember.client.results import ExecResult, OutputChunk
from ember.client.wire import (
    Frame,
    Source,
    check_result,
    data_chunks,
    decode,
    frame_header,
    remote_error,
)
from ember.client.wire import unexpected as unexpected_frame
from ember.errors import ProtocolError, SandboxTimeout
from ember.protocol import KEEPALIVE_OPS, Kind, Payload

__all__ = [
    "EXPIRED",
    "Call",
    "Command",
    "ExecOp",
    "Expired",
    "Incoming",
    "Operation",
    "PathArg",
    "ReadFile",
    "Receive",
    "Send",
    "StreamedCode",
    "WriteFile",
    "stdin_frames",
]

Command = Sequence[str] | str
PathArg = str | os.PathLike[str]
T = TypeVar("T")


class Expired:
    """The type of :data:`EXPIRED` (there is no other instance)."""

    def __repr__(self) -> str:
        return "EXPIRED"


EXPIRED = Expired()
"""Fed to :meth:`Operation.receive` when the step's deadline passed before a whole frame."""

Incoming = Frame | None | Expired
"""What a transport feeds an operation: a frame, ``None`` (a clean EOF), or EXPIRED."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send this frame, giving up at ``deadline`` (a guest that stops reading)."""

    kind: Kind
    payload: Payload
    deadline: Deadline | None


@dataclass(frozen=True, slots=True)
class Receive:
    """Read one frame, whole by ``deadline`` (``None``: wait as long as it takes)."""

    deadline: Deadline | None


class Operation(Generic[T]):
    """One request and its answer. ``value`` is set once :meth:`next` returns ``None``;
    ``reusable`` says whether the connection ended cleanly and may carry the next request."""

    def __init__(self, request: dict[str, Any], bounds: CallBounds) -> None:
        self.request = request
        self.op = str(request["op"])
        self.bounds = bounds
        self.keepalive = False
        self.reusable = False
        self.send_deadline = bounds.send()
        self.done = False
        self._waiting: Deadline | None = None
        self._value: T | None = None

    @property
    def value(self) -> T:
        if not self.done:
            raise RuntimeError(f"{self.op!r} has not finished")
        return self._value  # type: ignore[return-value]

    def start(self) -> None:
        """The REQUEST is being encoded: clocks that count from the call's start start now."""

    def _finish(self, value: T) -> None:
        self._value, self.done = value, True

    def next(self) -> Send | Receive | None:
        """What the transport does next (the previous Send went out unless send_failed)."""
        return None if self.done else Receive(self._wait())

    def _wait(self) -> Deadline | None:
        return self._waiting

    def send_failed(self, exc: OSError) -> None:
        """The last Send did not go out: the connection broke."""
        raise exc

    def receive(self, incoming: Incoming) -> OutputChunk | None:
        """Feed what the last Receive got; raises what the answer means."""
        if incoming is EXPIRED:
            raise self._expired()
        assert not isinstance(incoming, Expired)
        return self._frame(incoming)

    def _expired(self) -> SandboxTimeout:
        assert self._waiting is not None
        return self._waiting.expired()

    def _frame(self, frame: Frame | None) -> OutputChunk | None:
        raise NotImplementedError


class Call(Operation[T]):
    """A short exchange: REQUEST in, one RESULT (or ERROR) out, parsed by ``parse``.

    The ops in ``KEEPALIVE_OPS`` ask the agent to keep the connection for the next one.
    """

    def __init__(
        self,
        request: dict[str, Any],
        bounds: CallBounds,
        parse: Callable[[dict[str, Any]], T],
        deadline: Deadline | None,
    ) -> None:
        super().__init__(request, bounds)
        self.keepalive = self.op in KEEPALIVE_OPS
        self._parse = parse
        self._waiting = deadline
        self.send_deadline = deadline or self.send_deadline

    def _frame(self, frame: Frame | None) -> None:
        if frame is not None and frame[0] is Kind.ERROR:
            error = remote_error(frame[1])
            self.reusable = self.keepalive  # an error reply ends the exchange cleanly
            raise error
        if frame is None or frame[0] is not Kind.RESULT:
            raise unexpected_frame(frame, self.op)
        obj = decode(frame[1])
        self.reusable = self.keepalive
        self._finish(self._parse(obj))


class StreamedCode(Call[results.CodeResult]):
    """``run_code`` with ``"stream": true``: the cell's output comes as STDOUT/STDERR frames
    while it runs, each decoded (a character cut between frames waits for its rest) and
    passed to ``on_output(stream, text)``; then the usual RESULT, which holds it all too."""

    def __init__(
        self,
        request: dict[str, Any],
        bounds: CallBounds,
        deadline: Deadline | None,
        on_output: Callable[[str, str], None],
    ) -> None:
        super().__init__({**request, "stream": True}, bounds, results.parse_code_result, deadline)
        self._on_output = on_output
        self._decoders = {
            Kind.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            Kind.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }

    def _frame(self, frame: Frame | None) -> None:
        if frame is not None and frame[0] in self._decoders:
            text = self._decoders[frame[0]].decode(frame[1])
            if text:
                self._on_output("stdout" if frame[0] is Kind.STDOUT else "stderr", text)
            return
        super()._frame(frame)


class ExecOp(Operation[ExecResult]):
    """A command's output frames, then its RESULT.

    Streaming (``collect=False``), each output frame is an :class:`OutputChunk` event;
    collecting, the op keeps the output itself, at most ``max_output`` bytes of it.
    Either way a timeout (the agent's, or the host's deadline) raises
    :class:`SandboxTimeout` carrying the partial result, which is also ``result``.
    """

    def __init__(
        self,
        request: dict[str, Any],
        bounds: CallBounds,
        *,
        collect: bool = False,
        max_output: int | None = None,
    ) -> None:
        super().__init__(request, bounds)
        self._started = 0.0
        self._collect = collect
        self._limit = max_output
        self._out = bytearray()
        self._err = bytearray()
        self._stdin_error: BaseException | None = None
        self.result: ExecResult | None = None

    def start(self) -> None:
        timeout = self.request.get("timeout")
        self._waiting = None if timeout is None else self.bounds.call("exec", timeout)
        self._started = self.bounds.clock()

    def stdin_failed(self, exc: BaseException) -> None:
        """Reading the caller's stdin raised ``exc``: it ends the call (the transport hangs up)."""
        self._stdin_error = exc

    def _expired(self) -> SandboxTimeout:
        """The host's deadline: the agent never said how the command ended."""
        self.done = True
        duration = self.bounds.clock() - self._started
        self.result = ExecResult(None, None, bytes(self._out), bytes(self._err), True, duration)
        return SandboxTimeout(str(super()._expired()), self.result)

    def _frame(self, frame: Frame | None) -> OutputChunk | None:
        if frame is not None and frame[0] in (Kind.STDOUT, Kind.STDERR):
            stream: Literal["stdout", "stderr"] = "stdout" if frame[0] is Kind.STDOUT else "stderr"
            if not self._collect:
                return OutputChunk(stream, frame[1])
            if self._limit is not None and (
                len(self._out) + len(self._err) + len(frame[1]) > self._limit
            ):
                raise output_too_large(self._limit)
            (self._out if stream == "stdout" else self._err).extend(frame[1])
            return None
        if frame is None and self._stdin_error is not None:
            raise self._stdin_error
        obj = check_result(frame, "exec")
        self.reusable = self.keepalive and obj.get("keepalive") is True  # the agent agreed
        self.result = results.parse_exec_result(obj, bytes(self._out), bytes(self._err))
        sent = len(self.request.get("files") or ())
        if sent and obj.get("files") != sent:  # an agent from before exec's files ignored them
            raise ProtocolError(
                f"the guest agent wrote {obj.get('files') or 0} of the command's {sent} files "
                "(a snapshot from an older Ember?): write them with files.write instead"
            )
        self._finish(self.result)
        if self.result.timed_out:
            raise SandboxTimeout(
                f"the command overran its timeout after {self.result.duration:.3g} s "
                "and its process group was killed",
                self.result,
            )
        return None


def stdin_frames(source: Source) -> Iterator[tuple[Kind, Payload]]:
    """The frames that carry an exec's stdin (sent beside the op, by the transport)."""
    for piece in data_chunks(source):
        yield Kind.STDIN, piece
    yield Kind.STDIN_EOF, b""


class ReadFile(Operation[int]):
    """file_read: DATA frames into ``sink``, DATA_EOF, then a RESULT that must agree."""

    def __init__(
        self,
        path: str,
        bounds: CallBounds,
        sink: Callable[[bytes], object],
        limit: int | None,
    ) -> None:
        super().__init__({"op": "file_read", "path": path}, bounds)
        self._path = path
        self._sink = sink
        self.limit = limit
        self._total = 0
        self._ended = False  # DATA_EOF came: the RESULT is next

    def _wait(self) -> Deadline:
        self._waiting = (
            self.bounds.call("file_read", None) if self._ended else self.bounds.frame(self._path)
        )
        return self._waiting

    def _frame(self, frame: Frame | None) -> None:
        if self._ended:
            size = results.parse_size(check_result(frame, "file_read"))
            if size != self._total:
                raise ProtocolError(f"file_read sent {self._total} bytes but said {size}")
            self._finish(self._total)
        elif frame is not None and frame[0] is Kind.DATA:
            if self.limit is not None and self._total + len(frame[1]) > self.limit:
                raise file_too_large(self._path, self.limit)
            self._sink(frame[1])
            self._total += len(frame[1])
        elif frame is not None and frame[0] is Kind.DATA_EOF:
            self._ended = True
        elif frame is not None and frame[0] is Kind.ERROR:
            raise remote_error(frame[1])
        else:
            raise unexpected_frame(frame, "file_read")


class WriteFile(Operation[int]):
    """file_write: DATA frames, DATA_EOF, then a RESULT that must agree with what went."""

    def __init__(self, request: dict[str, Any], bounds: CallBounds, data: Source) -> None:
        super().__init__(request, bounds)
        self._path = str(request["path"])
        self._data = data
        self._chunks: Iterator[bytes | memoryview] | None = data_chunks(data)
        self._sent = 0
        self._pending = 0  # the size of the DATA frame being sent
        self._send_error: OSError | None = None

    def next(self) -> Send | Receive | None:
        self._sent += self._pending
        self._pending = 0
        if self._chunks is not None:
            piece = next(self._chunks, None)
            if piece is not None:
                self._pending = memoryview(piece).nbytes
                return Send(Kind.DATA, piece, self.bounds.frame(self._path))
            self._chunks = None
            return Send(Kind.DATA_EOF, b"", self.bounds.frame(self._path))
        if self.done:
            return None
        self._waiting = self.bounds.call("file_write", None)
        return Receive(self._waiting)

    def inline(self, limit: int) -> bytes | None:
        """A small upload's DATA and DATA_EOF frames as one piece, to leave with the REQUEST
        in a single write, and the op then only waits for the RESULT; None for a stream or
        for more than ``limit`` bytes. A small file then costs one vsock packet each way,
        and the op asks to keep its connection (:data:`ember.protocol.KEPT_STREAM_OPS`)."""
        data = self._data
        if not isinstance(data, bytes | bytearray | memoryview) or self._chunks is None:
            return None
        view = memoryview(data).cast("B")
        if view.nbytes > limit:
            return None
        pieces = [b"".join(frame_header(Kind.DATA, view))] if view.nbytes else []
        pieces.append(frame_header(Kind.DATA_EOF, b"")[0])
        self._chunks, self._sent, self.keepalive = None, view.nbytes, True
        return b"".join(pieces)

    def send_failed(self, exc: OSError) -> None:
        """The agent may still have said why: read its answer."""
        self._send_error, self._chunks, self._pending = exc, None, 0

    def _frame(self, frame: Frame | None) -> None:
        if frame is None and self._send_error is not None:
            error = self._send_error
            raise ProtocolError(f"upload to {self._path} failed: {error}") from error
        obj = check_result(frame, "file_write")
        size = results.parse_size(obj)
        self.reusable = self.keepalive and self._send_error is None and obj.get("keepalive") is True
        if self._send_error is None and size != self._sent:
            raise ProtocolError(f"file_write took {self._sent} bytes but said it wrote {size}")
        self._finish(size)
