"""The agent's accept loop and op dispatch.

One connection carries one request: its first frame is ``REQUEST {"op": ...}``
and the op's handler owns the connection until it has sent its ``RESULT`` or
``ERROR``. Each connection runs on its own thread, so a long ``exec`` never
delays a ``ping``.

The agent must outlive anything the host or guest code does to it, so:

* every handler runs under a catch-all that answers ``ERROR {"type",
  "message"}`` named after the exception (``FileNotFoundError``,
  ``BadRequest``, ``ExecError``, ...);
* a framing violation (garbage, an oversized length, an unknown kind) gets a
  best-effort ``ERROR {"type": "ProtocolError"}`` and the connection is closed:
  after a bad header nothing later on that stream can be trusted;
* a crash in one connection's thread ends that connection only.

Threads are pooled rather than started per connection: in the guest a new
thread's stack costs page faults (~5 ms each), and pooled threads are already
warm in a snapshot. The accept loop blocks in ``poll()`` on the listener and a
wake-up pipe, so an idle agent costs the guest no timer wake-ups at all.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.agent import shm
from ember.agent.common import BadRequest, ClientGone, kept_stream, log, opt_str
from ember.agent.deadlines import DEADLINES
from ember.agent.execute import exec_handler
from ember.agent.filering import FILE_RING_OPS
from ember.agent.files import FILE_OPS
from ember.agent.hugemap import huge_chunks
from ember.agent.pool import InterpreterPool
from ember.agent.resume import ResumeState, apply_resume
from ember.agent.runcode import CodeRunner
from ember.agent.terminal import handle_pty
from ember.agent.watch import handle_watch
from ember.protocol import (
    KEEPALIVE_OPS,
    PROTOCOL_VERSION,
    Kind,
    ProtocolError,
    decode_json,
    error_payload,
    read_frame,
    write_frame,
    write_json,
)

__all__ = ["MAX_CONNECTIONS", "AgentServer", "Handler"]

Handler = Callable[[socket.socket, dict[str, Any]], None]

MAX_CONNECTIONS = 256  # beyond this a new connection is answered "Busy" and closed
MAX_IDLE_THREADS = 16


class AgentServer:
    """Serves agent requests on any listening stream socket (vsock in the guest, Unix in tests)."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        runner: CodeRunner | None = None,
        pool: InterpreterPool | None = None,
    ) -> None:
        self._listener = listener
        DEADLINES.start()  # here, so the template holds the thread: no exec starts one
        self.resume = ResumeState()
        self.resume.warm()
        # File transfers through the region write from and read into these mappings:
        # made in the template, every restored sandbox has them without a guest mmap.
        shm.premap()
        self.runner = runner if runner is not None else CodeRunner()
        self.runner.resume = self.resume
        self.runner.use_pool(pool)  # a replacement worker is a pre-started interpreter
        self.pool = pool  # pre-started interpreters for exec; refilled only between requests
        if pool is not None:
            pool.resume = self.resume
        self._started = time.monotonic()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._active = 0
        self._idle = 0
        self._jobs: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self._ops: dict[str, Handler] = {
            "ping": self._ping,
            "exec": exec_handler(pool),
            "run_code": self.runner.handle,
            "code_ring": self.runner.handle_ring,
            "shutdown": self._shutdown,
            "pool": self._pool_op,
            "pty": handle_pty,
            "watch": handle_watch,
            **FILE_OPS,
            **FILE_RING_OPS,
        }

    # -- accept loop ------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop` (or a ``shutdown`` request)."""
        self._listener.setblocking(False)
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                poller.poll()
                if self._stopping.is_set():
                    break
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log(f"accept failed: {exc}")
                    time.sleep(0.1)
                    continue
                conn.setblocking(True)
                self._dispatch(conn)
        finally:
            for _ in range(self._idle):
                self._jobs.put(None)
            self.runner.close()
            if self.pool is not None:
                self.pool.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return; safe from any thread, idempotent."""
        if not self._stopping.is_set():
            self._stopping.set()
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass

    def _dispatch(self, conn: socket.socket) -> None:
        with self._lock:
            if self._active >= MAX_CONNECTIONS:
                busy = True
            else:
                busy = False
                self._active += 1
                reuse = self._idle > 0
                if reuse:
                    self._idle -= 1
        if busy:
            self._reply_error(conn, "Busy", f"over {MAX_CONNECTIONS} connections at once")
            conn.close()
        elif reuse:
            self._jobs.put(conn)
        else:
            threading.Thread(target=self._pool_thread, args=(conn,), daemon=True).start()

    def _pool_thread(self, conn: socket.socket | None) -> None:
        while conn is not None:
            self._serve_connection(conn)
            with self._lock:
                self._active -= 1
                if self._idle >= MAX_IDLE_THREADS or self._stopping.is_set():
                    return
                self._idle += 1
            conn = self._jobs.get()

    # -- one connection ---------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            while self._serve_request(conn):
                pass  # the host kept the connection for its next short request
        except ProtocolError as exc:
            self._reply_error(conn, "ProtocolError", str(exc))
        except (ClientGone, OSError):
            pass  # the host went away; nothing to say to it
        except BaseException as exc:
            log(f"connection handler failed: {exc!r}")
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # also wakes a stdin pump blocked in recv
            except OSError:
                pass
            conn.close()

    def _serve_request(self, conn: socket.socket) -> bool:
        """One request; True if the host asked to keep the connection for another."""
        frame = read_frame(conn)
        if frame is None:
            return False
        kind, payload = frame
        if kind is not Kind.REQUEST:
            raise ProtocolError(f"the first frame must be a REQUEST, not {kind.name}")
        request = decode_json(payload)
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        # Anything but ping keeps the pool from refilling: that costs the guest seconds of CPU.
        # A watch only waits (for as long as the host likes): it must not hold refills off.
        counted = self.pool is not None and op not in ("ping", "watch")
        if counted:
            assert self.pool is not None
            self.pool.busy()
        answered = False  # a RESULT, not an ERROR: what a kept stream needs
        try:
            if "resume" in request:  # the first request after a restore or fork: before any op
                apply_resume(self.resume, request["resume"])
            if handler is None:
                raise BadRequest(f"unknown op {op!r}; known: {', '.join(sorted(self._ops))}")
            handler(conn, request)
            answered = True
        except (ProtocolError, ClientGone):
            raise
        except Exception as exc:
            self._reply_error(conn, type(exc).__name__, str(exc))
        finally:
            if counted:
                assert self.pool is not None
                self.pool.idle()
        if request.get("keepalive") is True and op in KEEPALIVE_OPS:
            return True
        return answered and kept_stream(request)  # the host was told so in the RESULT

    @staticmethod
    def _reply_error(conn: socket.socket, type_name: str, message: str) -> None:
        try:
            write_frame(conn, Kind.ERROR, error_payload(type_name, message))
        except Exception:
            pass  # best effort: the connection may be the thing that failed

    # -- ops owned by the server ------------------------------------------------------

    def _ping(self, conn: socket.socket, req: dict[str, Any]) -> None:
        write_json(
            conn,
            Kind.RESULT,
            {
                "pong": True,
                "version": PROTOCOL_VERSION,
                "uptime": round(time.monotonic() - self._started, 3),
                "pid": os.getpid(),
                "worker": self.runner.state.value,
                "worker_replacements": [self.runner.replacements, self.runner.pooled_replacements],
                **({"pool": self.pool.status()} if self.pool is not None else {}),
                "resume": self.resume.snapshot(),
            },
        )

    def _pool_op(self, conn: socket.socket, req: dict[str, Any]) -> None:
        """``{"op": "pool", "action": "warm"}``: the waiting interpreters rehearse a program's
        start (:meth:`InterpreterPool.warm`); the pages each read, none without a pool.
        ``"action": "modules"``: the modules the preload imported (kept out of ``ping``, whose
        answer must fit one vsock packet). ``"action": "huge"``: the guest-physical 2 MiB
        pages of the warm interpreters' heaps (:mod:`ember.agent.hugemap`), asked by a
        template build."""
        action = opt_str(req, "action")
        if action == "warm":
            touched = self.pool.warm() if self.pool is not None else []
            write_json(conn, Kind.RESULT, {"warmed": touched})
        elif action == "modules":
            names = self.pool.modules() if self.pool is not None else []
            write_json(conn, Kind.RESULT, {"preloaded": names})
        elif action == "huge":
            pids = [*self.runner.pids(), *(self.pool.pids() if self.pool is not None else ())]
            write_json(conn, Kind.RESULT, {"huge": huge_chunks(pids)})
        else:
            raise BadRequest(f"unknown pool action {action!r}; known: warm, modules, huge")

    def _shutdown(self, conn: socket.socket, req: dict[str, Any]) -> None:
        write_json(conn, Kind.RESULT, {})
        self.stop()
