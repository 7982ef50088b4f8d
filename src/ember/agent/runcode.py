"""The ``run_code`` op: notebook-style Python in one persistent worker process.

A fresh ``python3`` costs ~7 s in the guest and forking this agent ~2 s, so the
worker (``python3 -m ember.agent.worker``) is started once, in the background,
when the agent starts, and then serves every call: its globals persist from
one call to the next, like a notebook kernel. It talks to us over a
socketpair with the ordinary framing: ``REQUEST {"op": "run", "code"}`` in,
one ``RESULT {"stdout", "stderr", "value", "error"}`` out, which we pass to the
client untouched.

Calls are serialised by a lock (one interpreter, one call at a time). A cell that
overruns the call's timeout is interrupted first (``SIGINT``: ``KeyboardInterrupt`` in
the cell, see ``worker.Interrupt``); the caller gets ``WorkerTimeout`` saying that the
worker and its state are kept, and the next call runs at once. Only a cell still running
:data:`INTERRUPT_GRACE_S` later (it ignores the interrupt, or sits in C code that never
returns to the interpreter) gets the worker killed. When the worker dies mid-call
(segfault, ``os._exit``) or is killed, the caller gets a normal RESULT whose ``error``
says ``WorkerCrashed`` or ``WorkerTimeout`` and that the worker's state is gone, and a
replacement starts in the background at once: how a worker is started and replaced is
:mod:`ember.agent.workerproc`'s job. Whether the worker is ready shows in ``ping``
(``"worker"``): a template should be snapshotted only once it says ``"ready"``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.agent.common import (
    BadRequest,
    ClientGone,
    opt_bool,
    opt_float,
    opt_int,
    opt_str,
    req_str,
)
from ember.agent.resume import ResumeState
from ember.agent.workerproc import WorkerProcess, WorkerState, describe
from ember.protocol import (
    Kind,
    ProtocolError,
    decode_json,
    encode_json,
    interrupted_result,
    read_frame,
    write_frame,
)

__all__ = ["CodeRunner", "WorkerState"]

INTERRUPT_GRACE_S = 3.0  # an interrupted cell ends within this, or the worker is killed (a
# loaded host can hold the vCPU off for a second or more; a kill costs the whole namespace)


def _error(type_name: str, message: str) -> bytes:
    return encode_json(
        {
            "stdout": "",
            "stderr": "",
            "value": None,
            "error": {"type": type_name, "message": message, "traceback": ""},
        }
    )


def _timed_out(timeout: float | None) -> bytes:
    return _error(
        "WorkerTimeout",
        f"the code ran longer than {timeout or 0:g} s and did not stop when interrupted; "
        "the worker was killed and its state (variables, imports) is lost; "
        "a fresh worker is starting",
    )


def _crashed(how: str) -> bytes:
    return _error(
        "WorkerCrashed",
        f"the Python worker {how} during this call; its state (variables, "
        "imports) is lost; a fresh worker is starting",
    )


class CodeRunner(WorkerProcess):
    """Runs cells in the worker, one at a time: its requests, results, interrupts and kills."""

    def __init__(self, command: list[str] | None = None, *, heap_bytes: int = 0) -> None:
        super().__init__(command, heap_bytes=heap_bytes)
        self.resume = ResumeState()  # the server hands over its own
        self._send_lock = threading.Lock()  # frames to the worker: a call's and wake-ups

    def run(
        self,
        code: str,
        timeout: float | None,
        linger: float | None = None,
        output: Callable[[Kind, bytes], None] | None = None,
    ) -> bytes:
        """Run one cell; return the RESULT payload to send to the client. With ``output``
        the cell's output is streamed: each piece is passed to it as the worker sends it."""
        with self._lock:
            try:
                sock = self._ensure()
            except Exception as exc:
                return _error("WorkerUnavailable", f"the Python worker could not start: {exc}")
            try:
                # the worker reseeds ``random`` when the generation moved (a restore or fork)
                request: dict[str, Any] = {
                    "op": "run",
                    "code": code,
                    "generation": self.resume.generation,
                }
                if linger is not None:
                    request["linger"] = linger
                if output is not None:
                    request["stream"] = True
                with self._send_lock:
                    write_frame(sock, Kind.REQUEST, encode_json(request))
                frame = self._answer(sock, timeout, output)
            except TimeoutError:
                frame = self._interrupted(sock, output)
                if frame is not None:
                    return encode_json(interrupted_result(decode_json(frame[1]), timeout))
                self._discard()
                self.start_in_background()
                return _timed_out(timeout)
            except (OSError, ProtocolError):
                frame = None
            if frame is not None and frame[0] is Kind.RESULT:
                return frame[1]
            status = self._discard(grace=5.0)
            self.start_in_background()
            how = describe(status) if status is not None else "went away"
            return _crashed(how)

    def _interrupted(
        self, sock: socket.socket, output: Callable[[Kind, bytes], None] | None
    ) -> tuple[Kind, bytes] | None:
        """(Lock held.) Interrupt the overrunning cell; the worker's RESULT if it ends within
        :data:`INTERRUPT_GRACE_S`, else None (kill it)."""
        if not self.interrupt():
            return None
        try:
            frame = self._answer(sock, INTERRUPT_GRACE_S, output)
        except (TimeoutError, OSError, ProtocolError):
            return None
        return frame if frame is not None and frame[0] is Kind.RESULT else None

    def interrupt(self, epoch: int | None = None) -> bool:
        """``SIGINT`` to the worker (the worker alone: a cell's children are its own
        business), if it is alive and, given ``epoch``, still the one of that epoch."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        if epoch is not None and (self.notice is None or self.notice.read_epoch() != epoch):
            return False
        try:
            os.kill(proc.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    @staticmethod
    def _answer(
        sock: socket.socket, timeout: float | None, output: Callable[[Kind, bytes], None] | None
    ) -> tuple[Kind, bytes] | None:
        """The worker's RESULT, passing any streamed output on; TimeoutError past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError()
                    sock.settimeout(left)
                frame = read_frame(sock)
                if frame is None or frame[0] not in (Kind.STDOUT, Kind.STDERR):
                    return frame
                if output is not None:
                    try:
                        output(*frame)
                    except (OSError, ClientGone):
                        output = None  # the host left: the cell still runs to its end
        finally:
            sock.settimeout(None)

    def handle(self, conn: socket.socket, req: dict[str, Any]) -> None:
        """The ``run_code`` op handler; ``"stream": true`` sends the cell's output as
        STDOUT/STDERR frames while it runs, before the RESULT (which still holds it all)."""
        code, timeout = req_str(req, "code"), opt_float(req, "timeout")

        def relay(kind: Kind, data: bytes) -> None:
            write_frame(conn, kind, data)

        output = relay if opt_bool(req, "stream") else None
        write_frame(conn, Kind.RESULT, self.run(code, timeout, opt_float(req, "linger"), output))

    # -- the code rings' slow path (ember.agent.codering) ------------------------------

    def wake(self) -> None:
        """A host wrote a request into the ring while the worker slept: wake it. Without a
        live worker, make sure one is starting (it serves the ring once it is up)."""
        sock, proc = self._sock, self._proc
        if sock is not None and proc is not None and proc.poll() is None:
            try:
                with self._send_lock:
                    write_frame(sock, Kind.REQUEST, encode_json({"op": "wake"}))
                return
            except OSError:
                pass
        if self.state is not WorkerState.STARTING and not self._closed:
            self.start_in_background()

    def stop(self, epoch: int, why: str, timeout: float | None) -> bytes:
        """A ring call ended without a reply: the worker of ``epoch`` overran ``timeout``
        (it is killed now) or died. The RESULT is what a vsock call would have returned."""
        notice = self.notice
        proc = self._proc
        if notice is None:
            return _crashed(self.last_death or "went away")
        alive = notice.read_epoch() == epoch
        if why == "timeout" and alive and proc is not None and proc.poll() is None:
            self._kill_group(proc)  # _watch publishes it and starts another
            # Published before we answer: the host's next call must not find it "ready".
            proc.wait()
            deadline = time.monotonic() + 5.0
            while notice.read_epoch() == epoch and time.monotonic() < deadline:
                time.sleep(0.001)
            return _timed_out(timeout)
        how = self.last_death or "went away"
        return _crashed(how)

    def handle_ring(self, conn: socket.socket, req: dict[str, Any]) -> None:
        """The ``code_ring`` op: ``{"action": "wake"}``, ``{"action": "interrupt", "epoch"}``
        (a ring call overran its timeout: :meth:`interrupt`; the host then waits
        :data:`INTERRUPT_GRACE_S` for the reply before it asks for ``stop``) or
        ``{"action": "stop", "epoch", "why": "timeout"|"crashed", "timeout"}``."""
        action = opt_str(req, "action")
        if action == "interrupt":
            epoch = opt_int(req, "epoch")
            if epoch is None:
                raise BadRequest("interrupt needs the epoch of the worker to interrupt")
            sent = self.interrupt(epoch)
            write_frame(conn, Kind.RESULT, encode_json({"interrupted": sent,
                                                        "grace": INTERRUPT_GRACE_S}))  # fmt: skip
        elif action == "wake":
            # Answer first: on one vCPU the woken worker preempts this thread, runs the cell
            # and polls for more, and the answer would wait for the next tick (40 ms here).
            try:
                write_frame(conn, Kind.RESULT, encode_json({}))
            finally:
                self.wake()
        elif action == "stop":
            epoch = opt_int(req, "epoch")
            why = opt_str(req, "why")
            if epoch is None or why not in ("timeout", "crashed"):
                raise BadRequest("stop needs an epoch and why: timeout or crashed")
            write_frame(conn, Kind.RESULT, self.stop(epoch, why, opt_float(req, "timeout")))
        else:
            raise BadRequest(f"unknown code_ring action {action!r}; known: interrupt, stop, wake")
