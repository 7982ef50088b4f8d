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

from ember.vmm.builder import build_machine
from ember.vmm.config import DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DiskConfig, VmConfig
from ember.vmm.console import ConsoleSink

EXIT_CRASH = 1


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "boot",
        help="boot a kernel, console on this terminal",
        description="Boot a Linux kernel (ELF vmlinux or bzImage) with its serial console on "
        "stdout. Exits 0 when the guest reboots or powers off, 1 if it crashes.",
    )
    p.add_argument("--kernel", required=True, type=Path, help="ELF vmlinux or bzImage")
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
    p.add_argument("--guest-cid", type=int, default=3, metavar="CID", help="vsock CID (default 3)")
    p.add_argument("workload", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] to run (--rootfs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
        guest_cid=args.guest_cid,
    )
    console = ConsoleSink(sys.stdout.buffer)
    machine = build_machine(config, console)
    reason = machine.run(timeout=args.timeout)
    if reason.exit_status is not None:
        return reason.exit_status
    if reason.kind.clean:
        return 0
    print(f"ember: guest stopped: {reason.describe()}", file=sys.stderr)
    return EXIT_CRASH
