"""A running sandbox VM, however it came to run: what the SDK does with it once it runs.

:class:`VmmHandle` reaches the guest agent, asks the VMM's control socket (balloon,
snapshot, memory channel region), opens guest ports to the host, reports a crash, and
tears the VM down. Starting one is :mod:`ember.launcher`'s job (its
:class:`~ember.launcher.VmmProcess` is a handle); :mod:`ember.serve.adopt` fills one in
for a VMM that a previous daemon left running.

The host side of vsock is a Unix socket in the sandbox's private directory:

- ``v.sock``       clients send ``CONNECT 1024`` and then talk to the agent;
- ``v.sock_1025``  the agent connects here once, to say it is ready;
- ``v.sock_1026``  guest code opens data channels here.

The VMM's console (and its one-line stop reason) goes to ``console.log``: a
crash report carries its tail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import protocol
from ember.errors import ConfigError, EmberError, SandboxCrashed, SandboxError
from ember.zygote import ZygoteChild

if TYPE_CHECKING:
    from ember.client import HostRegion
    from ember.jailer.cgroups import SandboxCgroup
    from ember.network.host import SandboxNetwork

__all__ = ["CRASH_GRACE", "HANDSHAKE_TIMEOUT", "HOST_PORTS", "VmmHandle", "unix_listener"]

PAGES_PER_MIB = 256
HANDSHAKE_TIMEOUT = 30.0
CRASH_GRACE = 5.0  # seconds to let a dying VMM exit before calling a failure a crash
# Host vsock ports Ember itself listens on (guest -> host): Sandbox.listen refuses them.
HOST_PORTS = frozenset({protocol.READY_PORT, protocol.CHANNEL_PORT})


def unix_listener(path: str, backlog: int = 64) -> socket.socket:
    """A stream socket bound to ``path`` and listening (closed again if that fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class VmmHandle:
    """One running sandbox VM: the process, its socket directory and its console log.

    It has no constructor of its own: whoever makes one sets every attribute below
    (:class:`~ember.launcher.VmmProcess` by starting a VM, ``ember.serve.adopt`` from a
    record), and :meth:`close` releases what they hold.
    """

    debug_hooks: bool  # tests of the jail only: see ember.vmm.control
    restored: bool
    dir: Path
    uds: str
    console_path: Path
    control_path: Path
    proc: subprocess.Popen[bytes] | ZygoteChild | None
    channel_listener: socket.socket | None
    _listeners: dict[int, socket.socket]  # listen(): the caller's, by port
    cgroup: SandboxCgroup | None
    network: SandboxNetwork | None

    # Every set the VMM holds for this sandbox's execs was asked for (a class default: no
    # constructor sets it).
    exec_prefaulted = False

    def prefault_exec(self) -> None:
        """Before each of this sandbox's first execs: have the VMM copy the pages that exec's
        program will write (:data:`ember.snapshot.prefault.EXEC_FILES`: ~10 ms of copying on
        the host instead of ~1,200 copy-on-write and shadow faults in the guest's exec), as
        long as the VMM has sets left. Best effort: a VMM that cannot (gone, or too old for
        the op) leaves them to be faulted, and the exec that follows says what is wrong."""
        if self.exec_prefaulted:
            return
        try:
            reply = self.control("prefault-exec")
        except EmberError:
            self.exec_prefaulted = True
            return
        self.exec_prefaulted = not reply.get("left")

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        """One request to the VMM's control socket (see ember.vmm.control)."""
        from ember.vmm import control

        if self.exited():
            raise self.crashed("the sandbox is not running")
        return control.request(self.control_path, op, **args)

    def set_memory(self, target_mib: int, *, timeout: float) -> int:
        """Move the balloon so the guest keeps ``target_mib``; the MiB it holds once settled."""
        state = self.control("balloon")
        total_mib = state["mem_pages"] // PAGES_PER_MIB
        if not 0 < target_mib <= total_mib:
            raise ValueError(f"target {target_mib} MiB: choose 1..{total_mib} (the guest's RAM)")
        want = (total_mib - target_mib) * PAGES_PER_MIB
        state = self.control("balloon", target_pages=want)
        deadline = time.monotonic() + timeout
        while state["actual_pages"] != want and time.monotonic() < deadline:
            time.sleep(0.1)
            state = self.control("balloon")
        return int(total_mib - state["actual_pages"] // PAGES_PER_MIB)

    def memory_stats(self, *, timeout: float) -> dict[str, int]:
        """Fresh guest memory statistics through the balloon's stats queue."""
        before = self.control("balloon", refresh_stats=True)
        state = before
        deadline = time.monotonic() + timeout
        while state["stats_updates"] == before["stats_updates"]:
            if time.monotonic() > deadline:
                raise SandboxError("the guest did not report memory statistics in time")
            time.sleep(0.05)
            state = self.control("balloon")
        stats = {str(k): int(v) for k, v in state["guest_stats"].items()}
        stats["balloon_mib"] = state["actual_pages"] // PAGES_PER_MIB
        stats["reported_mib"] = state["reported_bytes"] >> 20
        return stats

    def expose(self, port: int) -> tuple[str, int]:
        if self.network is None:
            raise ConfigError("this sandbox has no network: create it with network=")
        return self.network.expose(port)

    def listen(self, port: int, *, backlog: int = 16) -> socket.socket:
        """A listening socket for guest connections to host vsock ``port`` (CID 2).

        The VMM forwards a guest's connection to ``<uds>_PORT``; a jailed VMM runs as a uid of
        its own, so the socket file is given to that uid (the owner of the sandbox directory
        once the jail took it) with mode 0600: the VMM can connect, no other user can. The
        caller owns the returned socket (``accept`` on it; close it when done).
        """
        if not 1 <= port < 2**32 or port in HOST_PORTS:
            raise ConfigError(
                f"port {port} cannot be listened on: choose 1..2**32-1, not Ember's own "
                f"ports {sorted(HOST_PORTS)}"
            )
        if self.exited():
            raise self.crashed("the sandbox is not running")
        path = f"{self.uds}_{port}"
        previous = self._listeners.get(port)
        if previous is not None and previous.fileno() != -1:
            raise ConfigError(f"something already listens on port {port} of this sandbox")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # ours, closed since: its file stays behind until we reuse it
        sock = unix_listener(path, backlog)
        try:
            owner = self.dir.stat()
            os.chmod(path, 0o600)
            if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(path, owner.st_uid, owner.st_gid)  # the jailed VMM's uid
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._listeners[port] = sock
        return sock

    def snapshot(self, directory: Path, *, durable: bool) -> dict[str, Any]:
        """Snapshot the running VM into ``directory`` (through the VMM's control socket)."""
        from ember.vmm import control
        from ember.vmm.machine_state import open_snapshot_files

        if self.exited():
            raise self.crashed("the sandbox is not running")
        state_fd, memory_fd = open_snapshot_files(directory)
        try:
            return control.request(
                self.control_path, "snapshot", fds=[state_fd, memory_fd], durable=durable
            )
        finally:
            os.close(state_fd)
            os.close(memory_fd)

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def console_tail(self, lines: int = 30) -> str:
        try:
            data = self.console_path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def crashed(self, what: str) -> SandboxCrashed:
        tail = self.console_tail()
        reason = next(
            (line for line in reversed(tail.splitlines()) if line.startswith("ember:")), ""
        )
        status = self.proc.returncode if self.proc is not None else None
        if status == -signal.SIGSYS:
            reason = (
                f"seccomp killed the VMM (pid {self.proc.pid if self.proc else '?'}, "
                f"sandbox {self.dir.name}): it made a system call outside its allow-list"
            )
        elif status is not None and status < 0:
            reason = reason or f"VMM killed by signal {-status}"
        return SandboxCrashed(f"{what}: {reason or f'VMM exit status {status}'}", tail)

    @property
    def vmm_pid(self) -> int | None:
        """The process running the VM (a jailed one is PID 1 of its own PID namespace, and
        this is its PID here)."""
        return None if self.proc is None else self.proc.pid

    def connect(self, port: int = protocol.AGENT_PORT) -> socket.socket:
        """A stream to ``port`` in the guest, through the hybrid-vsock handshake."""
        return self._handshake("CONNECT", port)

    def resume(self, port: int = protocol.AGENT_PORT) -> socket.socket | None:
        """Take over a connection to ``port`` carried over in the snapshot (``RESUME``): the
        agent at its end is already waiting for a request.  None if there is none."""
        try:
            return self._handshake("RESUME", port)
        except OSError:
            return None

    def _handshake(self, verb: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.connect(self.uds)
            sock.sendall(f"{verb} {port}\n".encode())
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = sock.recv(1)
                if not chunk:
                    break
                line += chunk
            if not line.startswith(b"OK "):
                raise ConnectionError(f"vsock handshake refused: {line!r}")
            sock.settimeout(None)
            return sock
        except BaseException:
            sock.close()
            raise

    def crash_after_failure(self) -> SandboxCrashed | None:
        """After a failed call: the crash, if the VMM is gone (given a moment to die), else None.

        A guest panic or a killed VMM first shows up as a broken connection;
        only the VMM's exit tells it apart from a transient error.
        """
        if self.wait_exit(CRASH_GRACE):
            return self.crashed("the sandbox crashed")
        return None

    def take_channel_listener(self) -> socket.socket:
        """Hand the guest-channel listener to its server, which then owns (and closes) it."""
        listener = self.channel_listener
        if listener is None:
            raise SandboxError("the channel listener was already taken")
        self.channel_listener = None
        return listener

    def shm_region(self) -> HostRegion | None:
        """The VMM's memory channel region mapped here (None if it has none): asked lazily,
        by the channel server, when the guest first wants a ring."""
        from ember.client import HostRegion

        return HostRegion.from_vmm(self.control_path)

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            vmm = self.vmm_pid
            if vmm is not None and vmm != self.proc.pid:
                # The VMM first, so that its relay reaps it and then ends itself.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(vmm, signal.SIGKILL)
                self.wait_exit(CRASH_GRACE)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if isinstance(self.proc, ZygoteChild):
            self.proc.close()
        if self.channel_listener is not None:
            self.channel_listener.close()
            self.channel_listener = None
        try:
            if self.cgroup is not None:
                self.cgroup.remove()  # also kills anything the VMM left behind
        finally:
            try:
                if self.network is not None:  # after the VMM: it holds the TAP
                    from ember.network.pool import release_network

                    release_network(self.network)  # deleted in the background
                    self.network = None
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)
