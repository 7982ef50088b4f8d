"""``ember boot``: boot any kernel with the serial console on this terminal.

Exit status: 0 when the guest reboots or powers off, 1 when it crashes
(KVM internal error, triple fault, kernel panic), 2 on bad input.  With
``--rootfs R -- CMD...`` the guest runs CMD from R and the exit status is CMD's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.errors import ConfigError
from ember.vmm.builder import build_machine
from ember.vmm.config import (
    DEFAULT_CMDLINE,
    DEFAULT_MAC,
    DEFAULT_MEM_MIB,
    DiskConfig,
    NetConfig,
    VmConfig,
)
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
    if args.jail is not None:
        from ember.jailer import jail

        jail.enter_pid_namespace()  # from here on we are the VMM, PID 1 of its namespace
    console = ConsoleSink(sys.stdout.buffer)
    machine = _restore(args, console) if args.restore is not None else _build(args, console)
    control = None
    confine: Callable[[str], None] | None = None
    try:
        if args.control is not None:
            from ember.vmm.control import ControlServer

            control = ControlServer(args.control, machine, machine.events, debug=args.debug_hooks)
        if args.park_idle is not None:
            _park_when_idle(machine, args.park_idle)
        if args.jail is not None:
            confine = _jail(args, machine)
    except BaseException:
        machine.close()
        raise
    try:
        ready_file = args.ready_file
        reason = machine.run(
            timeout=args.timeout,
            confine=confine,
            on_running=(lambda: _create(ready_file)) if ready_file is not None else None,
        )
    finally:
        if control is not None:
            control.close()
    if reason.exit_status is not None:
        return reason.exit_status
    if reason.kind.clean:
        return 0
    print(f"ember: guest stopped: {reason.describe()}", file=sys.stderr)
    return EXIT_CRASH


def _create(path: Path) -> None:
    """An empty file: only openat and close, which the main thread's filter allows."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


JAIL_FILE_SLACK = 256 << 20  # console log and snapshot state on top of a RAM-sized memory file


def _jail(args: argparse.Namespace, machine: Machine) -> Callable[[str], None] | None:
    """Jail this process (the VM is built, no thread runs yet); returns the seccomp installer."""
    from ember.jailer import jail, seccomp

    if args.no_seccomp:
        print(
            "ember: WARNING: --no-seccomp: this VMM runs WITHOUT seccomp filters; "
            "use it to debug, never for untrusted code",
            file=sys.stderr,
        )
    else:
        seccomp.preload()  # the library lives outside the jail
    for module in _LATE_IMPORTS:  # nothing can be imported once the root is gone
        importlib.import_module(module)
    jail.enter(args.jail, file_size_limit=machine.memory.size + JAIL_FILE_SLACK)
    if args.no_seccomp:
        return None

    def confine(role: str) -> None:
        try:
            seccomp.install(seccomp.Role(role))
        except Exception as exc:  # an unfiltered VMM must not run guest code
            print(f"ember: seccomp: cannot confine the {role} thread: {exc}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(EXIT_CRASH)

    return confine


# Modules the VMM imports lazily (snapshots, debug hooks): loaded before the chroot.
_LATE_IMPORTS = (
    "ember.snapshot.machine_state",
    "ember.snapshot.kvm_state",
    "ember.snapshot.memory_file",
    "ember.snapshot.format",
    "ember.vmm.control",
    "ember.vmm.idle",
    "ember.devices.virtio.vsock.device",
    "ember.devices.virtio.balloon.device",
    "ember.devices.virtio.net.device",
    "ember.devices.virtio.net.tap",
    "ctypes",
    "hashlib",
    "json",
)


def _restore(args: argparse.Namespace, console: ConsoleSink) -> Machine:
    from ember.vmm.builder import restore_machine

    if args.kernel is not None or args.initrd is not None or args.workload:
        raise ConfigError("--restore takes no --kernel, --initrd or command: the snapshot has them")
    if args.guest_ip is not None or args.gateway is not None or args.mac != DEFAULT_MAC:
        raise ConfigError("--restore keeps the snapshot's MAC and guest address: give only --tap")
    if args.netns is not None and args.tap is None:
        raise ConfigError("--netns names where the TAP is: give --tap too")
    return restore_machine(
        args.restore,
        console,
        vsock_uds=args.vsock_uds,
        guest_cid=args.guest_cid,
        tap=args.tap,
        netns=args.netns,
    )


def _park_when_idle(machine: Machine, after_s: float) -> None:
    from ember.devices.virtio.net.device import Net
    from ember.devices.virtio.vsock.device import Vsock
    from ember.vmm.idle import TICK_S, IdleParker

    vsock = machine.device(Vsock)
    if vsock is None:
        raise ConfigError("--park-idle needs a vsock device: it is how the host wakes the guest")
    parker = IdleParker(machine, lambda: vsock.host_connections, after_s)
    vsock.on_host_activity = parker.wake
    net = machine.device(Net)
    if net is not None:  # a frame for the guest wakes it too
        net.on_host_activity = parker.wake
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
        balloon=args.balloon,
        net=_net_config(args),
    )
    return build_machine(config, console)


def _net_config(args: argparse.Namespace) -> NetConfig | None:
    if args.tap is None:
        if args.netns is not None or args.guest_ip is not None or args.gateway is not None:
            raise ConfigError("--netns, --guest-ip and --gateway configure virtio-net: give --tap")
        return None
    return NetConfig(
        tap=args.tap, netns=args.netns, mac=args.mac, guest_ip=args.guest_ip, gateway=args.gateway
    )
