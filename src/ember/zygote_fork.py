"""The zygote's children: how one is forked, detached and made a VMM, and one forked ahead.

A child forked for a request (:func:`ember.zygote._child`) and one forked before it
(:func:`fork_ahead`) take the same steps: :func:`detach`, then :func:`become_vmm`.

**Forked ahead.**
Forking the zygote (~25 MiB resident, ~200 mappings) and the child's first steps (a
session of its own, the zygote's descriptors closed, the parent-death signal) took ~3-4 ms
of the ~30 a ``Sandbox()`` restored on demand costs here. None of it depends on the
request, and the zygote is idle while the VMM it forked restores. So whenever no request
waits, it forks one child ahead: into a new PID namespace (a jailed VMM's, which every SDK
sandbox is), detached, and blocked reading a pipe. The next request that wants a new PID
namespace is written into that pipe, pickled (the zygote to its own child, both the same
code), and the child goes on exactly as one forked for it would. A request that finds
none (an unjailed VMM, requests queued at once) is forked for as before. The fork ahead
runs beside the restore it follows, on the host's other core, before that VMM's guest runs.

While it waits, it also takes the copy-on-write faults a VMM child takes in its first
milliseconds (:mod:`ember.zygote_pages`), another ~5-8 ms off the restore.

The child waiting costs its ~1.3 MiB of private memory (and those pages, which the VMM
would have copied anyway) and nothing else; it dies with the
zygote (parent-death signal), and reads end of file, then exits, when the zygote closes
its pipe without a request.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from ember.zygote_pages import Learner

if TYPE_CHECKING:
    from ember.vmm.config import ProcessConfig

AHEAD_NAME = "ember-ahead"  # its name (comm) while it waits; ember-vmm once it is one
RETRY_S = 1.0  # after a failed fork ahead (no memory, no PIDs): requests fork for themselves
MAX_INHERITED_FD = 65536
RECHECK_S = 2.0  # how often a waiting child checks that the template it made ahead is current
_libc = ctypes.CDLL(None, use_errno=True)  # loaded once: spawns are the zygote's hot path


class Ahead:
    """A child forked ahead, and the write end of the pipe its request goes into."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd

    def hand(self, config: ProcessConfig, request: dict[str, Any]) -> bool:
        """Give the child its request; False if it is gone (then fork another way)."""
        data = pickle.dumps((config, request))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            return True
        except OSError:  # EPIPE: it died waiting (and was reaped as a stranger)
            return False
        finally:
            self.close()

    def close(self) -> None:
        """Let it go without a request: it reads end of file and exits."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def kill(self) -> None:
        self.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class ForkAhead:
    """The forking process's end (the zygote's, the keeper's): the child forked ahead, when
    to fork the next, and what it prepares while it waits: the pages a VMM child writes
    (:class:`ember.zygote_pages.Learner`) and the restore of the last template restored.

    The forking process's loop asks :meth:`wait_s` how long it may sleep and calls
    :meth:`idle` when it woke to nothing; a request takes the child with :meth:`take`."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.child: Ahead | None = None
        self.pages = Learner()
        # The template the last request restored: the next most likely restores it too, and
        # the child forked ahead makes its restore's memory (ember.snapshot.premade).
        self.snapshot: Path | None = None
        self._sock = sock
        self._retry_at = 0.0

    @overload
    def wait_s(self, longest: float) -> float: ...
    @overload
    def wait_s(self, longest: None = None) -> float | None: ...
    def wait_s(self, longest: float | None = None) -> float | None:
        """How long the forking process may sleep (None: until something arrives): until a
        fork ahead or a sample is due, at most ``longest``."""
        wait = longest
        if self.child is None:
            retry = max(0.0, self._retry_at - time.monotonic())
            wait = retry if wait is None else min(wait, retry)
        if (due := self.pages.due_in()) is not None:
            wait = due if wait is None else min(wait, due)
        return wait

    def idle(self, children: Iterable[int]) -> None:
        """Nothing arrived while it slept: sample a child (``children``: forked and not yet
        reaped) if one is due, and fork one ahead if none waits."""
        self.pages.sample_if_due(children)
        if self.child is None and time.monotonic() >= self._retry_at:
            self.child = fork_ahead(self._sock, self.pages.runs, self.snapshot)
            if self.child is None:  # no fork now: requests fork for themselves; retry later
                self._retry_at = time.monotonic() + RETRY_S

    def take(self) -> Ahead | None:
        """The child forked ahead, for a request (the next is forked when idle again)."""
        child, self.child = self.child, None
        return child

    def spawned(self, pid: int, template: Path | None) -> None:
        """A VMM child was started for a request, restoring ``template`` if it restores one."""
        if template is not None:
            self.snapshot = template
        self.pages.spawned(pid)

    def close(self) -> None:
        """The forking process leaves: its child forked ahead goes too."""
        if self.child is not None:
            self.child.kill()
            self.child = None


def fork_ahead(
    sock: socket.socket | None,
    hot: Sequence[tuple[int, int]] = (),
    snapshot: Path | None = None,
) -> Ahead | None:
    """Fork a child that waits for its request (None if the fork failed: requests then
    fork as before). ``sock``: the host's connection, if the forking process has one
    (the keeper has a listener and several; the child closes every descriptor anyway).
    ``hot``: the pages a VMM child writes (:mod:`ember.zygote_pages`), written while it
    waits; ``snapshot``: the last request's, whose restore it makes as far as it can without
    the request (:mod:`ember.snapshot.premade`)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        enter_new_pid_ns_for_next_child()
        try:
            pid = os.fork()
        except OSError:
            back_to_own_pid_ns()
            raise
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:
        os.close(write_end)
        _wait_for_request(read_end, sock, hot, snapshot)  # never returns
    back_to_own_pid_ns()
    os.close(read_end)
    return Ahead(pid, write_end)


def _wait_for_request(
    fd: int, sock: socket.socket | None, hot: Sequence[tuple[int, int]], snapshot: Path | None
) -> None:
    """In the child forked ahead: never returns."""
    try:
        detach(sock, keep=fd)
        from ember.vmm.threads import name_this_thread

        name_this_thread(AHEAD_NAME)  # what a census of processes leaves out (bench/soak.py)
        from ember.jailer.jail import leave_namespaces_ahead

        with contextlib.suppress(OSError):  # the jail will then do it, or say why it cannot
            leave_namespaces_ahead()
        if hot:
            from ember.zygote_pages import populate

            populate(hot)
        if snapshot is not None:
            from ember.vmm.vm_shell import prepare_ahead

            prepare_ahead(snapshot)
            _wait_readable(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        if not chunks:
            os._exit(0)  # let go without a request
        config, request = pickle.loads(b"".join(chunks))
    except BaseException:
        os._exit(70)
    become_vmm(config, request)


def _wait_readable(fd: int) -> None:
    """Until the request (or end of file) comes, check what was made ahead every
    :data:`RECHECK_S`: a template removed meanwhile is let go at once."""
    import select

    from ember.snapshot import premade

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll(RECHECK_S * 1000):
        if not premade.recheck():
            return  # nothing (left) to keep current: block in read


def fits(config: ProcessConfig) -> bool:
    """Whether a child forked ahead can be this request's VMM: it has left the host's
    network namespace (:func:`ember.jailer.jail.leave_namespaces_ahead`), so a TAP in the
    host's own namespace (a ``--tap`` without ``--netns``) must be opened by a child forked
    for it. Every SDK sandbox's TAP is in a namespace of its own."""
    from ember.vmm.config import RestoreConfig

    machine = config.machine
    if isinstance(machine, RestoreConfig):
        return machine.tap is None or machine.netns is not None
    net = machine.net
    return net is None or net.netns is not None


_own_pid_ns: int | None = None


def enter_new_pid_ns_for_next_child() -> None:
    """The next fork becomes PID 1 of a new PID namespace (a jailed VMM needs no relay).

    ``unshare(CLONE_NEWPID)`` only changes where *children* go, and works
    once; ``setns`` back to our own namespace re-arms it for the next child.
    """
    global _own_pid_ns
    if _own_pid_ns is None:
        _own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    from ember.jailer.jail import CLONE_NEWPID

    if _libc.unshare(CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")


def back_to_own_pid_ns() -> None:
    from ember.jailer.jail import CLONE_NEWPID

    if _own_pid_ns is not None and _libc.setns(_own_pid_ns, CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "setns back to our PID namespace")


def detach(sock: socket.socket | None, keep: int | None = None) -> None:
    """A child's first steps, before it knows its request: nothing of the zygote's but
    ``keep`` stays open, a session of its own, and death with the zygote."""
    if sock is not None:
        sock.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    if keep is None:
        os.closerange(3, MAX_INHERITED_FD)  # nothing of the zygote's reaches a VMM
    else:
        os.closerange(3, keep)
        os.closerange(keep + 1, MAX_INHERITED_FD)
    os.setsid()
    from ember.jailer.jail import PR_SET_PDEATHSIG

    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the zygote died between fork and prctl
        os._exit(70)


def become_vmm(config: ProcessConfig, request: dict[str, Any]) -> None:
    """A detached child becomes the request's VMM: never returns."""
    status = 70
    try:
        for procs in request.get("cgroup_procs", []):
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        log = os.open(request["console"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        # The zygote's heap stays frozen (see the module docstring): no gc.unfreeze() here.
        from ember.vmm.process import serve

        status = serve(config)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # whatever happens, the child must exit here
        with contextlib.suppress(Exception):
            os.write(2, f"ember: zygote child failed: {exc!r}\n".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
