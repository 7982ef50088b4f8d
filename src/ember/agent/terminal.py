"""The ``pty`` op: an interactive program on a pseudo-terminal (``ember shell``, the API's PTY).

Request: ``{"op": "pty"}`` plus optional ``argv`` (default: ``bash -l``, else ``sh``),
``env`` (merged over the exec defaults, ``TERM=xterm-256color``), ``cwd``, ``rows``,
``cols`` and ``timeout``. Then, both ways at once until the program ends:

* host -> agent: ``STDIN`` frames are keystrokes, written to the terminal as they are
  (so ^C is the byte 3 and the terminal's line discipline turns it into SIGINT, as on
  any terminal); a ``DATA`` frame is a JSON control object, ``{"rows", "cols"}`` to
  resize (the program gets SIGWINCH) or ``{"signal": N}`` for the foreground process
  group; ``STDIN_EOF`` types the terminal's EOF character (^D).
* agent -> host: ``STDOUT`` frames with whatever the terminal shows (stdout and stderr
  are one stream on a terminal), then ``RESULT {"exit_code", "signal", "timed_out",
  "duration"}`` as for ``exec``.

If the host hangs up, the program's session gets SIGHUP (what closing a terminal
does) and SIGKILL :data:`HANGUP_GRACE` seconds later.

Why it is built this way:

* The program must own the terminal (``/dev/tty``, job control, ^C): it starts in a
  new session under ``setsid --ctty``, which makes the terminal its controlling one.
  The child is *not* started in a session of its own (no ``start_new_session``): a
  process-group leader makes setsid(1) fork and return at once, losing the program.
  The alternative, a ``preexec_fn``, would make ``subprocess`` fork this whole agent
  (~2 s in the emulated guest) instead of spawning.
* ``/dev/pts`` is mounted (devpts) on first use, not at boot: most sandboxes never
  open a terminal, and every boot-time syscall is paid by every template build.
* One thread multiplexes the terminal, the host and the program's exit with ``poll``.
  Keystrokes that the program does not read wait in a buffer of at most
  :data:`MAX_PENDING` bytes; past it the agent stops reading the host, so a paste
  into a stuck program blocks the host's sender, never the program's output.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from typing import Any

from ember.agent.common import BadRequest, ClientGone, ExecError, opt_float, opt_int, opt_str
from ember.agent.execute import default_env
from ember.protocol import Kind, ProtocolError, decode_json, read_frame, write_frame, write_json

__all__ = ["HANGUP_GRACE", "MAX_PENDING", "handle_pty"]

HANGUP_GRACE = 1.0
MAX_PENDING = 1 << 20
_READ = 64 << 10
_MS_NOSUID, _MS_NOEXEC = 2, 8
_mount_lock = threading.Lock()


def _ensure_devpts() -> None:
    """Mount devpts on ``/dev/pts`` unless something already is (the host in tests)."""
    with _mount_lock:
        if os.path.ismount("/dev/pts"):
            return
        import ctypes

        os.makedirs("/dev/pts", exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"devpts", b"/dev/pts", b"devpts", _MS_NOSUID | _MS_NOEXEC,
                      b"mode=0620,ptmxmode=0666") != 0:  # fmt: skip
            err = ctypes.get_errno()
            raise ExecError(f"cannot mount /dev/pts: {os.strerror(err)}")


def _size(req: dict[str, Any], key: str, default: int) -> int:
    value = opt_int(req, key)
    if value is None:
        return default
    if not 0 < value <= 10_000:
        raise BadRequest(f"{key!r} must be between 1 and 10000")
    return value


def get_size(fd: int) -> tuple[int, int]:
    """TIOCGWINSZ: the terminal's rows and columns now."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def set_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ: the kernel tells the foreground process group with SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _argv(req: dict[str, Any]) -> list[str]:
    argv = req.get("argv")
    if argv is None:
        bash = shutil.which("bash")
        return [bash, "-l"] if bash else ["/bin/sh"]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("'argv' must be a non-empty list of strings")
    return argv


def _env(req: dict[str, Any]) -> dict[str, str]:
    env = {**default_env(), "TERM": "xterm-256color"}
    extra = req.get("env")
    if extra is not None:
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise BadRequest("'env' must map strings to strings")
        env.update(extra)
    return env


def _spawn(
    argv: list[str], env: dict[str, str], cwd: str | None, slave: int
) -> subprocess.Popen[bytes]:
    setsid = shutil.which("setsid")
    if setsid is None:
        raise ExecError("no setsid(1) in this image: cannot give the program a terminal")
    try:
        return subprocess.Popen(
            [setsid, "--ctty", "--", *argv],
            stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True,
        )  # fmt: skip
    except OSError as exc:
        raise ExecError(f"cannot start {argv[0]!r}: {exc}") from None


def handle_pty(conn: socket.socket, req: dict[str, Any]) -> None:
    """Serve one ``pty`` request on ``conn`` (see the module docstring)."""
    argv, env = _argv(req), _env(req)
    cwd, timeout = opt_str(req, "cwd"), opt_float(req, "timeout")
    rows, cols = _size(req, "rows", 24), _size(req, "cols", 80)
    _ensure_devpts()
    master, slave = os.openpty()
    try:
        set_size(slave, rows, cols)
        proc = _spawn(argv, env, cwd, slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child has its own: EIO on the master means it is gone
    _Session(conn, master, proc, timeout).serve()


class _Session:
    """One terminal: relay both ways until the program exits or the host hangs up."""

    def __init__(
        self, conn: socket.socket, master: int, proc: subprocess.Popen[bytes], timeout: float | None
    ) -> None:
        self.conn, self.master, self.proc = conn, master, proc
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.started = time.monotonic()
        self.pending = bytearray()
        self.timed_out = False
        os.set_blocking(master, False)

    def serve(self) -> None:
        try:
            returncode = self._relay()
        except BaseException:
            self._kill(signal.SIGHUP)
            raise
        finally:
            os.close(self.master)
        write_json(
            self.conn,
            Kind.RESULT,
            {
                "exit_code": returncode if returncode >= 0 else None,
                "signal": -returncode if returncode < 0 else None,
                "timed_out": self.timed_out,
                "duration": round(time.monotonic() - self.started, 6),
            },
        )

    def _kill(self, first: int) -> None:
        """Signal the program's session, then make sure it is gone."""
        self._signal(first)
        try:
            self.proc.wait(HANGUP_GRACE)
            return
        except subprocess.TimeoutExpired:
            pass
        while True:
            self._signal(signal.SIGKILL)
            try:
                self.proc.wait(0.1)
                return
            except subprocess.TimeoutExpired:
                continue

    def _signal(self, signum: int) -> None:
        # Its group, once setsid(1) has made one; the process itself before that.
        for send in (os.killpg, os.kill):
            try:
                send(self.proc.pid, signum)
                return
            except (ProcessLookupError, PermissionError):
                continue

    def _relay(self) -> int:
        poller = select.poll()
        pidfd = _pidfd(self.proc.pid)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        shown = True  # False once the terminal said EIO: nobody holds it any more
        try:
            while True:
                if shown:
                    poller.register(
                        self.master, select.POLLIN | (select.POLLOUT if self.pending else 0)
                    )
                # a full buffer stops reading the host (a hang-up is still reported)
                poller.register(
                    self.conn.fileno(), select.POLLIN if len(self.pending) < MAX_PENDING else 0
                )
                events = dict(poller.poll(self._wait_ms(pidfd is None)))
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.timed_out = True
                    self._kill(signal.SIGKILL)
                    self._drain()
                    return self.proc.wait()
                if events.get(self.conn.fileno(), 0):
                    self._from_host()
                master_events = events.get(self.master, 0) if shown else 0
                if master_events & select.POLLOUT:
                    self._type()
                if master_events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    shown = self._show()
                    if not shown:
                        poller.unregister(self.master)
                        self.pending.clear()
                if self.proc.poll() is not None:
                    return self._end()
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _wait_ms(self, no_pidfd: bool) -> int | None:
        waits = []
        if self.deadline is not None:
            waits.append(max(0, int((self.deadline - time.monotonic()) * 1000) + 1))
        if no_pidfd:
            waits.append(100)  # an old kernel: look at the child now and then
        return min(waits) if waits else None

    def _from_host(self) -> None:
        frame = read_frame(self.conn)
        if frame is None:
            raise ClientGone()
        kind, payload = frame
        if kind is Kind.STDIN:
            self.pending += payload
        elif kind is Kind.STDIN_EOF:
            self.pending += termios.tcgetattr(self.master)[6][termios.VEOF]
        elif kind is Kind.DATA:
            self._control(payload)
        else:
            raise ProtocolError(f"unexpected {kind.name} frame on a terminal")

    def _control(self, payload: bytes) -> None:
        control = decode_json(payload)
        if "rows" in control or "cols" in control:  # a size not given stays as it is
            now_rows, now_cols = get_size(self.master)
            set_size(
                self.master, _size(control, "rows", now_rows), _size(control, "cols", now_cols)
            )
        sig = control.get("signal")
        if sig is not None:
            if isinstance(sig, bool) or not isinstance(sig, int) or not 0 < sig < 65:
                raise BadRequest("'signal' must be a signal number")
            try:
                os.killpg(os.tcgetpgrp(self.master), sig)
            except OSError:
                pass  # nothing in the foreground any more

    def _type(self) -> None:
        try:
            written = os.write(self.master, self.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self.pending.clear()  # the program is gone; its end is coming
            return
        del self.pending[:written]

    def _show(self) -> bool:
        """Relay what the terminal has; False once it reports EIO (no one holds it)."""
        try:
            data = os.read(self.master, _READ)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno == errno.EIO:
                return False
            raise
        if not data:
            return False
        write_frame(self.conn, Kind.STDOUT, data)
        return True

    def _drain(self) -> None:
        while self._show():
            try:
                if not select.select([self.master], [], [], 0)[0]:
                    return
            except OSError:
                return

    def _end(self) -> int:
        """The program ended: relay what it left, hang up on anything it left running."""
        self.proc.wait()
        self._drain()
        try:
            os.killpg(self.proc.pid, signal.SIGHUP)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in its group
        return self.proc.returncode


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
