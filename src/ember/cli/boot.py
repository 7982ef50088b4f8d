"""``ember boot``: boot any kernel with the serial console on this terminal.

Exit status: 0 when the guest reboots or powers off, 1 when it crashes
(KVM internal error, triple fault, kernel panic), 2 on bad input.  With
``--rootfs R -- CMD...`` the guest runs CMD from R and the exit status is CMD's.

This module only turns argv into a :class:`~ember.vmm.config.ProcessConfig`
(:func:`config_from_args`); the VMM process itself is :mod:`ember.vmm.process`,
which the SDK reaches without argv.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ember.cli import positive_seconds
from ember.errors import ConfigError
from ember.vmm.config import (
    DEFAULT_CMDLINE,
    DEFAULT_MAC,
    DEFAULT_MEM_MIB,
    DiskConfig,
    NetConfig,
    ProcessConfig,
    RestoreConfig,
    VmConfig,
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "boot",
        help="boot a kernel, console on this terminal",
        description="Boot a Linux kernel (ELF vmlinux or bzImage) with its serial console on "
        "stdout. Exits 0 when the guest reboots or powers off, 1 if it crashes.",
    )
    p.add_argument("--kernel", type=Path, help="ELF vmlinux or bzImage (unless --restore)")
    p.add_argument(
        "--restore",
        type=Path,
        metavar="DIR",
        help="restore the snapshot in DIR instead of booting (its devices come with it)",
    )
    p.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        help="serve the control socket (snapshot, pause, resume) at PATH",
    )
    p.add_argument(
        "--jail",
        type=Path,
        metavar="DIR",
        help="once the VM is built, jail the VMM in DIR (its sandbox directory): own PID, "
        "mount, IPC, UTS and network namespaces, chroot, rlimits, an unprivileged uid and "
        "per-thread seccomp filters (needs root)",
    )
    p.add_argument(
        "--no-seccomp",
        action="store_true",
        help="DEBUGGING ONLY: leave the jailed VMM without seccomp filters",
    )
    p.add_argument("--debug-hooks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="create PATH once the VM is built (and jailed) and about to run",
    )
    p.add_argument(
        "--park-idle",
        type=float,
        default=None,
        metavar="S",
        help="pause the vCPUs after S seconds without host connections and guest work; "
        "host activity on vsock wakes them",
    )
    p.add_argument("--initrd", type=Path, help="initramfs (uncompressed cpio for Ember's kernel)")
    p.add_argument("--cmdline", default=DEFAULT_CMDLINE, help=f"default: {DEFAULT_CMDLINE!r}")
    p.add_argument("--mem", type=int, default=DEFAULT_MEM_MIB, metavar="MiB", help="guest RAM")
    p.add_argument("--vcpus", type=int, default=1, metavar="N")
    p.add_argument(
        "--cpu-template", default="auto", metavar="T", help="auto (default), pvm or host"
    )
    p.add_argument(
        "--timeout", type=positive_seconds, default=None, metavar="S", help="stop after S s"
    )
    p.add_argument(
        "--rootfs", type=Path, help="ext4 root file system, shared read-only under a tmpfs overlay"
    )
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[:ro]",
        help="extra virtio-blk disk (/dev/vdb, /dev/vdc, ...); repeatable",
    )
    p.add_argument(
        "--vsock-uds",
        type=Path,
        metavar="PATH",
        help="add a virtio-vsock device whose host side is this Unix socket "
        "(clients send 'CONNECT <port>\\n'; guest connections reach PATH_<port>)",
    )
    p.add_argument(
        "--balloon",
        action="store_true",
        help="add a virtio-balloon device (memory given back: inflate, free page reporting)",
    )
    p.add_argument(
        "--tap",
        metavar="NAME",
        help="add a virtio-net device on this existing TAP (made with vnet_hdr); off by default",
    )
    p.add_argument(
        "--netns", metavar="PATH", help="the TAP lives in this network namespace (/run/netns/X)"
    )
    p.add_argument("--mac", default=DEFAULT_MAC, help=f"guest MAC (default {DEFAULT_MAC})")
    p.add_argument(
        "--guest-ip",
        metavar="ADDR/PREFIX",
        help="ember-init gives eth0 this address (with --rootfs)",
    )
    p.add_argument("--gateway", metavar="ADDR", help="the guest's default route (with --guest-ip)")
    p.add_argument(
        "--guest-cid", type=int, default=None, metavar="CID", help="vsock CID (default 3)"
    )
    p.add_argument("workload", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] to run (--rootfs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ember.vmm import process  # the VMM itself: only ``ember boot`` pays for its imports

    return process.run(config_from_args(args))


def config_from_args(args: argparse.Namespace) -> ProcessConfig:
    """The typed config of ``ember boot``'s parsed flags (flags that contradict: ConfigError)."""
    machine = _restore_config(args) if args.restore is not None else _vm_config(args)
    return ProcessConfig(
        machine=machine,
        control=args.control,
        jail=args.jail,
        seccomp=not args.no_seccomp,
        debug_hooks=args.debug_hooks,
        ready_file=args.ready_file,
        park_idle=args.park_idle,
        timeout=args.timeout,
    )


def _restore_config(args: argparse.Namespace) -> RestoreConfig:
    if args.kernel is not None or args.initrd is not None or args.workload:
        raise ConfigError("--restore takes no --kernel, --initrd or command: the snapshot has them")
    if args.guest_ip is not None or args.gateway is not None or args.mac != DEFAULT_MAC:
        raise ConfigError("--restore keeps the snapshot's MAC and guest address: give only --tap")
    config = RestoreConfig(
        args.restore,
        vsock_uds=args.vsock_uds,
        guest_cid=args.guest_cid,
        tap=args.tap,
        netns=args.netns,
    )
    config.validate()
    return config


def _vm_config(args: argparse.Namespace) -> VmConfig:
    if args.kernel is None:
        raise ConfigError("give --kernel (or --restore a snapshot)")
    workload = list(args.workload)
    if workload[:1] == ["--"]:
        workload = workload[1:]
    initrd = args.initrd
    if initrd is None and args.rootfs is not None:
        from ember.images import artifact_path  # ember-init lives in the default initramfs

        initrd = artifact_path("initrd")
    return VmConfig(
        kernel=args.kernel,
        initrd=initrd,
        cmdline=args.cmdline,
        mem_mib=args.mem,
        vcpus=args.vcpus,
        cpu_template=args.cpu_template,
        rootfs=args.rootfs,
        disks=tuple(DiskConfig.parse(spec) for spec in args.disk),
        workload=tuple(workload),
        vsock_uds=args.vsock_uds,
        guest_cid=args.guest_cid if args.guest_cid is not None else 3,
        balloon=args.balloon,
        net=_net_config(args),
    )


def _net_config(args: argparse.Namespace) -> NetConfig | None:
    if args.tap is None:
        if args.netns is not None or args.guest_ip is not None or args.gateway is not None:
            raise ConfigError("--netns, --guest-ip and --gateway configure virtio-net: give --tap")
        return None
    return NetConfig(
        tap=args.tap, netns=args.netns, mac=args.mac, guest_ip=args.guest_ip, gateway=args.gateway
    )
