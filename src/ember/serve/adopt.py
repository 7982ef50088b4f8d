"""Re-adopting a sandbox a previous daemon left running, from its record.

The VMM is a child of the keeper, not of the daemon, so it outlived the old
daemon; what died with it is the host side the SDK builds around a VMM:
the :class:`~ember.launcher.VmmProcess` handle (a pidfd and the exit-status
file from the keeper), the guest-channel listener (bound again at the same
path), the cgroup handle, and the agent client.  This module rebuilds them.
A record whose VMM is gone (its exit-status file written, or its pid no
longer the keeper's child) is a crash: its leftovers are removed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path
from typing import Any

from ember import protocol
from ember.jailer.cgroups import SandboxCgroup
from ember.launcher import CONSOLE_LOG, CONTROL_NAME, EXIT_FILE, VSOCK_NAME, VmmProcess
from ember.network.policy import NetworkPolicy
from ember.sandbox import Sandbox
from ember.serve.state import Record
from ember.spec import DEFAULT_MEM_MIB, SandboxSpec, quotas_from
from ember.zygote import ZygoteChild


def spec_of(record: Record) -> SandboxSpec:
    s = record.spec
    network = s.get("network")
    return SandboxSpec(
        mem_mib=int(s.get("mem_mib", DEFAULT_MEM_MIB)),
        vcpus=int(s.get("vcpus", 1)),
        quotas=quotas_from(s.get("cpus"), s.get("memory_mib"), s.get("pids")),
        network=NetworkPolicy.from_json(network) if network is not None else None,
    )


def network_record(vmm: VmmProcess, exposed: list[int] | None = None) -> dict[str, Any] | None:
    """What a record keeps of a networked VMM's network (see ``Record.network``)."""
    if vmm.network is None:
        return None
    return {"slot": vmm.network.slot, "exposed": sorted(exposed or vmm.network.exposed)}


def cgroup_of(record: Record) -> SandboxCgroup | None:
    if record.cgroup is None:
        return None
    dirs = {str(k): Path(v) for k, v in record.cgroup["dirs"].items()}
    return SandboxCgroup(int(record.cgroup["version"]), dirs)


def cgroup_record(group: SandboxCgroup | None) -> dict[str, object] | None:
    if group is None:
        return None
    return {"version": group.version, "dirs": {k: str(v) for k, v in group._dirs.items()}}


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(record: Record, keeper: int | None) -> bool:
    """The record's VMM still runs: no exit status yet, and its pid is the keeper's child
    (so a recycled pid is never mistaken for it)."""
    if (Path(record.dir) / EXIT_FILE).exists():
        return False
    return keeper is not None and _parent_of(record.pid) == keeper


def adopt(record: Record) -> Sandbox:
    """A Sandbox driving the running VMM of ``record``."""
    directory = Path(record.dir)
    vmm = VmmProcess.__new__(VmmProcess)
    vmm.debug_hooks = False
    vmm.dir = directory
    vmm.uds = str(directory / VSOCK_NAME)
    vmm.console_path = directory / CONSOLE_LOG
    vmm.control_path = directory / CONTROL_NAME
    vmm.proc = ZygoteChild(record.pid, directory / EXIT_FILE)
    vmm.cgroup = cgroup_of(record)
    vmm.network = None
    if record.network is not None:  # its resolver lived in the daemon that made it
        from ember.network.host import SandboxNetwork

        policy = spec_of(record).network
        assert policy is not None
        vmm.network = SandboxNetwork.adopt(
            int(record.network["slot"]), policy, record.network.get("exposed", [])
        )
    vmm.restored = False  # long running: its worker announced itself already, or sleeps
    path = f"{vmm.uds}_{protocol.CHANNEL_PORT}"
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    vmm.channel_listener = listener
    sandbox = object.__new__(Sandbox)
    # Not a new VM: no snapshot connection to take over, no clock or entropy to announce.
    sandbox._setup(vmm, spec_of(record), new_vm=False)
    return sandbox


def console_tail(record: Record, lines: int = 30) -> str:
    try:
        data = (Path(record.dir) / CONSOLE_LOG).read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def discard(record: Record) -> None:
    """Remove what a dead sandbox left: its cgroup (killing any straggler) and its directory."""
    group = cgroup_of(record)
    try:
        if group is not None:
            with contextlib.suppress(OSError):
                group.remove()
    finally:
        shutil.rmtree(record.dir, ignore_errors=True)


def release(sandbox: Sandbox) -> None:
    """Let go of a sandbox's host side (client, channel server, pidfd) but leave its VMM
    running, for the next daemon to re-adopt."""
    sandbox._closed = True
    sandbox._client.close()
    sandbox._channels.close()
    proc = sandbox._vmm.proc
    if isinstance(proc, ZygoteChild):
        proc.close()
