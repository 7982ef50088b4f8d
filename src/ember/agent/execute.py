"""The ``exec`` op: run a command, stream its output, report how it ended.

Request: ``{"op": "exec", "argv": [...]}`` or ``{"op": "exec", "shell": "..."}``,
plus optional ``env`` (merged over :func:`default_env`), ``cwd``, ``timeout``
(seconds), ``stdin`` (true: the client streams ``STDIN`` frames and a
``STDIN_EOF``; false: stdin is ``/dev/null``) and ``files`` (``[{"path", "data"}]``,
data in base64: written, as ``file_write`` writes, before the command starts).
Reply: ``STDOUT``/``STDERR`` frames as output appears, then ``RESULT {"exit_code",
"signal", "timed_out", "duration", "files"?}`` (``files``: how many were written), or
``ERROR`` when nothing could start (``ExecError``, or the OS error a file raised).

Why it is built this way, given the guest's costs (syscall ~0.3 ms, new
process ~1 s, fork of a big process ~2 s):

* ``files`` save a request: a script uploaded and run (``ember run``) is one round
  trip, and each vsock request costs this guest ~20,000 emulated instructions before
  the agent does anything.
* ``subprocess.Popen`` starts the child with vfork+exec, never a copy of this
  process; each command gets its own session, hence its own process group, so
  a timeout can kill everything it started with one ``killpg``.
* One thread multiplexes both pipes, the process's exit (a pidfd) and the
  client's hang-up with ``poll()``: one syscall per wake-up, no busy polling
  unless a timeout is pending. Output is read in ≤64 KiB pieces and sent at
  once, so the agent holds at most one piece: when the host stops reading,
  ``sendall`` blocks, the pipes fill and the command itself blocks.
* The deadline is a separate timer because ``sendall`` may be blocked on a slow
  client exactly when the deadline passes.
* After the command exits we keep relaying until its pipes close (background
  jobs still writing are part of its output), unless the group was killed:
  then whatever escaped the group gets :data:`KILL_GRACE` seconds.
* If the client disconnects, the group is killed: nobody will read the result.
* A Python command line goes to a pre-started interpreter when the pool
  (:mod:`ember.agent.pool`) can run it exactly as a new ``python3`` would: the
  same pipes, session and process group, the same streaming and result, but
  none of the ~7 s a new interpreter costs this guest. ``"pool": false`` in the
  request asks for a real process (for comparisons and benchmarks).
* A request that names a leased slot of the shared region (``"slot"``,
  ``"lease"``, as the file rings do) gets its output there instead of in frames:
  each pipe read goes straight into the ring, no vsock packet per piece. A slot
  this agent cannot use is ignored (frames, as before); an older agent ignores
  the keys, so a host must always accept frames too.
"""

from __future__ import annotations

import binascii
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from ember import ring
from ember.agent.common import (
    BadRequest,
    ClientGone,
    ExecError,
    kept_stream,
    opt_bool,
    opt_float,
    opt_str,
    req_path,
)
from ember.agent.filering import Slot, leased_slot
from ember.agent.files import Sink
from ember.agent.simd import SIMD_ENV
from ember.protocol import Kind, ProtocolError, read_frame, write_frame, write_json

if TYPE_CHECKING:
    from ember.agent.pool import InterpreterPool

__all__ = ["KILL_GRACE", "default_env", "exec_handler", "handle_exec"]

READ_SIZE = 64 << 10
RING_ROOM_WAIT_S = 0.002  # a full output ring: the host frees room as it reads
KILL_GRACE = 2.0
POLL_MS = 250
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_env() -> dict[str, str]:
    """What a command sees before the request's ``env`` is laid over it: the SSE-only
    variables ember-init may have given the agent (:mod:`ember.agent.simd`) included."""
    env = {"PATH": DEFAULT_PATH, "HOME": os.environ.get("HOME") or "/root", "LANG": "C.UTF-8"}
    return env | {name: os.environ[name] for name in SIMD_ENV if name in os.environ}


def _command(req: dict[str, Any]) -> list[str]:
    argv, shell = req.get("argv"), req.get("shell")
    if shell is not None:
        if argv is not None or not isinstance(shell, str):
            raise BadRequest("give either 'argv' (a list of strings) or 'shell' (a string)")
        return ["/bin/sh", "-c", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("'argv' must be a non-empty list of strings")
    return argv


def _env(req: dict[str, Any]) -> dict[str, str]:
    extra = req.get("env") or {}
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise BadRequest("'env' must map strings to strings")
    return default_env() | extra


def _files(req: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The request's ``files``, checked whole before any is written."""
    files = req.get("files")
    if files is None:
        return []
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise BadRequest("'files' must be a list of {'path', 'data'} objects")
    checked = []
    for item in files:
        data = item.get("data")
        if not isinstance(data, str):
            raise BadRequest("a file's 'data' must be base64 text")
        try:
            raw = binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            raise BadRequest("a file's 'data' is not valid base64") from None
        checked.append((req_path(item), raw))
    return checked


def _write_files(files: list[tuple[str, bytes]]) -> None:
    """Each file in place (atomically, parents created, an old file's mode kept), in order."""
    for path, data in files:
        sink = Sink(path, None, append=False)
        try:
            sink.write(data)
            sink.commit()
        except BaseException:
            sink.abort()
            raise


class _Run:
    """One running command: the kill switch shared by the relay, timer and stdin pump."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.killed_at: float | None = None
        self.timed_out = False
        self.done = False  # RESULT is on its way: a hang-up now is the normal end
        self.lock = threading.Lock()

    def kill(self, *, timed_out: bool = False) -> None:
        with self.lock:
            if timed_out:
                if self.done:
                    return  # the deadline passed after the command finished: leave its jobs be
                self.timed_out = True
            if self.killed_at is None:
                self.killed_at = time.monotonic()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the whole group is gone already


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pump_stdin(conn: socket.socket, stdin: IO[bytes], run: _Run) -> None:
    """Copy STDIN frames into the process; a blocked write stops us reading the socket."""
    gone = True
    broken = False  # the process closed its stdin: keep draining frames, drop them
    try:
        while (frame := read_frame(conn)) is not None:
            kind, payload = frame
            if kind is Kind.STDIN:
                if not broken:
                    try:
                        _write_all(stdin.fileno(), payload)
                    except OSError:
                        broken = True
            elif kind is Kind.STDIN_EOF:
                gone = False
                break
            else:
                raise ProtocolError(f"expected STDIN or STDIN_EOF, got {kind.name}")
    except (OSError, ProtocolError):
        try:
            conn.shutdown(socket.SHUT_RDWR)  # make the relay's next send fail too
        except OSError:
            pass
    finally:
        try:
            stdin.close()
        except OSError:
            pass
    if gone and not run.done:
        run.kill()


def _check_client(conn: socket.socket, events: int) -> None:
    """The client's side became readable although it owes us nothing: why?

    A full hang-up (POLLHUP) means nobody will read the result: give up. A
    half-close (EOF, but it still reads, as ``socat`` does after sending the
    request) is fine. Bytes are a protocol violation.
    """
    if events & (select.POLLHUP | select.POLLERR):
        raise ClientGone
    try:
        peek = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except OSError:
        raise ClientGone from None
    if peek:
        raise ProtocolError("the client sent data to an exec that has no stdin")


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # old kernel: fall back to polling for the exit


class _RingOutput:
    """Output into a leased slot of the shared region (issue 16), not STDOUT/STDERR frames.

    Each record is one pipe read, read straight into the ring, after a byte that names
    the stream (:data:`ember.protocol.Kind` ``STDOUT`` or ``STDERR``). The connection may
    carry the host's stdin frames, so a full ring is waited out by sleeping, not by
    reading the host's wake-up from it. The RESULT frame follows the last record.
    """

    def __init__(self, slot: Slot) -> None:
        self._writer = ring.RingWriter(slot.ctl, slot.data, slot.bell, _await_room)

    def relay(self, fd: int, kind: Kind) -> int:
        """One read of ``fd`` into the ring; 0 at the pipe's end."""

        def readinto(view: memoryview) -> int:
            n = os.readv(fd, [view[1:]])
            if not n:
                return 0
            view[0] = kind
            return n + 1

        try:
            return self._writer.fill(readinto, READ_SIZE + 1)
        except BrokenPipeError:  # the host took the slot back: it hung up
            raise ClientGone from None


def _await_room() -> None:
    time.sleep(RING_ROOM_WAIT_S)


def _relay(
    conn: socket.socket,
    run: _Run,
    *,
    watch_client: bool,
    timed: bool,
    ring_out: _RingOutput | None = None,
) -> float:
    """Forward output until the pipes close and the process exits; return its exit time."""
    proc = run.proc
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): Kind.STDOUT, proc.stderr.fileno(): Kind.STDERR}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    conn_fd = conn.fileno() if watch_client else -1
    if watch_client:
        poller.register(conn_fd, select.POLLIN)  # no stdin: the client should stay silent
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    exited_at: float | None = None
    try:
        while streams or exited_at is None:
            if run.killed_at is not None and time.monotonic() - run.killed_at > KILL_GRACE:
                break  # something outside the group holds our pipes: stop waiting for it
            slow = timed or run.killed_at is not None or (pidfd is None and exited_at is None)
            check_exit = pidfd is None
            for fd, events in poller.poll(POLL_MS if slow else None):
                if fd == conn_fd:
                    _check_client(conn, events)
                    poller.modify(conn_fd, 0)  # half-closed: now only a hang-up wakes us
                    continue
                kind = streams.get(fd)
                if kind is None:
                    check_exit = True  # the pidfd: the process has exited
                    continue
                if ring_out is not None:
                    if not ring_out.relay(fd, kind):
                        poller.unregister(fd)
                        del streams[fd]
                    continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                try:
                    write_frame(conn, kind, chunk)
                except OSError:
                    raise ClientGone from None
            if exited_at is None and (check_exit or slow) and proc.poll() is not None:
                exited_at = time.monotonic()
                if pidfd is not None:
                    poller.unregister(pidfd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return exited_at if exited_at is not None else time.monotonic()


def exec_handler(
    pool: InterpreterPool | None,
) -> Callable[[socket.socket, dict[str, Any]], None]:
    """The ``exec`` op, handing Python programs to ``pool`` when it can take them."""

    def handler(conn: socket.socket, req: dict[str, Any]) -> None:
        handle_exec(conn, req, pool=pool)

    return handler


def _start(
    argv: list[str],
    req: dict[str, Any],
    env: dict[str, str],
    cwd: str | None,
    want_stdin: bool,
    pool: InterpreterPool | None,
) -> subprocess.Popen[bytes]:
    use_pool = req.get("pool", True)
    if not isinstance(use_pool, bool):
        raise BadRequest("'pool' must be true or false")
    if pool is not None and use_pool and req.get("shell") is None:
        proc = pool.take(argv, env, cwd, want_stdin)
        if proc is not None:
            return proc
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
            bufsize=0,
        )
    except OSError as exc:
        raise ExecError(f"cannot start {argv[0]!r}: {exc}") from None


def handle_exec(
    conn: socket.socket, req: dict[str, Any], *, pool: InterpreterPool | None = None
) -> None:
    """Serve one ``exec`` request on ``conn`` (see the module docstring)."""
    argv, env = _command(req), _env(req)
    cwd, timeout = opt_str(req, "cwd"), opt_float(req, "timeout")
    want_stdin = opt_bool(req, "stdin")
    files = _files(req)
    slot = leased_slot(req)
    _write_files(files)
    proc = _start(argv, req, env, cwd, want_stdin, pool)
    try:
        ring_out = None if slot is None else _RingOutput(slot)
        _serve(conn, proc, timeout, want_stdin, ring_out, keep=kept_stream(req), files=len(files))
    finally:
        if pool is not None:
            pool.release(proc)


def _serve(
    conn: socket.socket,
    proc: subprocess.Popen[bytes],
    timeout: float | None,
    want_stdin: bool,
    ring_out: _RingOutput | None,
    *,
    keep: bool = False,
    files: int = 0,
) -> None:
    started = time.monotonic()
    run = _Run(proc)
    timer: threading.Timer | None = None
    if timeout is not None:
        timer = threading.Timer(timeout, run.kill, kwargs={"timed_out": True})
        timer.daemon = True
        timer.start()
    finished = False
    try:
        if want_stdin:
            assert proc.stdin is not None
            pump = threading.Thread(target=_pump_stdin, args=(conn, proc.stdin, run), daemon=True)
            pump.start()
        exited_at = _relay(
            conn, run, watch_client=not want_stdin, timed=timer is not None, ring_out=ring_out
        )
        with run.lock:
            run.done = True
        returncode = proc.wait()
        finished = True
    finally:
        if timer is not None:
            timer.cancel()
        if not finished:
            run.done = True
            run.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    write_json(
        conn,
        Kind.RESULT,
        {
            "exit_code": returncode if returncode >= 0 else None,
            "signal": -returncode if returncode < 0 else None,
            "timed_out": run.timed_out,
            "duration": round(exited_at - started, 6),
            **({"keepalive": True} if keep else {}),
            **({"files": files} if files else {}),
        },
    )
