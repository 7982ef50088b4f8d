"""The ``run_code`` op: notebook-style Python in one persistent worker process.

A fresh ``python3`` costs ~7 s in the guest and forking this agent ~2 s, so the
worker (``python3 -m ember.agent.worker``) is started once, in the background,
when the agent starts, and then serves every call: its globals persist from
one call to the next, like a notebook kernel. It talks to us over a
socketpair with the ordinary framing: ``REQUEST {"op": "run", "code"}`` in,
one ``RESULT {"stdout", "stderr", "value", "error"}`` out, which we pass to the
client untouched.

Calls are serialised by a lock (one interpreter, one call at a time). When the
worker dies mid-call (segfault, ``os._exit``) or overruns the call's timeout,
the caller gets a normal RESULT whose ``error`` says ``WorkerCrashed`` or
``WorkerTimeout`` and that the worker's state is gone, and a replacement
starts in the background at once, so the next call waits as little as possible.
Whether the worker is ready shows in ``ping`` (``"worker"``): a template
should be snapshotted only once it says ``"ready"``.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from ember.agent.common import log, opt_float, req_str
from ember.agent.heap import HEAP_ENV, MALLOC_ENV
from ember.agent.resume import ResumeState
from ember.protocol import Kind, ProtocolError, encode_json, read_frame, write_frame

__all__ = ["CodeRunner", "WorkerState"]

STARTUP_TIMEOUT = 300.0  # a cold python3 in the guest takes 7-18 s; leave a wide margin


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # could not start; the next call tries again
    STOPPED = "stopped"


def _package_root() -> str:
    """The directory holding the ``ember`` package, for the worker's PYTHONPATH."""
    here = os.path.dirname(os.path.abspath(__file__))  # .../ember/agent
    return os.path.dirname(os.path.dirname(here))


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def _error(type_name: str, message: str) -> bytes:
    return encode_json(
        {
            "stdout": "",
            "stderr": "",
            "value": None,
            "error": {"type": type_name, "message": message, "traceback": ""},
        }
    )


class CodeRunner:
    """Owns the worker process: start, call, detect death, replace."""

    def __init__(self, command: list[str] | None = None, *, heap_bytes: int = 0) -> None:
        self._command = command or [sys.executable, "-m", "ember.agent.worker"]
        # Touched by the first worker only (the template's): a replacement started in a live
        # sandbox would pay a page fault per page, the very cost the heap exists to avoid.
        self._heap_bytes = heap_bytes
        self._lock = threading.Lock()  # held for a whole call, and while (re)starting
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.state = WorkerState.STOPPED
        self.last_error = ""
        self._closed = False
        self.resume = ResumeState()  # the server hands over its own

    def start_in_background(self) -> None:
        """Begin starting a worker without making the caller wait for it."""
        self.state = WorkerState.STARTING
        threading.Thread(target=self._start_locked, name="worker-start", daemon=True).start()

    def _start_locked(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._ensure()
            except Exception as exc:
                log(f"run_code worker did not start: {exc}")

    def _ensure(self) -> socket.socket:
        """Return a live worker's socket, starting one if needed (lock held)."""
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._closed:
            raise RuntimeError("the agent is shutting down")
        self._discard()
        self.state = WorkerState.STARTING
        ours, theirs = socket.socketpair()
        env = dict(os.environ) | MALLOC_ENV  # freed memory stays in the heap: ember.agent.heap
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH")) if p
        )
        env[HEAP_ENV], self._heap_bytes = str(self._heap_bytes), 0
        try:
            proc = subprocess.Popen(
                [*self._command, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # output below sys.stdout (os.write, children)
                stderr=subprocess.DEVNULL,  # must not flood the serial console
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            self.state, self.last_error = WorkerState.FAILED, str(exc)
            raise
        finally:
            theirs.close()
        self._proc, self._sock = proc, ours
        ours.settimeout(STARTUP_TIMEOUT)
        try:
            frame = read_frame(ours)
            if frame is None or frame[0] is not Kind.RESULT:
                raise ProtocolError(f"worker {_describe(proc.wait())} while starting")
        except (OSError, ProtocolError) as exc:
            self._discard()
            self.state, self.last_error = WorkerState.FAILED, str(exc)
            raise
        ours.settimeout(None)
        self.state, self.last_error = WorkerState.READY, ""
        return ours

    def _discard(self, grace: float = 0.0) -> int | None:
        """Kill and reap the worker (and anything it started); return its exit status.

        ``grace`` lets a worker that is already exiting finish on its own, so
        its real status is reported rather than our SIGKILL: its socket closes
        a moment before it can be reaped.
        """
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()
        if proc is None:
            return None
        if grace:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return proc.wait()

    def run(self, code: str, timeout: float | None) -> bytes:
        """Run one cell; return the RESULT payload to send to the client."""
        with self._lock:
            try:
                sock = self._ensure()
            except Exception as exc:
                return _error("WorkerUnavailable", f"the Python worker could not start: {exc}")
            try:
                # the worker reseeds ``random`` when the generation moved (a restore or fork)
                request = {"op": "run", "code": code, "generation": self.resume.generation}
                write_frame(sock, Kind.REQUEST, encode_json(request))
                sock.settimeout(timeout)
                frame = read_frame(sock)
                sock.settimeout(None)
            except TimeoutError:
                self._discard()
                self.start_in_background()
                return _error(
                    "WorkerTimeout",
                    f"the code ran longer than {timeout or 0:g} s; the worker was killed and "
                    "its state (variables, imports) is lost; a fresh worker is starting",
                )
            except (OSError, ProtocolError):
                frame = None
            if frame is not None and frame[0] is Kind.RESULT:
                return frame[1]
            status = self._discard(grace=5.0)
            self.start_in_background()
            how = _describe(status) if status is not None else "went away"
            return _error(
                "WorkerCrashed",
                f"the Python worker {how} during this call; its state (variables, "
                "imports) is lost; a fresh worker is starting",
            )

    def close(self) -> None:
        """Stop the worker for good, even in the middle of a call or a start."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # unblocks whoever holds the lock
            except (ProcessLookupError, PermissionError):
                pass
        if self._lock.acquire(timeout=5.0):
            try:
                self._discard()
            finally:
                self._lock.release()
        self.state = WorkerState.STOPPED

    def handle(self, conn: socket.socket, req: dict[str, Any]) -> None:
        """The ``run_code`` op handler."""
        code, timeout = req_str(req, "code"), opt_float(req, "timeout")
        write_frame(conn, Kind.RESULT, self.run(code, timeout))
