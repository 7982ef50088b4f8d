"""Starting one sandbox's VMM process and reaching its agent: shared by the sync and async SDK.

Each sandbox is its own VMM process (:mod:`ember.vmm.process` with a root file
system, a vsock device and the guest agent as the workload), so a guest that
breaks its VMM breaks nothing else.  What it runs is a typed
:class:`~ember.vmm.config.ProcessConfig`, handed over as JSON: to the zygote
over its socket (a restore), or on the stdin of a fresh interpreter (a cold
boot), never as command-line flags.  The host side of vsock is a Unix socket in a
private directory:

- ``v.sock``       clients send ``CONNECT 1024`` and then talk to the agent;
- ``v.sock_1025``  the agent connects here once, to say it is ready;
- ``v.sock_1026``  guest code opens data channels here.

The VMM's console (and its one-line stop reason) goes to ``console.log``: a
crash report carries its tail.

With quotas, the VMM runs in its own cgroup (:mod:`ember.jailer.cgroups`),
made before the VMM starts and entered by the child itself between fork and
exec, so not one instruction of the VMM runs unconfined.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import protocol
from ember.client import Deadline, read_frame
from ember.errors import ConfigError, ProtocolError, SandboxCrashed, SandboxError, SandboxTimeout
from ember.jailer.cgroups import SandboxCgroup
from ember.spec import SandboxSpec, agent_argv, resolve_images
from ember.vmm.config import NetConfig, ProcessConfig, RestoreConfig, VmConfig, to_json
from ember.zygote import ZygoteChild

if TYPE_CHECKING:
    from ember.client import HostRegion
    from ember.network.host import SandboxNetwork

CONSOLE_LOG = "console.log"
VSOCK_NAME = "v.sock"
CONTROL_NAME = "control.sock"
EXIT_FILE = "exit-status"
READY_FILE = "ready"
PAGES_PER_MIB = 256
HANDSHAKE_TIMEOUT = 30.0
CRASH_GRACE = 5.0  # seconds to let a dying VMM exit before calling a failure a crash
# Host vsock ports Ember itself listens on (guest -> host): Sandbox.listen refuses them.
HOST_PORTS = frozenset({protocol.READY_PORT, protocol.CHANNEL_PORT})


def _listen(path: str, backlog: int = 64) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class VmmProcess:
    """One running sandbox VM: the process, its socket directory and its console log.

    Made by booting (``VmmProcess(spec)``, a fresh ``ember boot`` process
    that waits for the agent's hello) or by restoring a snapshot
    (``VmmProcess(spec, restore=DIR)``, forked by the zygote: the agent is
    already running in the snapshot, so the VM is ready once its vsock
    socket accepts).
    """

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        restore: Path | None = None,
        park_idle: float | None = 1.0,
        debug_hooks: bool = False,
    ) -> None:
        self.debug_hooks = debug_hooks  # tests of the jail only: see ember.vmm.control
        self.restored = restore is not None
        self.dir = Path(tempfile.mkdtemp(prefix="ember-"))
        self.uds = str(self.dir / VSOCK_NAME)
        self.console_path = self.dir / CONSOLE_LOG
        self.control_path = self.dir / CONTROL_NAME
        self.proc: subprocess.Popen[bytes] | ZygoteChild | None = None
        self.channel_listener: socket.socket | None = None
        self._listeners: dict[int, socket.socket] = {}  # listen(): the caller's, by port
        self.cgroup: SandboxCgroup | None = None
        self.network: SandboxNetwork | None = None
        try:
            if spec.network is not None:
                from ember.network.pool import take_network

                # Pooled: only the policy's rules are loaded, while the VMM restores.
                self.network = take_network(spec.network)
            self.channel_listener = _listen(f"{self.uds}_{protocol.CHANNEL_PORT}")
            if spec.quotas is not None and spec.quotas.any():
                self.cgroup = SandboxCgroup.create(self.dir.name, spec.quotas)
            if restore is None:
                self._network_ready()
                self._boot(spec)
            else:
                self._restore(spec, restore, park_idle)
                self._network_ready()  # until now the guest could reach nothing
        except BaseException:
            self.close()
            raise

    def _network_ready(self) -> None:
        """Wait for the policy's rules and start the resolver; then let the pool refill."""
        if self.network is not None:
            from ember.network.pool import network_settled

            try:
                self.network.wait_applied()
            finally:
                network_settled(self.network)  # background work may run again

    def _boot(self, spec: SandboxSpec) -> None:
        config = self.boot_config(spec)
        ready = _listen(f"{self.uds}_{protocol.READY_PORT}")
        try:
            config_fd = _config_fd(config)
            try:
                with self.console_path.open("wb") as log:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "ember.vmm.process"],
                        stdin=config_fd,  # read to its end, then replaced with /dev/null
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # a Ctrl-C for the host app is not the VMM's
                        # join_self only makes raw os calls, so it is safe even if
                        # other threads (asyncio.to_thread) exist at fork time.
                        preexec_fn=self.cgroup.join_self if self.cgroup is not None else None,
                    )
            finally:
                os.close(config_fd)
            self._wait_ready(ready, spec.boot_timeout)
        finally:
            ready.close()

    def boot_config(self, spec: SandboxSpec) -> ProcessConfig:
        """What the VMM of a cold boot of ``spec`` runs: the image with the agent as its
        workload, vsock and a balloon, this sandbox's control socket (and jail, and network)."""
        kernel, rootfs, initrd = resolve_images(spec)
        machine = VmConfig(
            kernel=kernel,
            initrd=initrd,
            rootfs=rootfs,
            mem_mib=spec.mem_mib,
            vcpus=spec.vcpus,
            cpu_template=spec.cpu_template,
            workload=agent_argv(spec),
            vsock_uds=Path(self.uds),
            balloon=True,
            net=self._net_config(),
        )
        return self._process_config(spec, machine)

    def restore_config(
        self, spec: SandboxSpec, snapshot: Path, park_idle: float | None
    ) -> ProcessConfig:
        """What the VMM restoring ``snapshot`` runs: its devices with this sandbox's host sides
        (a restore keeps the guest's own address), a ready file, and idle parking."""
        machine = RestoreConfig(snapshot, vsock_uds=Path(self.uds))
        if self.network is not None:
            from ember.network.host import TAP_NAME

            machine = replace(machine, tap=TAP_NAME, netns=self.network.netns_path)
        return self._process_config(
            spec, machine, ready_file=self.dir / READY_FILE, park_idle=park_idle
        )

    def _process_config(
        self,
        spec: SandboxSpec,
        machine: VmConfig | RestoreConfig,
        *,
        ready_file: Path | None = None,
        park_idle: float | None = None,
    ) -> ProcessConfig:
        return ProcessConfig(
            machine=machine,
            control=self.control_path,
            jail=self.dir if spec.jailed else None,
            debug_hooks=spec.jailed and self.debug_hooks,
            ready_file=ready_file,
            park_idle=park_idle,
        )

    def _restore(self, spec: SandboxSpec, snapshot: Path, park_idle: float | None) -> None:
        from ember.zygote import Zygote

        self.proc = Zygote.get().spawn(
            self.restore_config(spec, snapshot, park_idle),
            console=self.console_path,
            exit_file=self.dir / EXIT_FILE,
            cgroup_procs=self.cgroup.procs_files() if self.cgroup is not None else [],
            new_pid_ns=spec.jailed,  # the VMM is then PID 1 there: no relay process needed
        )
        self._wait_listening(spec.boot_timeout)

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

    def _net_config(self) -> NetConfig | None:
        """A booting guest's virtio-net: the sandbox's TAP and the guest's address on it."""
        if self.network is None:
            return None
        from ember.network.host import GATEWAY_IP, GUEST_CIDR, TAP_NAME

        return NetConfig(
            tap=TAP_NAME,
            netns=self.network.netns_path,
            guest_ip=GUEST_CIDR,
            gateway=GATEWAY_IP,
        )

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
        sock = _listen(path, backlog)
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

    def _wait_listening(self, timeout: float) -> None:
        """The restored VMM creates its ready file once the VM is whole, jailed and about to
        run (its sockets accept from then on): wait for that."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        ready = self.dir / READY_FILE
        while True:
            if ready.exists():
                return
            if self.exited():
                raise self.crashed("the sandbox VM stopped while restoring")
            if time.monotonic() > deadline:
                raise SandboxTimeout(f"the sandbox was not restored within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.001)  # a stat() is cheap; a late wake-up is not

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

    def _wait_ready(self, ready: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready.settimeout(0.25)
        while True:
            try:
                conn, _ = ready.accept()
                break
            except TimeoutError:
                pass
            if self.exited():
                raise self.crashed("the sandbox VM stopped while booting")
            if time.monotonic() > deadline:
                raise SandboxTimeout(f"the sandbox did not become ready within {timeout:.0f} s")
        with conn:
            # The whole hello by the boot deadline: a timeout per recv would let a guest that
            # drips a byte at a time hold the boot open for ever.
            hello = Deadline(
                timeout,
                "the guest agent did not finish its ready message",
                "boot_timeout",
                at=deadline,
            )
            frame = read_frame(conn, hello)
            if frame is None or frame[0] != protocol.Kind.REQUEST:
                raise ProtocolError("the guest agent sent a malformed ready message")

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


def _config_fd(config: ProcessConfig) -> int:
    """``config`` as JSON in a memory file, at offset 0: a VMM's stdin.

    A file, not a pipe: the whole config is there before the VMM starts, so
    writing it can never block on a reader that has not started (or died).
    """
    fd = os.memfd_create("ember-vmm-config", os.MFD_CLOEXEC)
    try:
        os.write(fd, json.dumps(to_json(config)).encode())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fork_vmm(parent: VmmProcess, spec: SandboxSpec) -> VmmProcess:
    """A new VM continuing from ``parent``'s current state; the two then diverge.

    The parent pauses only while its state and RAM are written (RAM to a
    file the child maps copy-on-write); the file is unlinked as soon as the
    child has mapped it, so nothing is left behind.
    """
    snapshot = Path(tempfile.mkdtemp(prefix="ember-fork-"))
    try:
        parent.snapshot(snapshot, durable=False)
        return VmmProcess(spec, restore=snapshot)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
