"""What a VM is made of, and what its VMM process does with it: typed, validated, portable.

Validation turns every bad input into a :class:`ConfigError` whose message
tells the user the fix; the builder may then assume a sane config.

:class:`ProcessConfig` is the whole of one VMM process (:mod:`ember.vmm.process`):
the machine to boot (:class:`VmConfig`) or restore (:class:`RestoreConfig`) and
how to run it (control socket, jail, parking).  ``ember boot`` parses argv into
one; the SDK builds one directly and hands it to the zygote or to a fresh
interpreter as JSON (:func:`to_json` / :func:`from_json`), never as argv, so
a typed config is never flattened into flags and parsed back.

This module is imported by the SDK (to build configs), so it stays cheap: the
CPU-template table (and its ctypes ABI) is imported only to validate.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ember.arch.x86_64 import layout
from ember.errors import ConfigError

# Two kinds of an idle guest's housekeeping, each thousands of emulated instructions under
# kvm_pvm (bench/idle.py: ~25k a second while a sandbox sits idle unparked, ~1.4k with
# these; a run_code that wakes a parked guest 15k, 11k with these):
# - proactive compaction: kcompactd wakes every 500 ms to score fragmentation, for huge pages
#   that a VM this small and short-lived does not wait for (compaction on demand stays);
# - vmstat: per-CPU counters folded every second by deferrable work, which an idle vCPU runs
#   at its next wake-up, i.e. inside the next request; once a minute instead (meanwhile the
#   counters drift by at most a per-CPU threshold).
QUIET_SYSCTLS = ("sysctl.vm.compaction_proactiveness=0", "sysctl.vm.stat_interval=60")
# Reclaim kills the agent's waiting interpreters (oom_score_adj >= 900) before it evicts the
# last 64 MiB of free memory and unmapped page cache, i.e. before the files every interpreter
# has mapped (kernel patch 0019): the guest has no swap, and that eviction thrashed for minutes
# of emulated reclaim before the OOM killer took the program. Reclaim runs only with free
# memory at the watermark (a few MiB) and an idle default guest's unmapped cache is ~25-32 MiB,
# so at 32 the kill waited ~24 s for reclaim to thrash its way down to it.
EXPENDABLE_FIRST = "ember.lmk_mib=64"
DEFAULT_CMDLINE = " ".join(
    ("console=ttyS0 reboot=k panic=-1 quiet no_timer_check", *QUIET_SYSCTLS, EXPENDABLE_FIRST)
)
DEFAULT_MEM_MIB = 128
MAX_VCPUS = 32  # the MP table lives in the last KiB of base memory
MAX_MEM_MIB = 1 << 20  # 1 TiB
MIN_MEM_MIB = layout.MIN_MEM_SIZE >> 20


MAX_DISKS = 16


@dataclass(frozen=True)
class DiskConfig:
    """A host file exposed as a virtio-blk disk."""

    path: Path
    read_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """``PATH`` or ``PATH:ro`` / ``PATH:rw``, as the CLI takes it."""
        path, _, mode = spec.rpartition(":")
        if mode in ("ro", "rw") and path:
            return cls(Path(path), mode == "ro")
        return cls(Path(spec))


DEFAULT_MAC = "02:65:6d:62:00:02"  # locally administered; each sandbox is its own L2 segment


@dataclass(frozen=True)
class NetConfig:
    """virtio-net over an existing TAP (optionally in another network namespace).

    ``guest_ip`` (``ADDR/PREFIX``) and ``gateway`` reach the guest on the
    command line (``ember.net=``), where ember-init configures ``eth0`` before
    the workload starts; without them the guest's interface stays down.
    """

    tap: str
    netns: str | None = None
    mac: str = DEFAULT_MAC
    guest_ip: str | None = None
    gateway: str | None = None

    def mac_bytes(self) -> bytes:
        return bytes(int(part, 16) for part in self.mac.split(":"))

    def cmdline(self) -> str | None:
        if self.guest_ip is None:
            return None
        return f"ember.net={self.guest_ip},{self.gateway or ''}".rstrip(",")

    def validate(self) -> None:
        if not 0 < len(self.tap.encode()) < 16 or "/" in self.tap:
            raise ConfigError(f"TAP name {self.tap!r} must be 1 to 15 bytes")
        if self.netns is not None and not os.path.exists(self.netns):
            raise ConfigError(f"network namespace {self.netns} does not exist")
        parts = self.mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and _is_hex(p) for p in parts):
            raise ConfigError(f"MAC address {self.mac!r} is not six hex pairs (02:00:00:00:00:01)")
        if self.mac_bytes()[0] & 1:
            raise ConfigError(f"MAC address {self.mac} is a multicast address")
        if self.guest_ip is not None:
            try:
                iface = ipaddress.IPv4Interface(self.guest_ip)
            except ValueError:
                raise ConfigError(f"guest address {self.guest_ip!r} is not ADDR/PREFIX") from None
            if self.gateway is not None:
                try:
                    gateway = ipaddress.IPv4Address(self.gateway)
                except ValueError:
                    raise ConfigError(f"gateway {self.gateway!r} is not an address") from None
                if gateway not in iface.network or gateway == iface.ip:
                    raise ConfigError(f"gateway {gateway} is not another host of {iface.network}")
        elif self.gateway is not None:
            raise ConfigError("a gateway needs a guest address (--guest-ip)")


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    mem_mib: int = DEFAULT_MEM_MIB
    vcpus: int = 1
    cpu_template: str = "auto"
    extra_cmdline: tuple[str, ...] = field(default=())
    # The root file system, shared read-only (/dev/vda); extra disks follow (/dev/vdb, ...).
    rootfs: Path | None = None
    disks: tuple[DiskConfig, ...] = ()
    workload: tuple[str, ...] = ()
    # virtio-vsock: the host side is a Unix socket (Firecracker's hybrid vsock protocol).
    vsock_uds: Path | None = None
    guest_cid: int = 3
    # virtio-balloon: memory the guest gives back (inflate, free page reporting).
    balloon: bool = False
    # virtio-net: off unless given.
    net: NetConfig | None = None

    def full_cmdline(self) -> str:
        """The user's command line plus what ember-init needs to find the root and workload."""
        words = [self.cmdline, *self.extra_cmdline]
        if self.rootfs is not None:
            words.append("ember.root=/dev/vda")
            if self.workload:
                encoded = base64.urlsafe_b64encode("\0".join(self.workload).encode())
                words.append("ember.cmd=" + encoded.decode())
        net_words = self.net.cmdline() if self.net is not None else None
        if net_words is not None:
            words.append(net_words)
        return " ".join(words).strip()

    def validate(self) -> None:
        _check_file(self.kernel, "kernel")
        if self.initrd is not None:
            _check_file(self.initrd, "initrd")
        if self.rootfs is not None:
            _check_file(self.rootfs, "root file system")
        for disk in self.disks:
            _check_file(disk.path, "disk")
            if not disk.read_only and not os.access(disk.path, os.W_OK):
                raise ConfigError(
                    f"disk {disk.path} is not writable: add :ro to attach it read-only"
                )
        if len(self.disks) + (self.rootfs is not None) > MAX_DISKS:
            raise ConfigError(f"at most {MAX_DISKS} disks")
        if self.vsock_uds is not None:
            if not self.vsock_uds.parent.is_dir():
                raise ConfigError(f"vsock socket directory {self.vsock_uds.parent} does not exist")
            if len(os.fsencode(self.vsock_uds)) > 100:
                raise ConfigError(f"vsock socket path {self.vsock_uds} is too long for AF_UNIX")
        if self.net is not None:
            self.net.validate()
        if not 3 <= self.guest_cid < 0xFFFFFFFF:
            raise ConfigError(f"guest CID {self.guest_cid} is reserved: use 3 or more")
        if self.workload and self.rootfs is None:
            raise ConfigError(
                "a command to run needs --rootfs (the guest has nothing to run it with)"
            )
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus must be between 1 and {MAX_VCPUS}, not {self.vcpus}")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(
                f"--mem {self.mem_mib} MiB is out of range: from {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB"
            )
        from ember.arch.x86_64.cpuid import resolve_template  # see the module docstring

        resolve_template(self.cpu_template, pvm=False)  # ConfigError naming the choices
        cmdline = self.full_cmdline().encode()
        if len(cmdline) >= layout.CMDLINE_MAX_SIZE:
            raise ConfigError(
                f"kernel command line is {len(cmdline)} bytes; the limit is "
                f"{layout.CMDLINE_MAX_SIZE - 1}"
            )
        if b"\0" in cmdline:
            raise ConfigError("kernel command line contains a NUL byte")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable")
    if path.stat().st_size == 0:
        raise ConfigError(f"{what} {path} is empty")


@dataclass(frozen=True)
class RestoreConfig:
    """A snapshot to restore instead of booting: its devices and guest config come with it.

    Only the host sides are this process's own: ``vsock_uds`` (this sandbox's
    socket), ``guest_cid`` (None: the snapshot's), and the TAP a networked
    snapshot's virtio-net attaches to (``netns``: the namespace it lives in).
    """

    snapshot: Path
    vsock_uds: Path | None = None
    guest_cid: int | None = None
    tap: str | None = None
    netns: str | None = None

    def validate(self) -> None:
        if self.netns is not None and self.tap is None:
            raise ConfigError("--netns names where the TAP is: give --tap too")


@dataclass(frozen=True)
class ProcessConfig:
    """One VMM process: the machine it makes and how it runs it (see :mod:`ember.vmm.process`).

    ``control``: serve the control socket (snapshot, pause, balloon) at this path.
    ``jail``: once the VM is built, jail the process in this directory (the
    sandbox's); ``seccomp=False`` leaves a jailed VMM unfiltered (debugging only);
    ``debug_hooks`` adds the control socket's debug ops (tests of the jail).
    ``ready_file``: created once the VM is whole (and jailed) and about to run.
    ``park_idle``: pause the vCPUs after that many idle seconds (needs vsock).
    ``timeout``: stop the VM after that many seconds.
    ``owner_fd``: the read end of a pipe whose write end only the launcher holds (a cold
    boot's): when it reads end of file, the launcher is gone (even by SIGKILL) and the VM
    stops. A restored VMM needs none: the zygote's fork gives it a death signal.
    """

    machine: VmConfig | RestoreConfig
    control: Path | None = None
    jail: Path | None = None
    seccomp: bool = True
    debug_hooks: bool = False
    ready_file: Path | None = None
    park_idle: float | None = None
    timeout: float | None = None
    owner_fd: int | None = None


# --- JSON: how a ProcessConfig crosses a process boundary ------------------------------------
#
# Driven by the dataclasses' own annotations, so a field added to any of them travels without
# a line here (tests/unit/test_vmm_process.py round-trips one with every field set). Decoding
# is strict: an unknown key or a value of the wrong type is a ConfigError, never a guess.


def to_json(config: ProcessConfig) -> dict[str, Any]:
    """``config`` as plain JSON values (str, int, float, bool, None, lists and dicts)."""
    encoded: dict[str, Any] = _encode(config, ProcessConfig)
    return encoded


def from_json(data: object) -> ProcessConfig:
    """The inverse of :func:`to_json`: ``from_json(to_json(c)) == c`` for every config."""
    config: ProcessConfig = _decode(data, ProcessConfig, "config")
    return config


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _union_options(hint: Any) -> tuple[Any, ...] | None:
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return None


def _encode(value: Any, hint: Any) -> Any:
    options = _union_options(hint)
    if options is not None:
        if value is None:
            return None
        rest = [option for option in options if option is not type(None)]
        if len(rest) > 1:  # a choice of dataclasses: tagged with the class's name
            return {type(value).__name__: _encode(value, type(value))}
        return _encode(value, rest[0])
    if is_dataclass(hint):
        types_ = _field_types(hint)  # type: ignore[arg-type]
        return {f.name: _encode(getattr(value, f.name), types_[f.name]) for f in fields(hint)}
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        return [_encode(v, item) for v in value]
    if hint is Path:
        return str(value)
    return value


def _decode(data: Any, hint: Any, where: str) -> Any:
    options = _union_options(hint)
    if options is not None:
        if data is None and type(None) in options:
            return None
        rest = [option for option in options if option is not type(None)]
        if len(rest) == 1:
            return _decode(data, rest[0], where)
        if isinstance(data, dict) and len(data) == 1:
            ((tag, inner),) = data.items()
            for option in rest:
                if option.__name__ == tag:
                    return _decode(inner, option, where)
        names = " or ".join(option.__name__ for option in rest)
        raise ConfigError(f"VMM config: {where} must be one of {names}, tagged with its name")
    if is_dataclass(hint):
        if not isinstance(data, dict):
            raise ConfigError(f"VMM config: {where} must be an object")
        types_ = _field_types(hint)  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(types_))
        if unknown:
            raise ConfigError(f"VMM config: {where} has unknown fields {unknown}")
        values = {k: _decode(v, types_[k], f"{where}.{k}") for k, v in data.items()}
        try:
            return hint(**values)  # type: ignore[operator]
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"VMM config: {where}: {exc}") from None
    if get_origin(hint) is tuple:
        if not isinstance(data, list):
            raise ConfigError(f"VMM config: {where} must be a list")
        item = get_args(hint)[0]
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(data))
    if hint is Path:
        return Path(_expect(data, str, where))
    if hint is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if hint in (str, int, float, bool):
        return _expect(data, hint, where)
    raise TypeError(f"VMM config: no JSON form for {hint!r} ({where})")  # a new field's type


def _expect(data: Any, kind: type, where: str) -> Any:
    # bool is an int to isinstance: a flag must not pass for a count, nor a count for a flag.
    if type(data) is not kind:
        raise ConfigError(f"VMM config: {where} must be {kind.__name__}, not {data!r}")
    return data
