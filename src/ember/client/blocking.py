"""The blocking transport: the agent's frames over a connected stream socket.

The client is given a function that returns a *connected* stream socket to the agent
and calls it once per operation: each connection carries exactly one request (short
calls may reuse a kept one), so operations never wait on one another and a failure
never leaves a shared connection in an unknown state. How the socket reaches the
guest (Firecracker-style ``CONNECT 1024`` over the VMM's Unix socket, or a plain Unix
socket in tests) is the caller's business::

    client = AgentClient(lambda: vsock_connect(uds_path, AGENT_PORT))
    r = client.exec(["python3", "-c", "print(6*7)"], timeout=10)
    client.files.write("/data/in.csv", open("in.csv", "rb"))
    for chunk in (stream := client.exec_stream("make")):
        print(chunk.stream, chunk.data)
    print(stream.result)

Data moves in bounded pieces both ways, so files and outputs of any size pass through
constant memory (``exec``/``files.read`` return bytes and so stop at ``max_output``).
What each operation means lives in :mod:`ember.client.core`; this module only moves
its frames, bounded by the deadlines the core gives (``exec``/``run_code`` without a
timeout are the exception: a command may rightly run, silent, as long as it likes).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ember.client.bounds import DEFAULT_CALL_TIMEOUT, DEFAULT_GRACE, DEFAULT_MAX_OUTPUT
from ember.client.code_ring import CodeRing
from ember.client.core import Command, ExecOp, Operation
from ember.client.exec_blocking import ExecStream
from ember.client.file_ring import FileRing
from ember.client.files_blocking import Files
from ember.client.kept import KeptSockets
from ember.client.output_ring import OutputRing
from ember.client.results import CodeResult, ExecResult, parse_code_result
from ember.client.session import Session, streamed
from ember.client.shm import HostRegion
from ember.client.sockets import drive, send_request
from ember.client.terminal import Terminal
from ember.client.wire import Source

__all__ = ["AgentClient", "Connect", "ExecStream", "Files"]

Connect = Callable[[], socket.socket]
Conn = socket.socket  # a connection to the agent (the asyncio client's: its streams)
T = TypeVar("T")
_CLOCK = time.monotonic


class AgentClient:
    """Blocking client for the guest agent; thread-safe.

    Streams (exec, files) get a connection each. Short calls (ping, run_code, stat,
    list, remove) ask the agent to keep the connection and reuse it
    (:class:`~ember.client.session.KeepalivePool`); kept connections are closed
    after ``KEEPALIVE_IDLE_S`` unused, so an idle sandbox has none and can be parked.
    A restored sandbox may hold an agent connection carried over in its snapshot:
    ``resume`` returns it, and the first short call takes it over.

    ``grace`` is how long beyond a call's timeout the host still waits for the
    agent, and ``call_timeout`` the timeout of calls without one of their own (and
    of each frame of a file transfer); then :class:`SandboxTimeout`.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        resume: Callable[[], socket.socket | None] | None = None,
        grace: float = DEFAULT_GRACE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        announce_resume: bool = False,
        code_ring: CodeRing | None = None,
        shm: Callable[[], HostRegion | None] | None = None,
    ) -> None:
        self._connect = connect
        self._code_ring = code_ring
        self._session = Session(
            grace=grace, call_timeout=call_timeout, announce_resume=announce_resume, clock=_CLOCK
        )
        if code_ring is not None:  # a restored VM's worker need not poll for other requests
            self._session.not_yet = code_ring.not_yet
        self._shm = shm
        self._kept = KeptSockets(resume, _CLOCK)
        files_ring = None
        if shm is not None:
            session = self._session
            files_ring = FileRing(shm, connect, session.encode, session.bounds, self._kept)
        self.files = Files(self._session, self._run, files_ring, self._start)

    def _start(self, op: Operation[Any], trailer: bytes = b"") -> socket.socket:
        """A connection with ``op``'s REQUEST (and ``trailer``, frames that follow it) sent
        on it: a kept one if ``op`` may."""
        payload = self._session.request(op)
        kept = self._take_kept() if op.keepalive else None
        return send_request(kept, self._connect, payload, op.send_deadline, trailer=trailer)

    def _run(self, op: Operation[T], trailer: bytes = b"") -> T:
        sock = self._start(op, trailer)
        try:
            return drive(sock, op)
        finally:
            if op.reusable:
                self._keep(sock)
            else:
                sock.close()

    def _take_kept(self) -> socket.socket | None:
        return self._kept.take()

    def _keep(self, sock: socket.socket) -> None:
        self._kept.keep(sock)

    def adopt(self, conn: Conn) -> None:
        """Take over a warmed VM's agent connection (a spare, ember.sandbox.spares): kept
        for the next call, and no resume announcement (its warm-up made it)."""
        self._session.announced()
        self._keep(conn)

    def take_kept(self) -> Conn | None:
        """The newest kept connection, out of the pool: a spare's warm-up hands it on."""
        return self._kept.pop()

    def close(self) -> None:
        """Close the kept connections (the client stays usable)."""
        self._kept.close()

    def ping(self) -> dict[str, Any]:
        """``{"pong", "version", "uptime", "pid", "worker"}``; ``worker`` is
        ``"starting"``/``"ready"``/``"failed"``: snapshot a template once it is ready."""
        return self._run(self._session.ping())

    def warm_pool(self) -> list[int]:
        """Have the pre-started interpreters rehearse a program's start (a spare's warm-up:
        a restored copy's first exec then skips ~100 ms of first touches); pages each read."""
        return self._run(self._session.warm_pool())

    def pool_modules(self) -> list[str]:
        """The modules the pre-started interpreters imported before the snapshot: a program
        run by one finds them already in ``sys.modules`` (empty without a pool)."""
        return self._run(self._session.pool_modules())

    def pool_huge(self) -> list[int]:
        """Where the warm interpreters' heaps are in 2 MiB guest pages (guest-physical):
        a template build records the zero ones (:mod:`ember.snapshot.hugeback`)."""
        return self._run(self._session.pool_huge())

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecStream:
        """Start ``cmd`` (a list: argv, no shell; a string: ``sh -c``) and stream its output.

        With a ``timeout``, the stream must end within it plus ``grace``, however
        fast it is read; without one, the host waits as long as the command runs.
        ``files`` (guest path -> bytes, at most 512 KiB in all) are written as
        ``files.write`` writes them, in the same request, before the command starts.
        """
        op = self._session.exec(
            cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None, files=files
        )
        return self._exec(op, stdin)

    def _exec(self, op: ExecOp, stdin: Source | None) -> ExecStream:
        """Start ``op``, its output through a leased ring when there is a free slot."""
        output = OutputRing.lease(self._shm()) if self._shm is not None else None
        if output is not None:
            op.request.update(output.fields())
        op.keepalive = stdin is None  # nothing follows the REQUEST: the connection may stay
        try:
            sock = self._start(op)
        except BaseException:
            if output is not None:
                output.close()
            raise
        return ExecStream(sock, op, stdin, output, keep=self._keep)

    def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecResult:
        """Run ``cmd`` to completion and return its output and status.

        A non-zero exit or a signal is a normal result, not an exception.
        Overrunning ``timeout`` kills the command's whole process group and
        raises :class:`SandboxTimeout` whose ``result`` holds the output so far.
        A missing program raises :class:`~ember.errors.ExecError`.
        More than ``max_output`` bytes of stdout and stderr together stops the
        command and raises :class:`~ember.errors.OutputTooLarge`.
        """
        op = self._session.exec(
            cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None,
            collect=True, max_output=max_output, files=files,
        )  # fmt: skip
        with self._exec(op, stdin) as stream:
            for _ in stream:  # a collecting op keeps the output: no chunks come out
                pass
        return op.value

    def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Terminal:
        """Start ``argv`` (default: the guest's login shell) on a terminal of ``rows`` x
        ``cols``: a real one, with job control, ^C, colours and ``isatty()``. Write keys
        to it, read what it shows; closing it hangs up (SIGHUP)."""
        op = self._session.pty(argv, rows=rows, cols=cols, env=env, cwd=cwd, timeout=timeout)
        return Terminal(self._start(op), op)

    def run_code(
        self,
        code: str,
        timeout: float | None = None,
        *,
        linger: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        """Run Python in the sandbox's persistent interpreter (notebook semantics).

        Exceptions in ``code`` come back in ``result.error``, not raised; so do
        ``WorkerCrashed``, after which earlier state is gone, and ``WorkerTimeout``: a
        cell past its ``timeout`` gets ``KeyboardInterrupt`` and the state is kept; only
        one still running 3 s later is killed, with the worker's state.
        With a ``timeout``, the host waits that long plus the worker's start-up
        allowance plus ``grace`` (calls queue behind each other in the guest);
        without one, as long as the code runs.
        ``on_stdout``/``on_stderr`` stream the cell's output: each is called with text as
        the cell writes it (through vsock: the code ring carries whole replies only); the
        result still holds all of it.
        """
        on_output = streamed(on_stdout, on_stderr)
        if self._code_ring is not None and on_output is None:
            request = self._session.ring_request(code, linger)
            reply = self._code_ring.call(request, timeout, self._ring_op)
            if reply is not None:
                return parse_code_result(reply)
        return self._run(self._session.run_code(code, timeout, linger, on_output))

    def _ring_op(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._run(self._session.code_ring(request))

    def shutdown(self) -> None:
        """Ask the agent to exit (tests and orderly teardown)."""
        self._run(self._session.shutdown())
