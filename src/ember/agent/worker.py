"""The run_code worker: a warm Python that runs cells with notebook semantics.

Started once by the agent (``python3 -m ember.agent.worker FD``, FD being its
end of a socketpair) because a new interpreter costs ~7 s in the guest. It
announces itself with ``RESULT {"ready": true}``, then answers each
``REQUEST {"op": "run", "code"}`` with ``RESULT {"stdout", "stderr", "value",
"error"}``:

* the code runs in one persistent namespace, installed as ``__main__`` so that
  functions and classes defined in cells pickle by reference as usual;
* if the last statement is an expression, its ``repr`` is the ``value``
  (``None`` shows as nothing, as in a notebook);
* ``sys.stdout``/``sys.stderr`` are captured, up to :data:`CAPTURE_LIMIT`
  characters each; output written below them (``os.write(1, ...)``, child
  processes) goes to ``/dev/null``: use ``exec`` for programs;
* exceptions, ``SystemExit`` included, come back as ``error`` with a traceback
  that starts at the cell, never at this file; the worker carries on;
* ``SIGINT`` is the agent's way to stop a cell that overran its timeout
  (:class:`Interrupt`): it raises ``KeyboardInterrupt`` in the cell, as Ctrl-C in a
  notebook does, so the namespace survives; outside a cell, or while the worker sends
  a streamed cell's output, it waits or is ignored, never breaking the worker's own I/O.

The result must fit one frame, so oversized text is cut (and marked) before
sending rather than risking a frame the agent would refuse.
"""

from __future__ import annotations

import ast
import builtins
import gc
import linecache
import os
import signal
import socket
import sys
import traceback
import types
from typing import Any

from ember.agent import codering, heap, preload, pyclone, pywarm, shm
from ember.agent.cellio import CAPTURE_LIMIT, _Capture, _clip, _error_result, _Streamer, fit
from ember.agent.common import BadRequest
from ember.agent.pybase import _reseed, _restart_clocks
from ember.agent.resume import ResumeState, apply_resume
from ember.protocol import (
    Kind,
    ProtocolError,
    decode_json,
    encode_json,
    read_frame,
    write_frame,
)

__all__ = ["CAPTURE_LIMIT", "Interrupt", "Worker", "main"]

_holder_stack: list[Any] = []  # the holder runs on it: it must live as long as this process
REPR_LIMIT = 64 << 10
# Prefixed to the host's entropy before random.seed hashes it (SHA-512), so this seed differs
# from any other use of the same bytes. The bytes themselves are this guest's own (its kernel
# took them too), so a program that recovers them learns nothing about another sandbox.
RESEED_DOMAIN = b"ember: the run_code worker's generators\0"


def _describe_error(exc: BaseException, *, parsing: bool) -> dict[str, str]:
    try:
        message = str(exc)
    except Exception:
        message = "<exception whose str() failed>"
    if parsing:
        lines = traceback.format_exception_only(type(exc), exc)
    else:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # start the traceback at the cell, not at this module
        lines = traceback.format_exception(type(exc), exc, tb)
    return {"type": type(exc).__name__, "message": message, "traceback": "".join(lines)}


class Interrupt:
    """``SIGINT`` as ``KeyboardInterrupt`` inside a cell only.

    A cell past its timeout used to cost its whole namespace: the agent killed the worker,
    and the replacement, a fresh ``python3`` with the template's preload, took ~30 s of guest
    time before the next call could run. Interrupting it, as Ctrl-C interrupts a notebook
    cell, keeps both; only a cell that ignores the interrupt is killed (the agent's
    ``INTERRUPT_GRACE_S``). Python runs the handler in the main thread between bytecodes,
    so it raises where the cell is: in its loop, its ``time.sleep``, its blocking read.

    It must never raise in the worker's own code: outside a cell (the interrupt came late)
    it is dropped, and while the worker writes a streamed cell's frames (``shielded``) it
    is held until the frame is whole, since a frame cut in two would break the stream to
    the agent. One interrupt per cell: raising disarms it.
    """

    def __init__(self) -> None:
        self.armed = False
        self.shielded = 0
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if not self.armed:
            return
        if self.shielded:
            self.pending = True
            return
        self.armed = self.pending = False
        raise KeyboardInterrupt

    def unshield(self) -> None:
        """Leave a shielded section; an interrupt held there is raised now."""
        self.shielded -= 1
        if self.pending and self.armed and not self.shielded:
            self.armed = self.pending = False
            raise KeyboardInterrupt


class Worker:
    """The persistent namespace and the cell runner."""

    def __init__(self) -> None:
        main_module = types.ModuleType("__main__")
        main_module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main_module
        self.namespace: dict[str, Any] = main_module.__dict__
        self._cells = 0
        self.generation = 0
        self.interrupt = Interrupt()

    def reseed(self, generation: object, entropy: bytes = b"") -> None:
        """After a restore or fork (a new ``generation``), reseed ``random`` and numpy's global
        generator, and restart ``tempfile``'s name sequence (``pybase._reseed``) and
        ``logging``'s clock (``pybase._restart_clocks``).

        The template's interpreter seeded them once; every sibling would otherwise draw the
        same numbers. ``entropy``: the host's bytes from the request that resumed this VM
        (the code ring's first request); the seeds come from them in user space, with no
        ``getrandom`` (~3,000 emulated guest-kernel instructions before the first reply) and
        no hashlib (OpenSSL's code and state: more pages for a restored guest to touch first).
        Without them (the agent applied the resume: a vsock request), the kernel's, which
        the agent fed the host's entropy first.
        """
        if isinstance(generation, int) and generation != self.generation:
            self.generation = generation
            _reseed(RESEED_DOMAIN + entropy if entropy else b"")
            _restart_clocks()  # a restored sandbox's session starts now

    def run(self, code: str, emit: _Streamer | None = None) -> dict[str, Any]:
        """Run one cell; with ``emit``, its output also goes out as it is written."""
        self._cells += 1
        filename = f"<cell-{self._cells}>"
        if emit is None:
            out, err = _Capture(), _Capture()
        else:
            out = _Capture(emit=lambda text: emit(Kind.STDOUT, text))
            err = _Capture(emit=lambda text: emit(Kind.STDERR, text))  # (None: flush)
        value: str | None = None
        error: dict[str, str] | None = None
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        interrupt = self.interrupt
        try:
            interrupt.armed, interrupt.pending = True, False
            try:
                tree = ast.parse(code, filename, "exec")
            except (SyntaxError, ValueError) as exc:
                interrupt.armed = False
                error = _describe_error(exc, parsing=True)
            else:
                linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
                last = tree.body[-1] if tree.body else None
                if isinstance(last, ast.Expr):
                    tree.body.pop()
                exec(compile(tree, filename, "exec"), self.namespace)
                if isinstance(last, ast.Expr):
                    expr = compile(ast.Expression(last.value), filename, "eval")
                    result = eval(expr, self.namespace)
                    if result is not None:
                        value = _clip(repr(result), REPR_LIMIT)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the cell's too
            interrupt.armed = False  # first: no call can run before this store
            error = _describe_error(exc, parsing=False)
        finally:
            interrupt.armed = False
            sys.stdout, sys.stderr = saved
            if emit is not None:
                emit(Kind.STDOUT, None)
        return {"stdout": out.getvalue(), "stderr": err.getvalue(), "value": value, "error": error}


def _linger(request: dict[str, Any]) -> float | None:
    """How long to poll the code ring after this call: what it asks (a template build asks
    for long), else None, the window learnt from the caller's pace (``SpinWindow``)."""
    linger = request.get("linger")
    if isinstance(linger, (int, float)) and not isinstance(linger, bool):
        return float(linger)
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        sys.stderr.write("usage: python3 -m ember.agent.worker FD  (started by the agent)\n")
        return 2
    fd = int(argv[1])
    pooled = fd <= 2  # a pooled replacement gets its socket as stdin (CodeRunner._from_pool)
    holder = 0
    if pooled:  # it has the pool's holder, and warmed numpy's kernels before the snapshot
        moved = os.dup(fd)  # cells' input() and children must find /dev/null there, not us
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
        fd = moved
    else:
        holder, fd = pyclone.holder_without(fd, _holder_stack)
        os.set_inheritable(fd, False)  # a cell's os.system() child must not hold it open
    sock = socket.socket(fileno=fd)
    # The whole region is 16,384 page-table entries (~4.3 s of emulated kernel here): mapped
    # by the template's worker, inherited by every restored sandbox; a replacement in a live
    # sandbox maps just its two code slots.
    if os.environ.get(codering.PREMAP_ENV) == "1":
        shm.premap()  # memory channels' region, mapped once here and in every restored sandbox
    serve_cells(sock, codering.WorkerRing.open(), warmed=pooled, holder=holder)
    return 0


def serve_cells(
    sock: socket.socket,
    code_ring: codering.WorkerRing | None,
    *,
    warmed: bool = False,
    holder: int = 0,
) -> None:
    """Warm up, say "ready" to the agent on ``sock`` (with the pid of this worker's
    ``holder``, 0 for none), then serve cells from it and from ``code_ring`` until the agent
    goes away. ``warmed``: numpy's kernels have run in this process already (a pool member
    runs them before the snapshot)."""
    worker = Worker()
    preload.import_from_env()  # the template's --preload modules, before "ready"
    if not warmed:
        pywarm.warm_numpy()  # numpy's kernels once, so the first real call is not the slow one
    heap.touch_from_env()  # pages later cells reuse for free (ember.agent.heap)
    gc.freeze()  # the template's objects: never scanned (nor written to) by a collection
    worker.run("None")  # touch the parse/compile/exec path now, not on the first real call
    resumed = ResumeState()  # what ring requests' ``resume`` applied (vsock: the agent's)
    resumed.warm()

    def answer(
        request: dict[str, Any],
        generation: object,
        emit: _Streamer | None = None,
        entropy: bytes = b"",
    ) -> tuple[dict[str, Any], float | None]:
        code = request.get("code")
        if not isinstance(code, str):
            return _error_result("BadRequest", "no code"), None
        # a new generation (restore, fork): reseed. With a region its generation is the one
        # signal for both paths, so switching between them never reseeds.
        worker.reseed(code_ring.generation if code_ring is not None else generation, entropy)
        return worker.run(code, emit), _linger(request)

    def on_ring(payload: bytes) -> tuple[bytes, float | None]:
        linger: float | None = None
        entropy = b""
        try:
            request = decode_json(payload)
            if "resume" in request:  # the host's first ring request to this VM
                entropy = apply_resume(resumed, request["resume"])
        except (ProtocolError, BadRequest) as exc:
            return fit(_error_result(type(exc).__name__, str(exc))), linger
        result, linger = answer(request, None, entropy=entropy)
        return fit({**result, "id": request.get("id")}), linger  # the host skips stale ones

    def on_socket() -> float | None:
        frame = read_frame(sock)
        if frame is None:
            raise EOFError("the agent has gone")
        kind, payload = frame
        request = decode_json(payload) if kind is Kind.REQUEST else {}
        if request.get("op") == "wake":  # a host wrote to the ring while we slept
            return None
        emit = _Streamer(sock, worker.interrupt) if request.get("stream") is True else None
        result, linger = answer(request, request.get("generation"), emit)
        if code_ring is not None:
            code_ring.refresh()  # announced before the reply: the host's next call may use it
        write_frame(sock, Kind.RESULT, fit(result))
        return linger

    worker.interrupt.install()  # before "ready": from then on the agent may interrupt a cell
    ready = {"ready": True, "pid": os.getpid(), "holder": holder}
    write_frame(sock, Kind.RESULT, encode_json(ready))
    codering.serve(sock, code_ring, on_ring, on_socket)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
