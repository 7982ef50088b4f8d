"""What the sync and asyncio agent clients share: result types, requests, answer checks.

Both clients speak the same frames; only how they wait differs. Everything
that does not wait lives here, so the two cannot drift apart: building each
op's REQUEST, cutting upload data into frames, and turning the agent's answers
into typed results or exceptions.

Answers come from the guest, which is untrusted: every field is type-checked
here and anything malformed becomes :class:`~ember.client_errors.ProtocolError`,
never a ``KeyError`` or a wrong-typed value deep in user code.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from ember import protocol
from ember.client_errors import AgentError, ProtocolError, agent_error
from ember.protocol import CHUNK_SIZE, Kind

__all__ = [
    "CodeError",
    "CodeResult",
    "Command",
    "DirEntry",
    "ExecResult",
    "FileStat",
    "OutputChunk",
    "PathArg",
    "Source",
    "check_result",
    "code_request",
    "data_chunks",
    "decode",
    "exec_request",
    "parse_code_result",
    "parse_exec_result",
    "parse_list",
    "parse_stat",
    "path_request",
    "read_frame",
    "remote_error",
    "unexpected",
    "write_request",
]

Command = Sequence[str] | str
Source = bytes | bytearray | memoryview | BinaryIO
PathArg = str | os.PathLike[str]


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


def read_frame(sock: socket.socket) -> tuple[Kind, bytes] | None:
    """:func:`ember.protocol.read_frame`, raising the client's ProtocolError."""
    try:
        return protocol.read_frame(sock)
    except ProtocolError:
        raise
    except protocol.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


def decode(payload: bytes) -> dict[str, Any]:
    try:
        return protocol.decode_json(payload)
    except protocol.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


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


def _get(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], nullable: bool = False
) -> Any:
    value = obj.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"the agent's answer has a bad {key!r}: {value!r:.100}")
    return value


def parse_exec_result(obj: dict[str, Any], stdout: bytes = b"", stderr: bytes = b"") -> ExecResult:
    return ExecResult(
        exit_code=_get(obj, "exit_code", int, nullable=True),
        signal=_get(obj, "signal", int, nullable=True),
        stdout=stdout,
        stderr=stderr,
        timed_out=_get(obj, "timed_out", bool),
        duration=float(_get(obj, "duration", (int, float))),
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
        size=_get(obj, "size", int),
        mode=_get(obj, "mode", int),
        mtime=float(_get(obj, "mtime", (int, float))),
        is_dir=_get(obj, "is_dir", bool),
        is_file=_get(obj, "is_file", bool),
    )


def parse_list(obj: dict[str, Any]) -> list[DirEntry]:
    entries = _get(obj, "entries", list)
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError(f"bad directory entry {entry!r:.100}")
        name, size = _get(entry, "name", str), _get(entry, "size", int)
        out.append(DirEntry(name, size, _get(entry, "is_dir", bool)))
    return out
