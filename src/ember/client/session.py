"""What a client keeps between operations, whatever transport carries them.

:class:`Session` checks a call's arguments and builds its operation
(:mod:`ember.client.core`), and encodes each REQUEST (the first one of a restored
sandbox carries the resume announcement). :class:`KeepalivePool` holds the
connections short calls leave open for the next one; it takes its clock as an
argument and never closes anything itself: the transport does, when told to.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ember.client import results
from ember.client.bounds import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_GRACE,
    WORKER_START_ALLOWANCE,
    CallBounds,
    Clock,
    ResumeAnnouncer,
    check_max_output,
)
from ember.client.core import (
    Call,
    Command,
    ExecOp,
    Operation,
    PathArg,
    ReadFile,
    StreamedCode,
    WriteFile,
)
from ember.client.file_get import GetFile, get_limit
from ember.client.interactive import TerminalOp, WatchOp, pty_request
from ember.client.results import CodeResult, DirEntry, FileStat
from ember.client.wire import Source, source_size
from ember.protocol import encode_json

__all__ = [
    "EXEC_FILES_MAX",
    "EXPIRY_SLACK_S",
    "INLINE_WRITE_MAX",
    "KEEPALIVE_IDLE_S",
    "KEEPALIVE_MAX",
    "KeepalivePool",
    "Session",
    "exec_request",
    "streamed",
]

# A kept connection unused this long is closed, so the VM can park. A new connection costs
# the guest ~50k emulated kernel instructions (~50 ms here) more than a kept one: a ping 1-3 s
# after the last call took 57-93 ms with 0.5 s and takes 15-21 ms with 5 s, at the price of
# an idle sandbox parking ~5 s later (an unparked idle guest costs ~0.2% of a core).
KEEPALIVE_IDLE_S = 5.0
EXPIRY_SLACK_S = 0.01  # the expiry timer fires this much after a connection is due
KEEPALIVE_MAX = 4
# Uploads up to this size go with their REQUEST in one write on a kept connection (~15 ms
# here) rather than through a ring slot, whose hand-shake costs two vsock round trips (~85 ms).
INLINE_WRITE_MAX = 64 << 10
# An exec's ``files`` go in its REQUEST frame as base64 (4/3 of the bytes): this much in all
# fits in one frame (protocol.MAX_FRAME) with room for the rest of the request.
EXEC_FILES_MAX = 512 << 10
C = TypeVar("C")


def exec_request(
    cmd: Command, *, timeout: float | None, env: dict[str, str] | None, cwd: str | None,
    stdin: bool, files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A list runs as argv without a shell; a string runs under ``/bin/sh -c``."""
    request: dict[str, Any] = {"op": "exec", "stdin": stdin}
    if files:
        request["files"] = exec_files(files)
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


def exec_files(files: Mapping[str, bytes]) -> list[dict[str, str]]:
    """``files`` as the REQUEST carries them, checked: absolute paths, bytes, at most
    :data:`EXEC_FILES_MAX` in all (bigger files go through ``files.write``)."""
    if not isinstance(files, Mapping):
        raise TypeError(f"files must map guest paths to bytes, got {type(files).__name__}")
    encoded, total = [], 0
    for path, data in files.items():
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError(f"files: {path!r} is not an absolute guest path")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"files: {path} must be bytes, got {type(data).__name__}")
        total += len(data)
        if total > EXEC_FILES_MAX:
            raise ValueError(
                f"files carry at most {EXEC_FILES_MAX >> 10} KiB with a command; "
                "write bigger ones with files.write first"
            )
        encoded.append({"path": path, "data": base64.b64encode(data).decode("ascii")})
    return encoded


def streamed(
    on_stdout: Callable[[str], object] | None, on_stderr: Callable[[str], object] | None
) -> Callable[[str, str], None] | None:
    """One ``on_output(stream, text)`` for a streamed ``run_code``, or None if neither is given."""
    if on_stdout is None and on_stderr is None:
        return None

    def on_output(stream: str, text: str) -> None:
        callback = on_stdout if stream == "stdout" else on_stderr
        if callback is not None:
            callback(text)

    return on_output


class Session:
    """Builds each operation of one client and encodes its REQUEST.

    ``grace`` is how long beyond a call's timeout the host still waits for the agent,
    ``call_timeout`` the timeout of calls without one of their own (and of each frame
    of a file transfer); ``clock`` is what every deadline is measured on.
    """

    def __init__(
        self,
        *,
        grace: float = DEFAULT_GRACE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        announce_resume: bool = False,
        clock: Clock = time.monotonic,
    ) -> None:
        self.bounds = CallBounds(grace, call_timeout, clock)
        # A new VMM (restored, forked): its first request carries the host's clock and
        # entropy, applied by the agent before anything else runs (bounds.resume_announcement).
        self._announcer = ResumeAnnouncer(announce_resume)
        # The code rings reach the worker, not the agent: their first request carries its
        # own announcement, applied by the worker (ember.agent.codering).
        self._ring_announcer = ResumeAnnouncer(announce_resume)
        # Called before each REQUEST that is not run_code (the code ring's ``not_yet``: a
        # worker polling the ring stops, so the agent has the vCPU).
        self.not_yet: Callable[[], None] | None = None
        # Small reads ask for the whole file first (ember.client.file_get); False once the
        # agent answered that it does not know the op (one from before it).
        self.file_get = True

    def announced(self) -> None:
        """The VM's resume was announced already (a spare's warm-up made its first calls):
        the agent and the worker took the host's clock and entropy then."""
        self._announcer = ResumeAnnouncer(False)
        self._ring_announcer = ResumeAnnouncer(False)

    def request(self, op: Operation[Any]) -> bytes:
        """The REQUEST frame's payload for ``op``, encoded as late as possible (``op``
        starts its clocks now)."""
        op.start()
        self._not_for_the_worker(op.op)
        request = self._announcer.stamp(op.request)
        return encode_json({**request, "keepalive": True} if op.keepalive else request)

    def encode(self, request: dict[str, Any]) -> bytes:
        """A REQUEST payload for an exchange outside the operations here (the file rings)."""
        self._not_for_the_worker(str(request.get("op")))
        return encode_json(self._announcer.stamp(request))

    def _not_for_the_worker(self, op: str) -> None:
        if self.not_yet is not None and op not in ("run_code", "code_ring"):
            self.not_yet()

    def _call(
        self, request: dict[str, Any], parse: Callable[[dict[str, Any]], Any], bounded: bool = True
    ) -> Call[Any]:
        deadline = self.bounds.call(str(request["op"]), None) if bounded else None
        return Call(request, self.bounds, parse, deadline)

    def ping(self) -> Call[dict[str, Any]]:
        return self._call({"op": "ping"}, results.parse_ping)

    def warm_pool(self) -> Call[list[int]]:
        return self._call({"op": "pool", "action": "warm"}, results.parse_warmed)

    def pool_modules(self) -> Call[list[str]]:
        return self._call({"op": "pool", "action": "modules"}, results.parse_modules)

    def pool_huge(self) -> Call[list[int]]:
        return self._call({"op": "pool", "action": "huge"}, results.parse_huge)

    def shutdown(self) -> Call[None]:
        return self._call({"op": "shutdown"}, results.parse_nothing)

    def run_code(
        self,
        code: str,
        timeout: float | None,
        linger: float | None = None,
        on_output: Callable[[str, str], None] | None = None,
    ) -> Call[CodeResult]:
        """Without a timeout the answer may take as long as the code runs (the request may
        not); with one, the worker's start-up allowance comes on top of it. ``linger``: how
        long the worker polls its code ring afterwards (ember.agent.codering). ``on_output``
        streams the cell's output as it is written (:class:`StreamedCode`)."""
        request: dict[str, Any] = {"op": "run_code", "code": _source(code)}
        if linger is not None:
            request["linger"] = linger
        deadline = None
        if timeout is not None:
            request["timeout"] = timeout
            deadline = self.bounds.call("run_code", timeout, WORKER_START_ALLOWANCE)
        if on_output is not None:
            return StreamedCode(request, self.bounds, deadline, on_output)
        return Call(request, self.bounds, results.parse_code_result, deadline)

    def ring_request(self, code: str, linger: float | None) -> dict[str, Any]:
        """A ``run_code`` request for the code ring (the worker's own format)."""
        request: dict[str, Any] = {"op": "run", "code": _source(code)}
        if linger is not None:
            request["linger"] = linger
        return self._ring_announcer.stamp(request)

    def code_ring(self, request: dict[str, Any]) -> Call[dict[str, Any]]:
        """A ``code_ring`` op (wake the worker, or stop a ring call): its RESULT as is."""
        return self._call(request, dict)

    def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bool,
        collect: bool = False,
        max_output: int | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecOp:
        limit = check_max_output(max_output)
        request = exec_request(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin, files=files)
        return ExecOp(request, self.bounds, collect=collect, max_output=limit)

    def pty(
        self,
        argv: Sequence[str] | None,
        *,
        rows: int,
        cols: int,
        env: dict[str, str] | None,
        cwd: str | None,
        timeout: float | None,
    ) -> TerminalOp:
        args = None if argv is None else [str(a) for a in argv]
        request = pty_request(args, rows=rows, cols=cols, env=env, cwd=cwd, timeout=timeout)
        return TerminalOp(request, self.bounds)

    def watch(self, path: PathArg, recursive: bool) -> WatchOp:
        return WatchOp(os.fspath(path), bool(recursive), self.bounds)

    def stat(self, path: PathArg) -> Call[FileStat]:
        return self._call({"op": "stat", "path": os.fspath(path)}, results.parse_stat)

    def list(self, path: PathArg) -> Call[list[DirEntry]]:
        return self._call({"op": "list", "path": os.fspath(path)}, results.parse_list)

    def remove(self, path: PathArg, recursive: bool) -> Call[None]:
        request = {"op": "remove", "path": os.fspath(path), "recursive": recursive}
        return self._call(request, results.parse_nothing)

    def read_file(
        self, path: PathArg, sink: Callable[[bytes], object], max_output: int | None
    ) -> ReadFile:
        return ReadFile(os.fspath(path), self.bounds, sink, check_max_output(max_output))

    def get_file(self, path: PathArg, max_output: int | None) -> GetFile | None:
        """The whole-file exchange a read tries first; None if this agent does not know it."""
        if not self.file_get:
            return None
        return GetFile(os.fspath(path), self.bounds, get_limit(check_max_output(max_output)))

    def got_file(self, op: GetFile) -> bytes | None:
        """What ``op`` brought (None: read the file the other way), remembering an agent
        that does not know it."""
        if op.unsupported:
            self.file_get = False
        return op.value

    def write_file(self, path: PathArg, data: Source, mode: int | None, append: bool) -> WriteFile:
        request: dict[str, Any] = {"op": "file_write", "path": os.fspath(path), "append": append}
        if mode is not None:
            request["mode"] = mode
        size = source_size(data)
        if size is not None and not append:
            request["size"] = size
        return WriteFile(request, self.bounds, data)


class KeepalivePool(Generic[C]):
    """Connections short calls left open, newest last; thread-safe.

    On this host every vsock connection costs the guest kernel about four packets each
    way (~6 ms of emulated kernel per packet), a kept one two. A connection unused for
    ``idle`` seconds (on ``clock``) is handed back by :meth:`expire` to be closed, so an
    idle sandbox has none and can be parked; at most ``limit`` are kept.
    """

    def __init__(
        self, clock: Clock, idle: float = KEEPALIVE_IDLE_S, limit: int = KEEPALIVE_MAX
    ) -> None:
        self.clock = clock
        self.idle = idle
        self.limit = limit
        self._kept: list[tuple[C, float]] = []
        self._lock = threading.Lock()

    def pop(self) -> C | None:
        """The most recently kept connection (the caller checks it still works)."""
        with self._lock:
            return self._kept.pop()[0] if self._kept else None

    def put(self, conn: C) -> bool:
        """Keep ``conn``; False when the pool is full (the caller closes it)."""
        with self._lock:
            if len(self._kept) >= self.limit:
                return False
            self._kept.append((conn, self.clock()))
            return True

    def expire(self) -> list[C]:
        """The connections idle for ``idle`` seconds or more, taken out to be closed."""
        now = self.clock()
        with self._lock:
            stale = [conn for conn, since in self._kept if now - since >= self.idle]
            self._kept = [(conn, since) for conn, since in self._kept if now - since < self.idle]
            return stale

    def next_expiry(self) -> float | None:
        """Seconds until the oldest kept connection is due to close; None when none is kept."""
        with self._lock:
            if not self._kept:
                return None
            oldest = min(since for _, since in self._kept)
        return max(0.0, self.idle - (self.clock() - oldest))

    def drain(self) -> list[C]:
        """Every kept connection, taken out to be closed."""
        with self._lock:
            kept, self._kept = self._kept, []
        return [conn for conn, _ in kept]

    def __len__(self) -> int:
        return len(self._kept)


def _source(code: object) -> str:
    """``run_code``'s code is Python source text (bytes would fail deep in the JSON encoder)."""
    if not isinstance(code, str):
        raise TypeError(f"run_code needs the code as str, not {type(code).__name__}")
    return code
