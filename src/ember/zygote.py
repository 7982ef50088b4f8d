"""The zygote: a pre-imported Python that forks one VMM process per sandbox.

Starting ``python -m ember ...`` costs a few hundred milliseconds of
imports; forking a process that already imported the VMM costs about one
and shares its pages copy-on-write.  The GC is frozen before the first fork and stays
frozen in every child: a full collection walks every tracked object and writes its GC
header, which would copy the pages of its ~20,000 frozen objects into each long-lived VMM;
objects made after the fork are still collected.  One zygote serves one host process: it
is started on the first restore, talks over a socketpair, and exits when
that socket closes (its host process ended).

Whenever no request waits, the zygote forks the next request's child ahead, so that a
restore does not wait for the fork (:mod:`ember.zygote_fork`, which also holds what a child
does). Each child: a new session (a Ctrl-C for the host app is not the VMM's),
``PR_SET_PDEATHSIG`` so it dies with the zygote, the sandbox's cgroup
joined before any VMM code runs, stdout/stderr to the console log, then
the VMM process (:func:`ember.vmm.process.serve`) in-process, on the
:class:`~ember.vmm.config.ProcessConfig` the request carried: the typed
config crosses the socket as JSON (:func:`ember.vmm.config.to_json`), never
as argv.  The zygote reaps children and writes each
exit status to the file named in the request, which
:class:`ZygoteChild` reads: only a parent can learn a process's status.

What the zygote imports before its first fork is the VMM process module and its one
preload list (:data:`ember.vmm.process.LATE_IMPORTS`), nothing of the SDK or the CLI.

Requests and replies are JSON lines::

    {"config": {...}, "console": PATH, "cgroup_procs": [PATH...], "exit_file": PATH,
     "new_pid_ns": BOOL}
    {"pid": 1234}  or  {"error": "..."}
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError, SandboxError

if TYPE_CHECKING:
    from ember import zygote_fork
    from ember.vmm.config import ProcessConfig
# The server's imports (the jail's constants, the config's JSON) are made where they are
# used: ``ember run`` starts its zygote before anything else, and this module's own import
# is what that start waits for.

_libc = ctypes.CDLL(None, use_errno=True)  # loaded once: spawns are the zygote's hot path
EXIT_WAIT_S = 2.0  # how long after a child's death its status file may take to appear


# --- server side (runs in the zygote process) ------------------------------------------------


def _preload() -> None:
    """Import everything a VMM child runs (the process module and its preload list) and
    compile its seccomp filters, so no child pays for it (measured under strace, per child:
    the net device's import ~18 ms, ``find_library`` forking ``ldconfig -p`` plus three
    filter compilations ~25 ms)."""
    from ember.jailer import seccomp
    from ember.vmm import process

    process.preload()
    with contextlib.suppress(EmberError):  # no libseccomp: the child reports it, with the fix
        seccomp.precompile()


def _child(
    config: ProcessConfig, request: dict[str, Any], sock: socket.socket, wakeup: int
) -> None:
    """In the forked child: never returns."""
    from ember.zygote_fork import become_vmm, detach

    try:
        detach(sock)
    except BaseException:
        os._exit(70)
    become_vmm(config, request)


def _reap(exit_files: dict[int, str]) -> None:
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(raw)
        path = exit_files.pop(pid, None)
        if path is not None:
            with contextlib.suppress(OSError):
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    f.write(str(code))
                os.replace(tmp, path)


def _abandoned(exit_files: dict[int, str]) -> None:
    """The host process ended without closing these sandboxes (a script's last line, a
    crash): do what its ``close()`` would have, kill each VMM and remove its directory
    (console log, sockets). Left to the parent-death signal, the VMMs would die, but their
    directories would stay in the host's temporary directory for good."""
    for pid in exit_files:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid, path in exit_files.items():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        directory = Path(path).parent
        if directory.name.startswith("ember-"):  # a sandbox's own directory, nothing else
            shutil.rmtree(directory, ignore_errors=True)
    exit_files.clear()


PR_SET_CHILD_SUBREAPER = 36


def serve(sock: socket.socket) -> None:
    _preload()
    # Whatever a VMM leaves behind (it starts no processes, but a VMM is the guest's to
    # attack) is reparented here rather than to init, and reaped like our own children.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    signal.set_wakeup_fd(write_end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host app's Ctrl-C is its own business
    exit_files: dict[int, str] = {}
    gc.collect()  # garbage made by the imports is freed, not frozen into every child
    gc.freeze()
    buffer = b""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(read_end, select.POLLIN)
    from ember.zygote_fork import ForkAhead

    ahead = ForkAhead(sock)
    while True:
        wait = ahead.wait_s()
        events = poller.poll(None if wait is None else wait * 1000)
        if not events:
            ahead.idle(exit_files)
            continue
        for fd, _event in events:
            if fd == read_end:
                with contextlib.suppress(BlockingIOError):
                    os.read(read_end, 4096)
                _reap(exit_files)
                continue
            data = sock.recv(65536)
            if not data:
                ahead.close()
                _abandoned(exit_files)
                return  # the host process is gone
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply = _spawn(line, sock, read_end, exit_files, ahead)
                sock.sendall(json.dumps(reply).encode() + b"\n")


def _spawn(
    line: bytes,
    sock: socket.socket,
    wakeup: int,
    exit_files: dict[int, str],
    ahead: zygote_fork.ForkAhead,
) -> dict[str, Any]:
    """The reply to one request: a jailed request takes the child forked ahead, if any."""
    from ember.zygote_fork import back_to_own_pid_ns, enter_new_pid_ns_for_next_child, fits

    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("console"), str):
            return {"error": "a request needs a config and a console"}
        from ember.vmm.config import from_json

        config = from_json(request.get("config"))
    except (ValueError, EmberError) as exc:  # the ConfigError names the bad field
        return {"error": f"bad request: {exc}"}
    new_pid_ns = bool(request.get("new_pid_ns"))
    # It was forked into a new PID namespace, and has left the host's network namespace.
    child = ahead.take() if new_pid_ns and fits(config) else None
    if child is not None and child.hand(config, request):
        return _started(child.pid, request, exit_files, config, ahead)
    if new_pid_ns:  # none waits, or it died waiting: fork as below
        try:
            enter_new_pid_ns_for_next_child()
        except OSError as exc:
            return {"error": f"cannot make a PID namespace: {exc}"}
    try:
        pid = os.fork()
    except OSError as exc:
        pid = -1
        error = str(exc)
    if pid == 0:
        _child(config, request, sock, wakeup)  # never returns
    if new_pid_ns:
        back_to_own_pid_ns()  # in the parent only: a child cannot leave its namespace
    if pid < 0:
        return {"error": f"fork failed: {error}"}
    return _started(pid, request, exit_files, config, ahead)


def _started(
    pid: int,
    request: dict[str, Any],
    exit_files: dict[int, str],
    config: ProcessConfig,
    ahead: zygote_fork.ForkAhead,
) -> dict[str, Any]:
    if isinstance(request.get("exit_file"), str):
        exit_files[pid] = request["exit_file"]
    from ember.vmm.config import RestoreConfig

    machine, template = config.machine, None
    if isinstance(machine, RestoreConfig) and request.get("template") is True:
        template = machine.snapshot  # restored again next (Zygote.spawn's ``template``)
    ahead.spawned(pid, template)
    return {"pid": pid}


# --- client side (runs in the host process) --------------------------------------------------


class ZygoteChild:
    """A VMM forked by the zygote, with the part of ``subprocess.Popen``'s interface we use.

    A pidfd names the process even after it is reaped (no PID-reuse race);
    the exit status comes from the file the zygote writes.
    """

    def __init__(self, pid: int, exit_file: Path) -> None:
        self.pid = pid
        self.exit_file = exit_file
        self.returncode: int | None = None
        self._lock = threading.Lock()  # a crash seen by two threads: one of them closes
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone

    def _dead(self, timeout: float | None) -> bool:
        pidfd = self._pidfd
        if pidfd is None or self.returncode is not None:
            return True
        poller = select.poll()  # not select(): a busy host process has fds above 1024
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))

    def poll(self) -> int | None:
        if self.returncode is None and self._dead(0):
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._dead(timeout):
                raise subprocess.TimeoutExpired(f"vmm {self.pid}", timeout or 0)
            self._collect()
        assert self.returncode is not None
        return self.returncode

    def _collect(self) -> None:
        deadline = time.monotonic() + EXIT_WAIT_S
        while True:
            try:
                self.returncode = int(self.exit_file.read_text())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.returncode = -int(signal.SIGKILL)  # reaped by someone else: unknown
                    break
                time.sleep(0.002)
        self.close()

    def kill(self) -> None:
        with self._lock:  # close() may be closing the pidfd: never signal a reused fd
            if self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)


class Zygote:
    """The host process's zygote (one, started on first use, restarted if it died)."""

    _instance: Zygote | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._lock = threading.Lock()
        self._buffer = b""
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from ember.zygote import main; main()"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()

    @classmethod
    def get(cls) -> Zygote:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._proc.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def spawn(
        self,
        config: ProcessConfig,
        *,
        console: Path,
        exit_file: Path,
        cgroup_procs: list[str],
        new_pid_ns: bool = False,
        template: bool = False,
    ) -> ZygoteChild:
        """Fork a VMM process running ``config`` (its console and exit status in these files;
        ``new_pid_ns``: as PID 1 of a PID namespace of its own, for a jailed VMM;
        ``template``: it restores a template, which the next request most likely restores
        too: the child forked ahead makes that restore's memory, :mod:`ember.snapshot.premade`;
        not a fork's or a paused sandbox's snapshot, restored once and deleted)."""
        from ember.vmm.config import to_json

        request = {
            "config": to_json(config),
            "console": str(console),
            "exit_file": str(exit_file),
            "cgroup_procs": cgroup_procs,
            "new_pid_ns": new_pid_ns,
            "template": template,
        }
        with self._lock:
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
                while b"\n" not in self._buffer:
                    data = self._sock.recv(4096)
                    if not data:
                        raise SandboxError("the Ember zygote process died")
                    self._buffer += data
            except OSError as exc:
                raise SandboxError(f"cannot reach the Ember zygote process: {exc}") from None
            line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "pid" not in reply:
            raise SandboxError(f"the zygote could not start a VMM: {reply.get('error')}")
        return ZygoteChild(int(reply["pid"]), exit_file)


def main() -> None:
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, harmless
    serve(sock)


if __name__ == "__main__":
    main()
