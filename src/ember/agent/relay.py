"""An ``exec``'d command, once started: its output relayed to the client, its stdin pumped
in, its deadline and the client's hang-up watched, and the ``RESULT`` that says how it ended.

Split from :mod:`ember.agent.execute`, which checks the request and starts the command (a new
process or a pre-started interpreter: both are relayed alike). Why it is built this way,
given the guest's costs (syscall ~0.3 ms):

* One thread multiplexes both pipes, the process's exit (a pidfd) and the
  client's hang-up with ``poll()``: one syscall per wake-up, no busy polling
  unless a timeout is pending. Output is read in ≤64 KiB pieces and sent at
  once, so the agent holds at most one piece: when the host stops reading,
  ``sendall`` blocks, the pipes fill and the command itself blocks.
* The relay's ``poll`` wakes at the deadline; before a send that would block (a slow
  client) or a wait for room in a full output ring, the deadline is handed to the
  agent's one deadline thread (:mod:`ember.agent.deadlines`), since the relay may be
  blocked exactly when the deadline passes.
* After the command exits we keep relaying until its pipes close (background
  jobs still writing are part of its output), unless the group was killed:
  then whatever escaped the group gets :data:`KILL_GRACE` seconds.
* If the client disconnects, the group is killed: nobody will read the result.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from ember import ring
from ember.agent.common import ClientGone
from ember.agent.deadlines import DEADLINES
from ember.agent.filering import Slot
from ember.protocol import HEADER, Kind, ProtocolError, read_frame, write_frame, write_json

__all__ = ["KILL_GRACE"]

READ_SIZE = 64 << 10
RING_ROOM_WAIT_S = 0.002  # a full output ring: the host frees room as it reads
KILL_GRACE = 2.0
POLL_MS = 250


class _Run:
    """One running command: the kill switch shared by the relay, the deadline and the stdin
    pump, and its deadline.

    The relay keeps the deadline itself (its ``poll`` wakes at it) while it cannot block;
    only before a step that may (a send the host is slow to take, a full output ring) is
    the deadline handed to the agent's deadline thread (:meth:`arm`). Waking that thread for
    every timed exec cost ~44k emulated instructions here (~40 ms: futex calls and context
    switches while two threads of the agent passed the GIL back and forth).
    """

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float | None = None) -> None:
        self.proc = proc
        self.deadline_at = None if timeout is None else time.monotonic() + timeout
        self.killed_at: float | None = None
        self.timed_out = False
        self.done = False  # RESULT is on its way: a hang-up now is the normal end
        self.lock = threading.Lock()
        self._armed: int | None = None  # the deadline thread's key, once handed over

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

    def time_out(self) -> None:
        """The deadline passed (seen by the relay, or on :data:`DEADLINES`' thread)."""
        self.kill(timed_out=True)

    def check_deadline(self) -> None:
        deadline = self.deadline_at
        if deadline is not None and self.killed_at is None and time.monotonic() >= deadline:
            self.time_out()

    def poll_ms(self, slow: bool) -> int | None:
        """How long the relay's ``poll`` may sleep: until the deadline at most."""
        wait = POLL_MS if slow else None
        if self.deadline_at is not None and self.killed_at is None:
            left = max(0, int((self.deadline_at - time.monotonic()) * 1000) + 1)
            wait = left if wait is None else min(wait, left)
        return wait

    def arm(self) -> None:
        """The relay may block past the deadline: the deadline thread keeps it from now on."""
        with self.lock:
            if self.deadline_at is None or self._armed is not None or self.done:
                return
            self._armed = DEADLINES.add(self.deadline_at - time.monotonic(), self.time_out)

    def disarm(self) -> None:
        with self.lock:
            key, self._armed = self._armed, None
        if key is not None:
            DEADLINES.cancel(key)


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
        self._writer = ring.RingWriter(slot.ctl, slot.data, slot.bell, self._await_room)
        self.on_wait: Callable[[], None] | None = None  # before waiting for room

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

    def _await_room(self) -> None:
        if self.on_wait is not None:
            self.on_wait()
        time.sleep(RING_ROOM_WAIT_S)


def _send_output(conn: socket.socket, kind: Kind, chunk: bytes, run: _Run) -> None:
    """One output frame; with a deadline, a send that would block hands it over first."""
    if run.deadline_at is None:
        write_frame(conn, kind, chunk)
        return
    frame = HEADER.pack(len(chunk), kind) + chunk
    try:
        sent = conn.send(frame, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(frame):
        run.arm()
        conn.sendall(memoryview(frame)[sent:])


def _relay(
    conn: socket.socket,
    run: _Run,
    *,
    watch_client: bool,
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
            run.check_deadline()  # also once the command exited: its jobs may hold the pipes
            if run.killed_at is not None and time.monotonic() - run.killed_at > KILL_GRACE:
                break  # something outside the group holds our pipes: stop waiting for it
            timed = run.deadline_at is not None
            slow = timed or run.killed_at is not None or (pidfd is None and exited_at is None)
            check_exit = pidfd is None
            for fd, events in poller.poll(run.poll_ms(slow)):
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
                    _send_output(conn, kind, chunk, run)
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
    run = _Run(proc, timeout)
    if ring_out is not None:
        ring_out.on_wait = run.arm
    finished = False
    try:
        try:
            if want_stdin:
                assert proc.stdin is not None
                pump = threading.Thread(
                    target=_pump_stdin, args=(conn, proc.stdin, run), daemon=True
                )
                pump.start()
            exited_at = _relay(conn, run, watch_client=not want_stdin, ring_out=ring_out)
            with run.lock:
                run.done = True
            returncode = proc.wait()
            finished = True
        finally:
            run.disarm()
            if not finished:
                run.done = True
                run.kill()
                proc.wait()
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
    finally:
        # After the answer: both pipes are at their end by now, and freeing a pipe's
        # buffers costs the emulated kernel ~2,500 instructions (~2-3 ms here) each.
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
