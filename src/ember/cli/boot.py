"""``ember boot``: boot any kernel with the serial console on this terminal.

Exit status: 0 when the guest reboots or powers off, 1 when it crashes
(KVM internal error, triple fault, kernel panic), 2 on bad input.  With
``--rootfs R -- CMD...`` the guest runs CMD from R and the exit status is CMD's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ember.errors import ConfigError
from ember.vmm.builder import build_machine
from ember.vmm.config import DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DiskConfig, VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.machine import Machine

EXIT_CRASH = 1


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
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S s")
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
        "--guest-cid", type=int, default=None, metavar="CID", help="vsock CID (default 3)"
    )
    p.add_argument("workload", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] to run (--rootfs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = ConsoleSink(sys.stdout.buffer)
    machine = _restore(args, console) if args.restore is not None else _build(args, console)
    control = None
    try:
        if args.control is not None:
            from ember.vmm.control import ControlServer

            control = ControlServer(args.control, machine, machine.events)
        if args.park_idle is not None:
            _park_when_idle(machine, args.park_idle)
    except BaseException:
        machine.close()
        raise
    try:
        reason = machine.run(timeout=args.timeout)
    finally:
        if control is not None:
            control.close()
    if reason.exit_status is not None:
        return reason.exit_status
    if reason.kind.clean:
        return 0
    print(f"ember: guest stopped: {reason.describe()}", file=sys.stderr)
    return EXIT_CRASH


def _restore(args: argparse.Namespace, console: ConsoleSink) -> Machine:
    from ember.vmm.builder import restore_machine

    if args.kernel is not None or args.initrd is not None or args.workload:
        raise ConfigError("--restore takes no --kernel, --initrd or command: the snapshot has them")
    return restore_machine(
        args.restore, console, vsock_uds=args.vsock_uds, guest_cid=args.guest_cid
    )


def _park_when_idle(machine: Machine, after_s: float) -> None:
    from ember.devices.virtio.vsock.device import Vsock
    from ember.vmm.idle import TICK_S, IdleParker

    vsock = next((t.device for t in machine.slots.transports if isinstance(t.device, Vsock)), None)
    if vsock is None:
        raise ConfigError("--park-idle needs a vsock device: it is how the host wakes the guest")
    parker = IdleParker(machine, lambda: vsock.host_connections, after_s)
    vsock.on_host_activity = parker.wake
    machine.events.set_tick(TICK_S, parker.tick)


def _build(args: argparse.Namespace, console: ConsoleSink) -> Machine:
    if args.kernel is None:
        raise ConfigError("give --kernel (or --restore a snapshot)")
    workload = list(args.workload)
    if workload[:1] == ["--"]:
        workload = workload[1:]
    initrd = args.initrd
    if initrd is None and args.rootfs is not None:
        from ember.images import artifact_path  # ember-init lives in the default initramfs

        initrd = artifact_path("initrd")
    config = VmConfig(
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
    )
    return build_machine(config, console)
