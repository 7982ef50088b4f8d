"""Saving a whole machine: its config, KVM state, device state and RAM, into a directory.

The caller has paused every vCPU (:meth:`ember.vmm.machine.Machine.snapshot`
does) and runs on the event thread or with it stopped, so no device moves
while its state is read.

A restore opens the disks its state file names, as root and before the jail:
:func:`confine_disks` accepts only files in the image cache's root file
systems or in the snapshot's own directory (after resolving symlinks and
``..``), so a tampered or foreign snapshot cannot attach a host file.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import SnapshotError
from ember.images.cache import cache_root
from ember.snapshot import MEMORY_FILE, STATE_FILE
from ember.snapshot.format import write_state
from ember.snapshot.kvm_state import capture_vcpu, capture_vm
from ember.snapshot.memory_file import write_memory
from ember.vmm.config import DiskConfig, NetConfig, VmConfig

if TYPE_CHECKING:
    from ember.vmm.machine import Machine

# Restores never read the kernel; a placeholder keeps VmConfig's shape.
_NO_KERNEL = Path("/nonexistent-restored-from-snapshot")
# Where in the image cache a snapshot's disks may live: the built root file systems
# (not the whole cache: it also holds other templates' memory files).
IMAGE_DISK_DIRS = ("rootfs",)


def config_to_state(config: VmConfig) -> dict[str, Any]:
    writable = [str(d.path) for d in config.disks if not d.read_only]
    if writable:
        raise SnapshotError(
            f"cannot snapshot a VM with writable disks ({', '.join(writable)}): their "
            "contents would not be part of it; attach them read-only"
        )
    return {
        "mem_mib": config.mem_mib,
        "vcpus": config.vcpus,
        "cpu_template": config.cpu_template,
        "rootfs": str(config.rootfs) if config.rootfs is not None else None,
        "disks": [str(d.path) for d in config.disks],
        "vsock": config.vsock_uds is not None,
        "guest_cid": config.guest_cid,
        "balloon": config.balloon,
        "net": (
            {"mac": config.net.mac, "guest_ip": config.net.guest_ip, "gateway": config.net.gateway}
            if config.net is not None
            else None
        ),
    }


def config_from_state(
    state: dict[str, Any],
    *,
    vsock_uds: Path | None,
    guest_cid: int | None,
    tap: str | None = None,
    netns: str | None = None,
) -> VmConfig:
    """The restored VM's config: the snapshot's devices, this sandbox's host sockets and TAP."""
    if state["vsock"] and vsock_uds is None:
        raise SnapshotError("this snapshot has a vsock device: give it a socket (--vsock-uds)")
    saved_net = state.get("net")
    net = None
    if saved_net is not None:
        if tap is None:
            raise SnapshotError("this snapshot has a network device: give it a TAP (--tap)")
        net = NetConfig(
            tap=tap,
            netns=netns,
            mac=str(saved_net["mac"]),
            guest_ip=saved_net["guest_ip"],
            gateway=saved_net["gateway"],
        )
    elif tap is not None:
        raise SnapshotError("this snapshot has no network device: it cannot take a TAP")
    rootfs = Path(state["rootfs"]) if state["rootfs"] is not None else None
    disks = tuple(DiskConfig(Path(p), read_only=True) for p in state["disks"])
    for path in ([rootfs] if rootfs is not None else []) + [d.path for d in disks]:
        if not path.is_file():
            raise SnapshotError(
                f"the snapshot's disk {path} is gone: rebuild the snapshot (ember template build)"
            )
    return VmConfig(
        kernel=_NO_KERNEL,
        mem_mib=int(state["mem_mib"]),
        vcpus=int(state["vcpus"]),
        cpu_template=str(state["cpu_template"]),
        rootfs=rootfs,
        disks=disks,
        vsock_uds=vsock_uds if state["vsock"] else None,
        guest_cid=guest_cid if guest_cid is not None else int(state["guest_cid"]),
        balloon=bool(state.get("balloon", False)),
        net=net,
    )


def disk_roots(snapshot_dir: Path) -> tuple[Path, ...]:
    """The directories a restored VM's disks may come from, symlinks resolved."""
    image_dirs = [cache_root() / name for name in IMAGE_DISK_DIRS]
    return tuple(Path(os.path.realpath(d)) for d in (*image_dirs, snapshot_dir))


def confine_disks(config: VmConfig, snapshot_dir: Path) -> VmConfig:
    """``config`` with each disk resolved to its real path, which must lie under
    :func:`disk_roots`; SnapshotError naming the disk otherwise.

    The resolved path is the one opened: a symlink in the snapshot's directory
    cannot be re-pointed between the check and the open.
    """
    roots = disk_roots(snapshot_dir)

    def check(path: Path) -> Path:
        real = Path(os.path.realpath(path))
        if any(real.is_relative_to(root) for root in roots):
            return real
        shown = f"{path} (really {real})" if real != path else str(path)
        raise SnapshotError(
            f"snapshot {snapshot_dir} names disk {shown}, which is outside the image cache "
            f"({', '.join(str(r) for r in roots[:-1])}) and the snapshot's own directory: "
            "refusing to attach it (was the state file altered?); rebuild the snapshot "
            "(ember template build) or move the disk image into its directory"
        )

    rootfs = check(config.rootfs) if config.rootfs is not None else None
    disks = tuple(replace(d, path=check(d.path)) for d in config.disks)
    return replace(config, rootfs=rootfs, disks=disks)


def open_snapshot_files(directory: Path) -> tuple[int, int]:
    """Fresh ``state`` and ``memory`` files in ``directory``: (state fd, memory fd)."""
    os.makedirs(directory, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    state_fd = os.open(directory / STATE_FILE, flags, 0o644)
    try:
        return state_fd, os.open(directory / MEMORY_FILE, flags, 0o644)
    except BaseException:
        os.close(state_fd)
        raise


def save_snapshot(
    machine: Machine, state_fd: int, memory_fd: int, *, durable: bool
) -> dict[str, Any]:
    """Write the state and RAM into two open files; the vCPUs must be paused.

    ``durable`` (templates) fsyncs and records the memory file's SHA-256,
    so a template damaged on disk is caught before a restore uses it.
    """
    started = time.monotonic()
    state: dict[str, Any] = {
        "created": time.time(),
        "config": config_to_state(machine.config),
        "vcpus": [
            capture_vcpu(machine.kvm, t.vcpu, cpuid)
            for t, cpuid in zip(machine.vcpu_threads, machine.cpuids, strict=True)
        ],
        "vm": capture_vm(machine.vm),
        "serial": machine.serial.save_state(),
        "devices": [t.save_state() for t in machine.slots.transports],
    }
    captured = time.monotonic()
    digest = write_memory(machine.memory, memory_fd, digest=durable, durable=durable)
    state["memory"] = {"size": machine.memory.size, "sha256": digest}
    write_state(state_fd, state, durable=durable)
    return {
        "capture_ms": round((captured - started) * 1000, 2),
        "total_ms": round((time.monotonic() - started) * 1000, 2),
    }
