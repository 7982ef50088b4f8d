"""What the sync and asyncio agent clients share: result types, requests, answer checks.

Both clients speak the same frames; only how they wait differs. Everything
that does not wait lives here, so the two cannot drift apart: building each
op's REQUEST, cutting upload data into frames, and turning the agent's answers
into typed results or exceptions.

Answers come from the guest, which is untrusted: every field is type-checked
here and anything malformed becomes :class:`~ember.client_errors.ProtocolError`,
never a ``KeyError``, a ``RecursionError``, an ``OverflowError`` or a wrong-typed
value deep in user code. And since an untrusted guest may also just fall silent,
the host bounds every wait itself (:class:`Deadline`) instead of trusting the
agent to enforce timeouts: then the call raises :class:`SandboxTimeout`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Literal

from ember import protocol
from ember.client_errors import (
    AgentError,
    OutputTooLarge,
    ProtocolError,
    SandboxTimeout,
    agent_error,
)
from ember.protocol import CHUNK_SIZE, Kind, Payload

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_OUTPUT",
    "MAX_JSON_DEPTH",
    "WORKER_START_ALLOWANCE",
    "CodeError",
    "CodeResult",
    "Command",
    "Deadline",
    "DirEntry",
    "ExecResult",
    "FileStat",
    "OutputChunk",
    "PathArg",
    "Source",
    "check_max_output",
    "check_result",
    "code_request",
    "data_chunks",
    "decode",
    "exec_request",
    "file_too_large",
    "host_timeout_result",
    "output_too_large",
    "parse_code_result",
    "parse_exec_result",
    "parse_list",
    "parse_size",
    "parse_stat",
    "path_request",
    "read_frame",
    "remote_error",
    "send_frame",
    "unexpected",
    "write_request",
]

Command = Sequence[str] | str
Source = bytes | bytearray | memoryview | BinaryIO
PathArg = str | os.PathLike[str]

DEFAULT_GRACE = 30.0
"""Seconds the host waits beyond a call's own timeout: time for the agent to kill what
overran and say so, on a guest whose kernel may be emulated (slow) or just restored."""
DEFAULT_CALL_TIMEOUT = 120.0
"""The timeout of calls that have none of their own (ping, stat, list, remove; each frame of
a file transfer): they do bounded work, so a guest this late is hung, not busy."""
WORKER_START_ALLOWANCE = 300.0
"""``run_code`` may first have to (re)start the agent's Python worker: the agent allows that
this long (its ``STARTUP_TIMEOUT``) before the call's own timeout starts to run."""
DEFAULT_MAX_OUTPUT = 64 << 20
"""What ``exec()`` and ``files.read()`` hold in memory at most (the guest picks the size)."""
MAX_JSON_DEPTH = 32
"""Nesting deeper than any answer has (they are 3 deep): refused, so that no deep object
from the guest ever reaches ``repr`` or user code."""

RESUME_ENTROPY_BYTES = 32
"""Host entropy handed to a restored or forked guest with its first request."""
CONSOLE_FAULT = re.compile(r"segfault at|general protection|traps:|BUG:|Oops")
"""Guest console lines that say why a process died (the kernel prints them)."""


def resume_announcement() -> dict[str, Any]:
    """The ``resume`` object of the first request to a restored or forked sandbox.

    Siblings restored from one template share its memory: its clock as of the snapshot, its
    kernel random state, the ``random`` state of its warm interpreters. The agent applies this
    before serving the request (``ember.agent.resume``): clock stepped to ours, these bytes fed
    to the kernel's CRNG, ``random`` reseeded. Stamped when the request is encoded, so the time
    is as fresh as it can be.
    """
    return {
        "realtime_ns": time.clock_gettime_ns(time.CLOCK_REALTIME),
        "entropy": base64.b64encode(os.urandom(RESUME_ENTROPY_BYTES)).decode("ascii"),
    }


class CallBounds:
    """A client's own bounds on the agent (both transports): ``grace`` beyond each call's
    timeout, and ``call_timeout`` for calls without one and for each frame of a transfer."""

    __slots__ = ("call_timeout", "grace")

    def __init__(self, grace: float, call_timeout: float) -> None:
        if not grace >= 0 or not call_timeout > 0:
            raise ValueError(f"need grace >= 0 and call_timeout > 0, got {grace}, {call_timeout}")
        self.grace = grace
        self.call_timeout = call_timeout

    def call(self, op: str, timeout: float | None, extra: float = 0.0) -> Deadline:
        """When the host gives up on ``op``: its timeout (or ``call_timeout``) + ``grace``."""
        budget = self.call_timeout if timeout is None else timeout
        return Deadline.for_call(op, budget, self.grace, extra)

    def send(self) -> Deadline:
        """A request must leave within the bound even when the answer may take for ever."""
        return Deadline(self.call_timeout + self.grace, "the agent did not take the request")

    def frame(self, path: PathArg) -> Deadline:
        """A transfer may take any time, but each frame of it must move within the bound."""
        return Deadline(self.call_timeout + self.grace, f"the transfer of {path} made no progress")


class ResumeAnnouncer:
    """Stamps :func:`resume_announcement` on the first request only (any thread, any call)."""

    def __init__(self, armed: bool) -> None:
        self._armed = armed
        self._lock = threading.Lock()

    def stamp(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            armed, self._armed = self._armed, False
        return {**request, "resume": resume_announcement()} if armed else request


def explain_crashed_worker(result: CodeResult, console: str) -> CodeResult:
    """A ``WorkerCrashed`` error with the guest console's lines about the crash appended.

    The worker's exit status says only "signal 11"; the guest kernel's ``segfault at ...``
    line names the address and instruction, which is what a bug report needs.
    """
    error = result.error
    if error is None or error.type != "WorkerCrashed":
        return result
    lines = [line for line in console.splitlines() if CONSOLE_FAULT.search(line)][-3:]
    if not lines:
        return result
    message = error.message + "\nguest console:\n" + "\n".join(lines)
    return replace(result, error=replace(error, message=message))


@dataclass(frozen=True)
class ExecResult:
    """How a command ended. ``exit_code`` is None when a signal killed it."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class OutputChunk:
    """A piece of output, in the order the process produced it on that stream."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class CodeError:
    """An exception raised by run_code's code, or a worker failure
    (``WorkerCrashed``, ``WorkerTimeout``: the worker's state is then lost)."""

    type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class CodeResult:
    """A notebook cell's outcome: captured text, the last expression's repr, any error."""

    stdout: str
    stderr: str
    value: str | None
    error: CodeError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FileStat:
    size: int
    mode: int
    mtime: float
    is_dir: bool
    is_file: bool


@dataclass(frozen=True)
class DirEntry:
    name: str
    size: int
    is_dir: bool


class Deadline:
    """The moment the host stops waiting for the agent, and what to say then.

    The agent enforces timeouts itself, but it runs in the guest, which is
    untrusted and may simply fall silent (or hang with its kernel): without a
    bound of the host's own, a blocking call would then never return. A
    deadline bounds whole frames, not single ``recv`` calls, so a peer that
    drips one byte at a time cannot stretch it either.
    """

    __slots__ = ("at", "how", "seconds", "what")

    def __init__(
        self, seconds: float, what: str, how: str = "", *, at: float | None = None
    ) -> None:
        """``seconds`` from now, or until ``at`` (a ``time.monotonic()`` value) if given."""
        self.seconds = seconds
        self.what = what
        self.how = how
        self.at = time.monotonic() + seconds if at is None else at

    @classmethod
    def for_call(cls, op: str, timeout: float | None, grace: float, extra: float = 0.0) -> Deadline:
        """A call's own ``timeout`` (or :data:`DEFAULT_CALL_TIMEOUT`) + ``extra`` + ``grace``."""
        budget = DEFAULT_CALL_TIMEOUT if timeout is None else timeout
        how = f"timeout {budget:g} s" + (f" + {extra:g} s to start" if extra else "")
        return cls(budget + extra + grace, f"the agent did not finish {op!r}", f"{how} + grace")

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> SandboxTimeout:
        """The error to raise (the caller then drops the connection: it is out of step)."""
        how = f" ({self.how})" if self.how else ""
        return SandboxTimeout(
            f"{self.what} within {self.seconds:.3g} s{how}, so the host hung up: the guest may "
            "be hung or overloaded. Retry (with a longer timeout, if the call takes one), or "
            "close this sandbox and start a fresh one"
        )


def host_timeout_result(started: float) -> ExecResult:
    """The partial result of an exec the host stopped waiting for (the agent never said)."""
    return ExecResult(None, None, b"", b"", True, time.monotonic() - started)


def check_max_output(max_output: int | None) -> int | None:
    """``max_output`` as given, checked early: a bad one should fail before the call runs."""
    if max_output is not None and (
        not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 0
    ):
        raise ValueError(f"max_output must be a number of bytes >= 0 or None, got {max_output!r}")
    return max_output


def output_too_large(limit: int) -> OutputTooLarge:
    """exec() got more than ``limit`` bytes: the caller hangs up, which kills the command."""
    return OutputTooLarge(
        f"the command wrote more than max_output={limit} bytes (stdout and stderr together) "
        "and was stopped; pass a larger max_output= (None: no limit), or use exec_stream() to "
        "handle output as it comes",
        limit,
    )


def file_too_large(path: PathArg, limit: int) -> OutputTooLarge:
    """files.read() got more than ``limit`` bytes of ``path``: the caller hangs up."""
    return OutputTooLarge(
        f"{os.fspath(path)} is larger than max_output={limit} bytes and was not read; use "
        "files.read_into() to stream it into a file, or pass a larger max_output= "
        "(None: no limit)",
        limit,
    )


# -- requests ---------------------------------------------------------------------------


def exec_request(
    cmd: Command,
    *,
    timeout: float | None,
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: bool,
) -> dict[str, Any]:
    """A list runs as argv without a shell; a string runs under ``/bin/sh -c``."""
    request: dict[str, Any] = {"op": "exec", "stdin": stdin}
    if isinstance(cmd, str):
        request["shell"] = cmd
    else:
        request["argv"] = list(cmd)
    if timeout is not None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        request["timeout"] = timeout
    if env is not None:
        request["env"] = dict(env)
    if cwd is not None:
        request["cwd"] = cwd
    return request


def path_request(op: str, path: PathArg, **fields: Any) -> dict[str, Any]:
    return {"op": op, "path": os.fspath(path), **fields}


def write_request(path: PathArg, mode: int | None, append: bool) -> dict[str, Any]:
    request = path_request("file_write", path, append=append)
    if mode is not None:
        request["mode"] = mode
    return request


def code_request(code: str, timeout: float | None) -> dict[str, Any]:
    request: dict[str, Any] = {"op": "run_code", "code": code}
    if timeout is not None:
        request["timeout"] = timeout
    return request


def data_chunks(data: Source) -> Iterator[bytes | memoryview]:
    """Cut upload data into frame-sized pieces without copying bytes-like input."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, CHUNK_SIZE):
            yield view[start : start + CHUNK_SIZE]
        return
    while chunk := data.read(CHUNK_SIZE):
        yield chunk


# -- answers ----------------------------------------------------------------------------


def read_frame(sock: socket.socket, deadline: Deadline | None = None) -> tuple[Kind, bytes] | None:
    """:func:`ember.protocol.read_frame`, raising the client's ProtocolError; with a
    ``deadline``, the whole frame must have arrived by then (else :class:`SandboxTimeout`)."""
    try:
        if deadline is None:
            return protocol.read_frame(sock)
        header = _recv_until(sock, protocol.HEADER.size, deadline, eof_ok=True)
        if header is None:
            return None
        kind, length = protocol.parse_header(header)
        if length == 0:
            return kind, b""
        payload = _recv_until(sock, length, deadline, eof_ok=False)
        assert payload is not None
        return kind, payload
    except ProtocolError:
        raise
    except protocol.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


def _recv_until(sock: socket.socket, n: int, deadline: Deadline, *, eof_ok: bool) -> bytes | None:
    # poll() rather than settimeout(): another thread (an exec's stdin pump) may be sending
    # on this socket, and a timeout is a property of the whole socket.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    parts: list[bytes] = []
    got = 0
    while got < n:
        # Past the deadline, bytes already here are still taken; none are waited for.
        if not poller.poll(max(math.ceil(deadline.remaining() * 1000), 0)):
            raise deadline.expired()
        try:
            data = sock.recv(n - got)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            if eof_ok and not got:
                return None
            raise ProtocolError(f"connection closed {n - got} bytes short of a frame's end")
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def send_frame(
    sock: socket.socket, kind: Kind, payload: Payload = b"", deadline: Deadline | None = None
) -> None:
    """:func:`ember.protocol.write_frame`, given up (:class:`SandboxTimeout`) at ``deadline``:
    a guest that stops reading would otherwise block the sender once the buffers fill.
    Only for sockets no other thread sends on (the timeout is the whole socket's)."""
    if deadline is None:
        protocol.write_frame(sock, kind, payload)
        return
    remaining = deadline.remaining()
    if remaining <= 0:
        raise deadline.expired()
    previous = sock.gettimeout()
    sock.settimeout(remaining)
    try:
        protocol.write_frame(sock, kind, payload)
    except TimeoutError:
        raise deadline.expired() from None
    finally:
        sock.settimeout(previous)


def decode(payload: bytes) -> dict[str, Any]:
    """A JSON object from the guest, or :class:`ProtocolError`: nothing else escapes.

    The guest picks the bytes, so a frame of ``[[[[...`` (``RecursionError`` in
    the parser), ``NaN``/``Infinity`` and nesting deeper than any answer has are
    refused here rather than surfacing later in user code.
    """
    try:
        obj = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("the agent's answer is JSON nested too deeply to parse") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    if _deeper_than(obj, MAX_JSON_DEPTH):
        raise ProtocolError(f"the agent's answer nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the agent may send")


def _deeper_than(obj: dict[str, Any], limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iteratively: no recursion)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def remote_error(payload: bytes) -> AgentError:
    obj = decode(payload)
    type_name, message = obj.get("type"), obj.get("message")
    if not isinstance(type_name, str) or not isinstance(message, str):
        raise ProtocolError(f"malformed ERROR frame: {obj!r:.200}")
    return agent_error(type_name, message)


def unexpected(frame: tuple[Kind, bytes] | None, op: str) -> ProtocolError:
    """The error for an answer that fits no rule of ``op`` (EOF included)."""
    if frame is None:
        return ProtocolError(
            f"the agent closed the connection before answering {op!r}; "
            "the guest may have crashed or be shutting down"
        )
    return ProtocolError(f"unexpected {frame[0].name} frame in the answer to {op!r}")


def check_result(frame: tuple[Kind, bytes] | None, op: str) -> dict[str, Any]:
    """A RESULT's JSON; an ERROR raises the matching AgentError."""
    if frame is not None and frame[0] is Kind.RESULT:
        return decode(frame[1])
    if frame is not None and frame[0] is Kind.ERROR:
        raise remote_error(frame[1])
    raise unexpected(frame, op)


def _show(value: object) -> str:
    """A short description of a guest-chosen value for an error message (never a deep repr)."""
    if isinstance(value, dict | list):
        return f"a {type(value).__name__} of {len(value)} items"
    return repr(value)[:100]


def _get(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], nullable: bool = False
) -> Any:
    value = obj.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"the agent's answer has a bad {key!r}: {_show(value)}")
    return value


def _int(obj: dict[str, Any], key: str, low: int, high: int, nullable: bool = False) -> Any:
    """An integer field within [low, high]: a guest may send any of 4,300 digits."""
    value = _get(obj, key, int, nullable)
    if value is not None and not low <= value <= high:
        raise ProtocolError(f"the agent's answer has {key!r} out of range: {_show(value)}")
    return value


def _float(obj: dict[str, Any], key: str, low: float, high: float) -> float:
    """A finite number field within [low, high] (a 400-digit integer overflows a float)."""
    value = _get(obj, key, (int, float))
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise ProtocolError(f"the agent's answer has {key!r} out of range: {_show(value)}")
    return number


_MAX_SIZE = (1 << 63) - 1  # st_size is an off_t


def parse_exec_result(obj: dict[str, Any], stdout: bytes = b"", stderr: bytes = b"") -> ExecResult:
    return ExecResult(
        exit_code=_int(obj, "exit_code", 0, 255, nullable=True),
        signal=_int(obj, "signal", 1, 255, nullable=True),
        stdout=stdout,
        stderr=stderr,
        timed_out=_get(obj, "timed_out", bool),
        duration=_float(obj, "duration", 0.0, 1e9),
    )


def parse_code_result(obj: dict[str, Any]) -> CodeResult:
    error = _get(obj, "error", dict, nullable=True)
    return CodeResult(
        stdout=_get(obj, "stdout", str),
        stderr=_get(obj, "stderr", str),
        value=_get(obj, "value", str, nullable=True),
        error=None
        if error is None
        else CodeError(
            type=_get(error, "type", str),
            message=_get(error, "message", str),
            traceback=_get(error, "traceback", str),
        ),
    )


def parse_stat(obj: dict[str, Any]) -> FileStat:
    return FileStat(
        size=_int(obj, "size", 0, _MAX_SIZE),
        mode=_int(obj, "mode", 0, 0xFFFF_FFFF),
        mtime=_float(obj, "mtime", -1e15, 1e15),
        is_dir=_get(obj, "is_dir", bool),
        is_file=_get(obj, "is_file", bool),
    )


def parse_size(obj: dict[str, Any]) -> int:
    """The ``size`` of a file_read or file_write RESULT."""
    value: int = _int(obj, "size", 0, _MAX_SIZE)
    return value


def parse_list(obj: dict[str, Any]) -> list[DirEntry]:
    """Directory entries; a name no directory can hold is refused, not passed on.

    Callers join these names onto paths (``os.path.join(dir, e.name)``), so a
    hostile agent's ``"../../etc"`` or ``"a/b"`` would point them elsewhere.
    """
    entries = _get(obj, "entries", list)
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError(f"bad directory entry: {_show(entry)}")
        name = _get(entry, "name", str)
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise ProtocolError(
                f"the agent listed an impossible directory entry {_show(name)} (empty, '.', "
                "'..', or with '/' or NUL in it); the listing was refused"
            )
        size = _int(entry, "size", 0, _MAX_SIZE)
        out.append(DirEntry(name, size, _get(entry, "is_dir", bool)))
    return out
