"""``ember boot``: boot any kernel with the serial console on this terminal.

Exit status: 0 when the guest reboots or powers off, 1 when it crashes
(KVM internal error, triple fault, kernel panic), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ember.vmm.builder import build_machine
from ember.vmm.config import DEFAULT_CMDLINE, DEFAULT_MEM_MIB, VmConfig
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = VmConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        mem_mib=args.mem,
        vcpus=args.vcpus,
        cpu_template=args.cpu_template,
    )
    console = ConsoleSink(sys.stdout.buffer)
    machine = build_machine(config, console)
    reason = machine.run(timeout=args.timeout)
    if reason.kind.clean and not (args.timeout and "timed out" in reason.detail):
        return 0
    print(f"ember: guest stopped: {reason.describe()}", file=sys.stderr)
    return EXIT_CRASH
