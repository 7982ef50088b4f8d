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
* The command's output, stdin, deadline and hang-up are :mod:`ember.agent.relay`'s.
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
import socket
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.agent.common import (
    BadRequest,
    ExecError,
    kept_stream,
    opt_bool,
    opt_float,
    opt_str,
    req_path,
)
from ember.agent.filering import leased_slot
from ember.agent.files import Sink
from ember.agent.relay import KILL_GRACE, _RingOutput, _serve
from ember.agent.simd import SIMD_ENV

if TYPE_CHECKING:
    from ember.agent.pool import InterpreterPool

__all__ = ["KILL_GRACE", "default_env", "exec_handler", "handle_exec"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A script this request writes and runs (``ember run``) goes to the pre-started interpreter
# with the hand-over, bytes and real path, so it opens nothing: python3's open, fstat, read,
# readlink and close of it cost ~15,000 emulated instructions here. The bytes are those just
# written, with nothing run in between; only the file's access time differs (python3's read
# would set it). A bigger script is read from the file, as python3 does.
SCRIPT_HANDOVER_MAX = 32 << 10
Written = dict[str, tuple[bytes, str]]  # path -> (bytes, real path)


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


def _write_files(files: list[tuple[str, bytes]], argv: list[str]) -> Written:
    """Each file in place (atomically, parents created, an old file's mode kept), in order;
    the last one, if the command names it as an argument, with its bytes and real path (see
    :data:`SCRIPT_HANDOVER_MAX`; only the last: one written after it under another name,
    ``/a/./s.py`` or through a symlink, could have replaced it)."""
    written: Written = {}
    for i, (path, data) in enumerate(files):
        sink = Sink(path, None, append=False)
        try:
            sink.write(data)
            named = i == len(files) - 1 and len(data) <= SCRIPT_HANDOVER_MAX and path in argv[1:]
            real = _real_path(sink, path) if named else None
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        if real is not None:
            written[path] = (data, real)
    return written


def _real_path(sink: Sink, path: str) -> str | None:
    """Where ``path`` is once ``sink`` commits: its temporary file's real directory (one
    readlink, where the interpreter's own realpath would be an lstat per component)."""
    if sink.tmp is None:
        return None  # written in place (a device, /proc): an interpreter reads it itself
    try:
        real_tmp = os.readlink(f"/proc/self/fd/{sink.fd}")
    except OSError:
        return None
    return os.path.join(os.path.dirname(real_tmp), os.path.basename(path))


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
    written: Written,
) -> subprocess.Popen[bytes]:
    use_pool = req.get("pool", True)
    if not isinstance(use_pool, bool):
        raise BadRequest("'pool' must be true or false")
    if pool is not None and use_pool and req.get("shell") is None:
        proc = pool.take(argv, env, cwd, want_stdin, written=written)
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
    written = _write_files(files, argv)
    proc = _start(argv, req, env, cwd, want_stdin, pool, written)
    try:
        ring_out = None if slot is None else _RingOutput(slot)
        _serve(conn, proc, timeout, want_stdin, ring_out, keep=kept_stream(req), files=len(files))
    finally:
        if pool is not None:
            pool.release(proc)
