"""Host-side client of the guest agent (blocking; :mod:`ember.client_async` is its twin).

The client is given a function that returns a *connected* stream socket to
the agent, and calls it once per operation: each connection carries exactly
one request, so operations never wait on one another and a failure never
leaves a shared connection in an unknown state. How the socket reaches the
guest (Firecracker-style ``CONNECT 1024`` over the VMM's Unix socket, or a
plain Unix socket in tests) is the caller's business::

    client = AgentClient(lambda: vsock_connect(uds_path, AGENT_PORT))
    r = client.exec(["python3", "-c", "print(6*7)"], timeout=10)
    client.files.write("/data/in.csv", open("in.csv", "rb"))
    for chunk in (stream := client.exec_stream("make")):
        print(chunk.stream, chunk.data)
    print(stream.result)

Data moves in bounded pieces both ways, so files and outputs of any size pass
through constant memory (except ``exec``/``files.read``, which return bytes and
so stop at ``max_output``: use ``exec_stream``/``files.read_into`` for big ones).

The guest is untrusted, so the host never waits on it without a bound of its
own: each call's deadline is its timeout (:data:`DEFAULT_CALL_TIMEOUT` for calls
without one, per frame for file transfers) plus ``grace``, after which it hangs
up and raises :class:`SandboxTimeout`. ``exec``/``run_code`` without a timeout
are the exception: the command may rightly run, silent, for as long as it likes.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, BinaryIO

from ember.client_errors import AgentError, ProtocolError, SandboxTimeout
from ember.client_wire import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_OUTPUT,
    WORKER_START_ALLOWANCE,
    CallBounds,
    CodeResult,
    Command,
    Deadline,
    DirEntry,
    ExecResult,
    FileStat,
    OutputChunk,
    PathArg,
    ResumeAnnouncer,
    Source,
    check_max_output,
    check_result,
    code_request,
    data_chunks,
    exec_request,
    file_too_large,
    host_timeout_result,
    output_too_large,
    parse_code_result,
    parse_exec_result,
    parse_list,
    parse_size,
    parse_stat,
    path_request,
    read_frame,
    remote_error,
    send_frame,
    unexpected,
    write_request,
)
from ember.protocol import KEEPALIVE_OPS, Kind, encode_json, write_frame

__all__ = ["AgentClient", "ExecStream", "Files"]

Connect = Callable[[], socket.socket]


class ExecStream:
    """Output of one command as it arrives; ``result`` is set once it is exhausted.

    Iteration yields :class:`OutputChunk` objects, then ends; if the command
    overran its timeout it raises :class:`SandboxTimeout` instead of ending
    (``result`` is set either way). So it does if the agent has not ended the
    stream by ``deadline`` (the timeout plus a grace): then ``result`` has
    ``timed_out`` set and no exit status. Closing it early (or leaving a
    ``with`` block) hangs up, and the agent kills the command's process group.
    """

    def __init__(
        self, sock: socket.socket, stdin: Source | None, deadline: Deadline | None = None
    ) -> None:
        self._sock = sock
        self._deadline = deadline
        self._started = time.monotonic()
        self._done = False
        self._pump_error: BaseException | None = None
        self._pump: threading.Thread | None = None
        self.result: ExecResult | None = None
        if stdin is not None:
            # stdin goes in on its own thread: the process may need its output
            # read before it will read more input, and that is this thread's job.
            self._pump = threading.Thread(target=self._send_stdin, args=(stdin,), daemon=True)
            self._pump.start()

    def _send_stdin(self, source: Source) -> None:
        try:
            for piece in data_chunks(source):
                write_frame(self._sock, Kind.STDIN, piece)
            write_frame(self._sock, Kind.STDIN_EOF)
        except OSError:
            pass  # the process stopped reading, or the call ended: the RESULT says which
        except BaseException as exc:  # reading the caller's stdin failed: abort the call
            self._pump_error = exc
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> ExecStream:
        return self

    def __next__(self) -> OutputChunk:
        if self._done:
            raise StopIteration
        try:
            try:
                frame = read_frame(self._sock, self._deadline)
            except SandboxTimeout as exc:  # the host's deadline: the agent never said
                self.result = host_timeout_result(self._started)
                raise SandboxTimeout(str(exc), self.result) from None
            if frame is not None and frame[0] is Kind.STDOUT:
                return OutputChunk("stdout", frame[1])
            if frame is not None and frame[0] is Kind.STDERR:
                return OutputChunk("stderr", frame[1])
            if frame is not None and frame[0] is Kind.ERROR:
                raise remote_error(frame[1])
            if frame is None and self._pump_error is not None:
                raise self._pump_error
            self.result = parse_exec_result(check_result(frame, "exec"))
        except BaseException:
            self.close()
            raise
        self.close()
        if self.result.timed_out:
            raise SandboxTimeout(
                f"the command overran its timeout after {self.result.duration:.3g} s "
                "and its process group was killed",
                self.result,
            )
        raise StopIteration

    def close(self) -> None:
        """Hang up (killing the command if it still runs); safe to call twice."""
        if self._done:
            return
        self._done = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # also unblocks the stdin thread
        except OSError:
            pass
        if self._pump is not None:
            self._pump.join()
        self._sock.close()

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Files:
    """File transfer and inspection inside the sandbox (paths are absolute)."""

    def __init__(self, client: AgentClient) -> None:
        self._client = client

    def write(
        self, path: PathArg, data: Source, *, mode: int | None = None, append: bool = False
    ) -> int:
        """Write ``data`` (bytes or a binary file) to ``path``; return the size written.

        Replacement is atomic (temp file + rename) and keeps the old file's mode
        unless ``mode`` is given; parent directories are created.
        """
        with self._client._open(write_request(path, mode, append)) as sock:
            sent_error: OSError | None = None
            sent = 0
            try:
                for piece in data_chunks(data):
                    send_frame(sock, Kind.DATA, piece, self._client._bounds.frame(path))
                    sent += memoryview(piece).nbytes
                send_frame(sock, Kind.DATA_EOF, b"", self._client._bounds.frame(path))
            except SandboxTimeout:
                raise
            except OSError as exc:
                sent_error = exc  # the agent may still have said why: read its answer
            frame = read_frame(sock, self._client._bounds.call("file_write", None))
            if frame is None and sent_error is not None:
                raise ProtocolError(f"upload to {path} failed: {sent_error}") from sent_error
            size = parse_size(check_result(frame, "file_write"))
        if sent_error is None and size != sent:
            raise ProtocolError(f"file_write took {sent} bytes but said it wrote {size}")
        return size

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        """Stream the file at ``path`` into ``fileobj``; return its size."""
        return self._receive(path, fileobj, None)

    def _receive(self, path: PathArg, fileobj: BinaryIO, limit: int | None) -> int:
        """file_read into ``fileobj``, hanging up beyond ``limit`` bytes (OutputTooLarge)."""
        with self._client._open(path_request("file_read", path)) as sock:
            total = 0
            while True:
                frame = read_frame(sock, self._client._bounds.frame(path))
                if frame is not None and frame[0] is Kind.DATA:
                    if limit is not None and total + len(frame[1]) > limit:
                        raise file_too_large(path, limit)
                    fileobj.write(frame[1])
                    total += len(frame[1])
                elif frame is not None and frame[0] is Kind.DATA_EOF:
                    answer = read_frame(sock, self._client._bounds.call("file_read", None))
                    size = parse_size(check_result(answer, "file_read"))
                    if size != total:
                        raise ProtocolError(f"file_read sent {total} bytes but said {size}")
                    return total
                elif frame is not None and frame[0] is Kind.ERROR:
                    raise remote_error(frame[1])
                else:
                    raise unexpected(frame, "file_read")

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The whole file at ``path``; more than ``max_output`` bytes raises
        :class:`~ember.client_errors.OutputTooLarge` (use :meth:`read_into` for big files)."""
        limit = check_max_output(max_output)
        buf = io.BytesIO()
        self._receive(path, buf, limit)
        return buf.getvalue()

    def stat(self, path: PathArg) -> FileStat:
        return parse_stat(self._client._call(path_request("stat", path)))

    def list(self, path: PathArg) -> list[DirEntry]:
        """Entries of a directory, sorted by name."""
        return parse_list(self._client._call(path_request("list", path)))

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        """Remove a file, an empty directory, or with ``recursive`` a whole tree."""
        self._client._call(path_request("remove", path, recursive=recursive))


KEEPALIVE_IDLE_S = 0.5  # a kept connection unused this long is closed (so the VM can park)
KEEPALIVE_MAX = 4


def _still_open(sock: socket.socket) -> bool:
    """A kept connection is usable if nothing (EOF, a reset, stray bytes) is waiting on it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return not poller.poll(0)


class AgentClient:
    """Blocking client for the guest agent; thread-safe.

    Streams (exec, files) get a connection each.  Short calls (ping,
    run_code, stat, list, remove) ask the agent to keep the connection and
    reuse it: on this host every vsock connection costs the guest kernel
    about four packets each way (~6 ms of emulated kernel per packet), a
    kept one two.  Kept connections are closed after ``KEEPALIVE_IDLE_S``
    unused, so an idle sandbox still has none and can be parked.

    ``grace`` is how long beyond a call's timeout the host still waits for
    the agent, and ``call_timeout`` the timeout of calls without one of their
    own (and of each frame of a file transfer); then :class:`SandboxTimeout`.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        resume: Callable[[], socket.socket | None] | None = None,
        grace: float = DEFAULT_GRACE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        announce_resume: bool = False,
    ) -> None:
        self._connect = connect
        self._bounds = CallBounds(grace, call_timeout)
        # A restored sandbox may hold an agent connection carried over in its snapshot:
        # the first short call takes it over instead of opening one (see vsock RESUME).
        self._resume = resume
        # A new VMM (restored, forked): its first request carries the host's clock and
        # entropy, applied by the agent before anything else runs (client_wire.resume_announcement).
        self._announcer = ResumeAnnouncer(announce_resume)
        self.files = Files(self)
        self._kept: list[tuple[socket.socket, float]] = []
        self._kept_lock = threading.Lock()
        self._expiry: threading.Timer | None = None

    def _open(self, request: dict[str, Any]) -> socket.socket:
        sock = self._connect()
        try:
            payload = encode_json(self._announcer.stamp(request))
            send_frame(sock, Kind.REQUEST, payload, self._bounds.send())
        except BaseException:
            sock.close()
            raise
        return sock

    def _call(self, request: dict[str, Any], *, unbounded: bool = False) -> dict[str, Any]:
        """One short exchange, REQUEST in and RESULT out, under ``call_timeout`` + ``grace``
        (``unbounded``: the answer may take as long as it likes; the request may not)."""
        op = str(request["op"])
        return self._exchange(request, None if unbounded else self._bounds.call(op, None))

    def _exchange(self, request: dict[str, Any], deadline: Deadline | None) -> dict[str, Any]:
        op = str(request["op"])
        if op not in KEEPALIVE_OPS:
            with self._open(request) as single:
                return check_result(read_frame(single, deadline), op)
        sock = self._take_kept()
        payload = encode_json({**self._announcer.stamp(request), "keepalive": True})
        sending = deadline or self._bounds.send()
        if sock is not None:
            try:
                send_frame(sock, Kind.REQUEST, payload, sending)
            except SandboxTimeout:
                sock.close()
                raise
            except OSError:  # closed under us before the request left: nothing ran
                sock.close()
                sock = None
        if sock is None:
            sock = self._connect()
            try:
                send_frame(sock, Kind.REQUEST, payload, sending)
            except BaseException:
                sock.close()
                raise
        assert sock is not None
        try:
            result = check_result(read_frame(sock, deadline), op)
        except AgentError:
            self._keep(sock)  # an error reply ends the exchange cleanly
            raise
        except BaseException:
            sock.close()
            raise
        self._keep(sock)
        return result

    def _take_kept(self) -> socket.socket | None:
        with self._kept_lock:
            while self._kept:
                sock, _ = self._kept.pop()
                if _still_open(sock):
                    return sock
                sock.close()
            resume, self._resume = self._resume, None
        return resume() if resume is not None else None

    def _keep(self, sock: socket.socket) -> None:
        with self._kept_lock:
            if len(self._kept) >= KEEPALIVE_MAX:
                sock.close()
                return
            self._kept.append((sock, time.monotonic()))
            if self._expiry is None:
                self._expiry = threading.Timer(KEEPALIVE_IDLE_S, self._expire)
                self._expiry.daemon = True
                self._expiry.start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._kept_lock:
            self._expiry = None
            fresh = []
            for sock, since in self._kept:
                if now - since >= KEEPALIVE_IDLE_S:
                    sock.close()
                else:
                    fresh.append((sock, since))
            self._kept = fresh
            if fresh:
                self._expiry = threading.Timer(KEEPALIVE_IDLE_S, self._expire)
                self._expiry.daemon = True
                self._expiry.start()

    def close(self) -> None:
        """Close the kept connections (the client stays usable)."""
        with self._kept_lock:
            for sock, _ in self._kept:
                sock.close()
            self._kept = []
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None

    def ping(self) -> dict[str, Any]:
        """``{"pong", "version", "uptime", "pid", "worker"}``; ``worker`` is
        ``"starting"``/``"ready"``/``"failed"``: snapshot a template once it is ready."""
        return self._call({"op": "ping"})

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
    ) -> ExecStream:
        """Start ``cmd`` (a list: argv, no shell; a string: ``sh -c``) and stream its output.

        With a ``timeout``, the stream must end within it plus ``grace``, however
        fast it is read; without one, the host waits as long as the command runs.
        """
        request = exec_request(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin is not None)
        deadline = None if timeout is None else self._bounds.call("exec", timeout)
        return ExecStream(self._open(request), stdin, deadline)

    def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``cmd`` to completion and return its output and status.

        A non-zero exit or a signal is a normal result, not an exception.
        Overrunning ``timeout`` kills the command's whole process group and
        raises :class:`SandboxTimeout` whose ``result`` holds the output so far.
        A missing program raises :class:`~ember.client_errors.ExecError`.
        More than ``max_output`` bytes of stdout and stderr together stops the
        command and raises :class:`~ember.client_errors.OutputTooLarge`.
        """
        limit = check_max_output(max_output)
        out, err = bytearray(), bytearray()
        stream = self.exec_stream(cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin)
        try:
            with stream:
                for chunk in stream:
                    if limit is not None and len(out) + len(err) + len(chunk.data) > limit:
                        raise output_too_large(limit)
                    (out if chunk.stream == "stdout" else err).extend(chunk.data)
        except SandboxTimeout as exc:
            assert exc.result is not None
            partial = replace(exc.result, stdout=bytes(out), stderr=bytes(err))
            raise SandboxTimeout(str(exc), partial) from None
        assert stream.result is not None
        return replace(stream.result, stdout=bytes(out), stderr=bytes(err))

    def run_code(self, code: str, timeout: float | None = None) -> CodeResult:
        """Run Python in the sandbox's persistent interpreter (notebook semantics).

        Exceptions in ``code`` come back in ``result.error``, not raised; so do
        ``WorkerCrashed`` and ``WorkerTimeout``, after which earlier state is gone.
        With a ``timeout``, the host waits that long plus the worker's start-up
        allowance plus ``grace`` (calls queue behind each other in the guest);
        without one, as long as the code runs.
        """
        request = code_request(code, timeout)
        if timeout is None:
            return parse_code_result(self._call(request, unbounded=True))
        deadline = self._bounds.call("run_code", timeout, WORKER_START_ALLOWANCE)
        return parse_code_result(self._exchange(request, deadline))

    def shutdown(self) -> None:
        """Ask the agent to exit (tests and orderly teardown)."""
        self._call({"op": "shutdown"})
