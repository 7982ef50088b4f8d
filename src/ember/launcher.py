"""Starting one sandbox's VMM process (boot, restore, fork): shared by the sync and async SDK.

Each sandbox is its own VMM process (:mod:`ember.vmm.process` with a root file
system, a vsock device and the guest agent as the workload), so a guest that
breaks its VMM breaks nothing else.  What it runs is a typed
:class:`~ember.vmm.config.ProcessConfig`, handed over as JSON: to the zygote
over its socket (a restore), or on the stdin of a fresh interpreter (a cold
boot), never as command-line flags.  Once it runs, a :class:`VmmProcess` is a
:class:`~ember.vmm_handle.VmmHandle`: reaching the agent, the control socket,
crash reports and teardown are that module's.

With quotas, the VMM runs in its own cgroup (:mod:`ember.jailer.cgroups`),
made before the VMM starts and entered by the child itself between fork and
exec, so not one instruction of the VMM runs unconfined.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ember import protocol
from ember.client import Deadline, read_frame
from ember.errors import ProtocolError, SandboxTimeout
from ember.jailer.cgroups import SandboxCgroup
from ember.spec import SandboxSpec, agent_argv, resolve_images
from ember.vmm.config import NetConfig, ProcessConfig, RestoreConfig, VmConfig, to_json
from ember.vmm_handle import HANDSHAKE_TIMEOUT as HANDSHAKE_TIMEOUT  # re-exported: sandbox.aio
from ember.vmm_handle import VmmHandle, unix_listener

CONSOLE_LOG = "console.log"
VSOCK_NAME = "v.sock"
CONTROL_NAME = "control.sock"
EXIT_FILE = "exit-status"
READY_FILE = "ready"


class VmmProcess(VmmHandle):
    """A sandbox VM started here: its directory, listeners, cgroup and network, then its VMM.

    Made by booting (``VmmProcess(spec)``, a fresh ``ember boot`` process
    that waits for the agent's hello) or by restoring a snapshot
    (``VmmProcess(spec, restore=DIR)``, forked by the zygote: the agent is
    already running in the snapshot, so the VM is ready once its vsock
    socket accepts).
    """

    # A cold boot's end of its VMM's owner pipe; a class default, since ember.serve.adopt
    # makes instances without __init__ (adopted VMMs were restored: they have none).
    _owner: int | None = None

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        restore: Path | None = None,
        park_idle: float | None = 1.0,
        debug_hooks: bool = False,
        template: bool = False,
    ) -> None:
        self.debug_hooks = debug_hooks
        self.restored = restore is not None
        self.dir = Path(tempfile.mkdtemp(prefix="ember-"))
        self.uds = str(self.dir / VSOCK_NAME)
        self.console_path = self.dir / CONSOLE_LOG
        self.control_path = self.dir / CONTROL_NAME
        self.proc = None
        self.channel_listener = None
        self._listeners = {}
        self.cgroup = None
        self.network = None
        try:
            if spec.network is not None:
                from ember.network.pool import take_network

                # Pooled: only the policy's rules are loaded, while the VMM restores.
                self.network = take_network(spec.network)
            self.channel_listener = unix_listener(f"{self.uds}_{protocol.CHANNEL_PORT}")
            if spec.quotas is not None and spec.quotas.any():
                self.cgroup = SandboxCgroup.create(self.dir.name, spec.quotas)
            if restore is None:
                self._network_ready()
                self._boot(spec)
            else:
                self._restore(spec, restore, park_idle, template)
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
        # The VMM stops when this process is gone, however it goes (ember.vmm.process
        # _stop_without_owner): it holds the read end, only this process the write end
        # (non-inheritable: no other child of ours keeps it open).
        owner_read, self._owner = os.pipe()
        config = replace(self.boot_config(spec), owner_fd=owner_read)
        ready = unix_listener(f"{self.uds}_{protocol.READY_PORT}")
        try:
            config_fd = _config_fd(config)
            try:
                with self.console_path.open("wb") as log:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "ember.vmm.process"],
                        stdin=config_fd,  # read to its end, then replaced with /dev/null
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        pass_fds=(owner_read,),
                        start_new_session=True,  # a Ctrl-C for the host app is not the VMM's
                        # join_self only makes raw os calls, so it is safe even if
                        # other threads (asyncio.to_thread) exist at fork time.
                        preexec_fn=self.cgroup.join_self if self.cgroup is not None else None,
                    )
            finally:
                os.close(config_fd)
                os.close(owner_read)
            self._wait_ready(ready, spec.boot_timeout)
        finally:
            ready.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owner is not None:
                os.close(self._owner)
                self._owner = None

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

    def _restore(
        self, spec: SandboxSpec, snapshot: Path, park_idle: float | None, template: bool
    ) -> None:
        from ember.zygote import Zygote

        self.proc = Zygote.get().spawn(
            self.restore_config(spec, snapshot, park_idle),
            console=self.console_path,
            exit_file=self.dir / EXIT_FILE,
            cgroup_procs=self.cgroup.procs_files() if self.cgroup is not None else [],
            new_pid_ns=spec.jailed,  # the VMM is then PID 1 there: no relay process needed
            template=template,  # restored again and again: the zygote prepares the next one
        )
        self._wait_listening(spec.boot_timeout)

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
