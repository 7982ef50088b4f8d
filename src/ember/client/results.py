"""What the agent's answers become: typed results, each field checked on the way in.

Answers come from the guest, which is untrusted: every field is type- and
range-checked here and anything malformed becomes
:class:`~ember.errors.ProtocolError`, never a ``KeyError``, an ``OverflowError``
or a wrong-typed value deep in user code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from ember.errors import ProtocolError

__all__ = [
    "CodeError",
    "CodeResult",
    "DirEntry",
    "ExecResult",
    "FileEvent",
    "FileStat",
    "OutputChunk",
    "explain_crashed_worker",
    "parse_code_result",
    "parse_exec_result",
    "parse_file_event",
    "parse_list",
    "parse_size",
    "parse_stat",
]


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
class FileEvent:
    """A change seen by ``files.watch``: ``type`` is ``create``, ``write``, ``remove``,
    ``rename`` (``path`` is the old name; the new one comes as ``create``), ``chmod``, or
    ``overflow`` (the guest kernel dropped events; ``path`` is then empty)."""

    type: Literal["create", "write", "remove", "rename", "chmod", "overflow"]
    path: str
    is_dir: bool


_EVENT_TYPES = frozenset({"create", "write", "remove", "rename", "chmod", "overflow"})


@dataclass(frozen=True)
class CodeError:
    """An exception raised by run_code's code, or a worker failure: ``WorkerCrashed``
    (the worker's state is lost) or ``WorkerTimeout`` (the cell was interrupted and the
    state kept, or, for a cell that would not stop, the worker killed and the state lost:
    ``message`` says which)."""

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


CONSOLE_FAULT = re.compile(r"segfault at|general protection|traps:|BUG:|Oops")
"""Guest console lines that say why a process died (the kernel prints them)."""


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


# -- field checks -----------------------------------------------------------------------


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


# -- answers ----------------------------------------------------------------------------


def parse_exec_result(obj: dict[str, Any], stdout: bytes, stderr: bytes) -> ExecResult:
    """An exec's RESULT, with the output the caller collected (empty when streamed)."""
    return ExecResult(
        exit_code=_int(obj, "exit_code", 0, 255, nullable=True),
        signal=_int(obj, "signal", 1, 255, nullable=True),
        stdout=stdout,
        stderr=stderr,
        timed_out=_get(obj, "timed_out", bool),
        duration=_float(obj, "duration", 0.0, 1e9),
    )


def parse_file_event(obj: dict[str, Any]) -> FileEvent:
    kind = _get(obj, "type", str)
    if kind not in _EVENT_TYPES:
        raise ProtocolError(f"unknown file event type {kind!r:.40}")
    if kind == "overflow":
        return FileEvent("overflow", "", False)
    path = _get(obj, "path", str)
    return FileEvent(kind, path, bool(_get(obj, "is_dir", bool)))


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


def parse_ping(obj: dict[str, Any]) -> dict[str, Any]:
    """``ping``'s answer is handed over as it is (its JSON was already checked)."""
    return obj


def parse_warmed(obj: dict[str, Any]) -> list[int]:
    """``pool`` ``warm``: the pages each waiting interpreter read (none without a pool)."""
    warmed = obj.get("warmed")
    if not isinstance(warmed, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in warmed
    ):
        raise ProtocolError(f"pool warm: 'warmed' must be a list of integers, got {warmed!r}")
    return warmed


def parse_huge(obj: dict[str, Any]) -> list[int]:
    """``pool`` ``huge``: guest-physical addresses of the warm heaps' 2 MiB pages (checked
    again, with the memory file, by :mod:`ember.snapshot.hugeback`)."""
    huge = obj.get("huge")
    if not isinstance(huge, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in huge
    ):
        raise ProtocolError(f"pool huge: 'huge' must be a list of addresses, got {huge!r}")
    return huge


def parse_modules(obj: dict[str, Any]) -> list[str]:
    """``pool`` ``modules``: the names the pool's preload imported (none without a pool)."""
    names = obj.get("preloaded")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"pool modules: 'preloaded' must be a list of strings, got {names!r}")
    return names


def parse_nothing(obj: dict[str, Any]) -> None:
    """``remove`` and ``shutdown`` answer nothing worth keeping."""
