"""Per-thread seccomp allow-lists for the VMM, through libseccomp (Debian ``libseccomp2``).

Each VMM thread installs the filter of its role once set-up is done: the
vCPU threads (``KVM_RUN`` and the device exits it dispatches), the event
thread (device queues, vsock sockets, the control socket and snapshots)
and the main thread (waiting, then tearing down).  Anything else kills the
whole process (``SECCOMP_RET_KILL_PROCESS``): the host sees the VMM die of
SIGSYS and reports that sandbox as crashed, naming seccomp.

The lists come from tracing jailed VMMs with ``strace -f`` through every
operation the SDK has (cold boot to a workload's exit, restore, exec, files,
run_code, data channels, guest connections to ``sb.listen``, balloon and its
statistics, status, pause/resume, memory channels, snapshot, fork, parking
and waking, a ``--timeout`` stop) plus what CPython itself needs (memory
management, locks, signals), each thread's calls counted by role.

What each role may do with files and sockets, beyond memory, locks, signals,
reads and writes on fds it already holds:

=========  ==============================================================
role       may also
=========  ==============================================================
vcpu       KVM_RUN and the exits' ioctls; epoll_ctl and TUNSETOFFLOAD
           (virtio-net activation); open files read-only
events     the snapshot ioctls; I/O on disks and snapshot fds (pread,
           pwrite, fallocate, ftruncate, fsync); AF_UNIX sockets
           (socket, connect, accept, send, recv); timerfds; open files
           read-only
main       unlink (its vsock and control sockets at teardown; unlinkat
           without AT_REMOVEDIR); create one write-only file (the ready
           file: ``O_WRONLY|O_CREAT``, no ``O_TRUNC``); open read-only
=========  ==============================================================

``openat`` is filtered on its flags: read-only opens stay allowed everywhere
(CPython reads source files to format a traceback, and logging may read the
time zone), which the chroot confines to the sandbox's own directory; no
thread may open for writing, truncate or create but the main thread's one
``O_WRONLY|O_CREAT``.  No thread may rename, make directories or remove
them (none does once jailed: snapshots travel as fds the host opened, and
socket files are bound before the jail).  ioctl is limited to the KVM
requests each role makes, and ``socket`` to ``AF_UNIX`` (the vsock and
control sockets): no IP, netlink or AF_VSOCK socket, which would ignore the
network namespace and reach the host's own vsock services.  ``connect`` and
``sendto`` then only ever see Unix sockets (the TAP is a character device
opened before the filter, not a socket).

The threads share one address space, so against an attacker who can run
code in the VMM (not just steer it) the filters act as their union: one
thread can make another do its calls.  The per-role split still narrows
what guest-driven code can reach without such a foothold: everything the
guest influences (register accesses on the vCPU threads, queues and sockets
on the event thread) runs on a thread that cannot unlink or create files;
the main thread, which can, runs no guest-driven code: it waits for a stop
reason and tears down.  The union is what the chroot, the uid of its own
and the namespaces are sized for: it may create and remove files only in
the sandbox's directory, within ``RLIMIT_FSIZE``.

libseccomp is loaded with ctypes, so the VMM core keeps to the standard
library; without the shared library the jail refuses to start unless
seccomp is explicitly turned off (``--no-seccomp``, for debugging only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import socket

from ember.errors import ConfigError
from ember.kvm import abi
from ember.network.if_tun import TUNSETOFFLOAD

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7  # (arg & datum_a) == datum_b
INT_MASK = 0xFFFF_FFFF  # the kernel reads an int argument from the register's low 32 bits

# The only address family the VMM may create sockets of after set-up (socket(2)'s first
# argument): the muxer connects to <uds>_PORT and the control socket accepts, both AF_UNIX.
SOCKET_FAMILIES: tuple[int, ...] = (socket.AF_UNIX,)


class scmp_arg_cmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class Role(enum.Enum):
    VCPU = "vcpu"
    EVENTS = "events"
    MAIN = "main"


# What CPython and glibc need on any thread: memory, locks, signals, time, exit, logging.
_COMMON = (
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    "futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
    "rt_sigprocmask", "rt_sigreturn", "rt_sigaction", "sigaltstack", "restart_syscall",
    "getpid", "gettid", "getrandom", "rseq", "set_robust_list",
    "exit", "exit_group", "write", "writev", "close",
    "openat", "read", "newfstatat", "fstat", "lseek", "fcntl", "getcwd", "readlink",
)  # fmt: skip
# openat is allowed only with the flags of _OPEN_FLAGS (checked in _build).

_EXTRA: dict[Role, tuple[str, ...]] = {
    # Serial output and interrupt eventfds are writes; a kick is a tgkill to itself;
    # virtio-net watches its TAP (epoll_ctl) when the driver starts or resets it.
    Role.VCPU: ("ioctl", "tgkill", "epoll_ctl"),
    Role.EVENTS: (
        "ioctl", "tgkill", "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll",
        "select", "pselect6",
        "pread64", "pwrite64", "preadv", "preadv2", "pwritev", "pwritev2", "readv",
        "fsync", "fdatasync", "fallocate", "ftruncate",
        "socket", "connect", "accept", "accept4", "recvfrom", "recvmsg", "sendto", "sendmsg",
        "shutdown", "getsockname", "getsockopt", "setsockopt",
        "timerfd_settime", "timerfd_gettime",
    ),
    # Teardown removes the vsock and control socket files (unlinkat: without AT_REMOVEDIR).
    Role.MAIN: ("ioctl", "tgkill", "epoll_ctl", "unlink", "unlinkat"),
}  # fmt: skip

# openat(dirfd, path, flags, mode): the flag bits that decide what an open may do to a file.
O_ACCMODE = 3
_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY  # O_TMPFILE includes O_DIRECTORY
OPEN_EFFECT_BITS = O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND | _O_TMPFILE_BIT
OPEN_READ_ONLY = os.O_RDONLY
OPEN_CREATE_WRITE_ONLY = os.O_WRONLY | os.O_CREAT  # the ready file (created, never truncated)

# ``flags & OPEN_EFFECT_BITS`` must be one of these (other bits, O_CLOEXEC etc., are free).
_OPEN_FLAGS: dict[Role, tuple[int, ...]] = {
    Role.VCPU: (OPEN_READ_ONLY,),
    Role.EVENTS: (OPEN_READ_ONLY,),
    Role.MAIN: (OPEN_READ_ONLY, OPEN_CREATE_WRITE_ONLY),
}

# The KVM ioctls each role issues after set-up (vCPU: run, the exit paths, the serial IRQ).
_IOCTLS: dict[Role, tuple[int, ...]] = {
    Role.VCPU: (abi.KVM_RUN, abi.KVM_GET_REGS, abi.KVM_IRQ_LINE),
    Role.EVENTS: (
        abi.KVM_GET_REGS, abi.KVM_GET_SREGS, abi.KVM_GET_FPU, abi.KVM_GET_LAPIC,
        abi.KVM_GET_MSRS, abi.KVM_GET_MSR_INDEX_LIST, abi.KVM_CHECK_EXTENSION,
        abi.KVM_GET_MP_STATE, abi.KVM_GET_VCPU_EVENTS, abi.KVM_GET_DEBUGREGS,
        abi.KVM_GET_XSAVE, abi.KVM_GET_XCRS, abi.KVM_GET_TSC_KHZ,
        abi.KVM_GET_IRQCHIP, abi.KVM_GET_PIT2, abi.KVM_GET_CLOCK, abi.KVM_IRQ_LINE,
    ),
    Role.MAIN: (abi.KVM_GET_REGS,),
}  # fmt: skip


class _Lib:
    _instance: _Lib | None = None

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            raise ConfigError(
                "libseccomp is not installed (Debian: apt install libseccomp2); "
                "the VMM will not run unfiltered unless you pass --no-seccomp"
            ) from None
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(scmp_arg_cmp),
        ]  # fmt: skip
        lib.seccomp_rule_add_array.restype = ctypes.c_int
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_load.restype = ctypes.c_int
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_export_bpf.restype = ctypes.c_int
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        self.lib = lib

    @classmethod
    def get(cls) -> _Lib:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def syscall_names(role: Role) -> tuple[str, ...]:
    return tuple(sorted(set(_COMMON) | set(_EXTRA[role])))


def preload() -> None:
    """Load libseccomp and compile the filters before the chroot (the library is outside)."""
    precompile()


_compiled: dict[Role, bytes] = {}
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def precompile() -> None:
    """Compile every role's filter now (the zygote does, so no VMM pays ~1.5 ms per role)."""
    for role in Role:
        program(role)


def program(role: Role) -> bytes:
    """``role``'s filter as classic BPF (struct sock_filter[]), compiled once per process."""
    if role not in _compiled:
        read_end, write_end = os.pipe()
        try:
            lib = _Lib.get().lib
            ctx = _build(lib, role)
            try:
                _check(lib.seccomp_export_bpf(ctx, write_end), "seccomp_export_bpf")
            finally:
                lib.seccomp_release(ctx)
            os.close(write_end)
            write_end = -1
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
            _compiled[role] = b"".join(chunks)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    return _compiled[role]


def install(role: Role) -> None:
    """Confine the calling thread (and any thread it starts) to ``role``'s allow-list."""
    code = program(role)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = sock_fprog(len(code) // 8, ctypes.addressof(buf))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise ConfigError(f"seccomp: PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise ConfigError(f"seccomp: loading the filter failed: {os.strerror(ctypes.get_errno())}")


def _build(lib: ctypes.CDLL, role: Role) -> int:
    ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS)
    if not ctx:
        raise ConfigError("seccomp_init failed")
    try:
        for name in syscall_names(role):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a syscall on this architecture (e.g. select on arm64)
            if name == "socket":
                for family in SOCKET_FAMILIES:
                    cmp = scmp_arg_cmp(0, SCMP_CMP_MASKED_EQ, INT_MASK, family)
                    _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, cmp), name)
                continue
            if name == "openat":
                for flags in _OPEN_FLAGS[role]:
                    cmp = scmp_arg_cmp(2, SCMP_CMP_MASKED_EQ, OPEN_EFFECT_BITS, flags)
                    _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, cmp), name)
                continue
            if name == "unlinkat":  # files only: AT_REMOVEDIR (rmdir) is not allowed
                cmp = scmp_arg_cmp(2, SCMP_CMP_MASKED_EQ, INT_MASK, 0)
                _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, cmp), name)
                continue
            if name == "ioctl":
                for request in _IOCTLS[role]:
                    cmp = scmp_arg_cmp(1, SCMP_CMP_EQ, request, 0)
                    _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, cmp), name)
                _allow_non_kvm_ioctls(lib, ctx, number)
                continue
            _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None), name)
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return int(ctx)


# Terminal and socket ioctls CPython may issue (isatty on the console, FIONBIO),
# and virtio-net's TUNSETOFFLOAD when the guest driver starts the device.
_TCGETS = 0x5401
_FIONBIO = 0x5421
_FIOCLEX = 0x5451


def _allow_non_kvm_ioctls(lib: ctypes.CDLL, ctx: int, number: int) -> None:
    for request in (_TCGETS, _FIONBIO, _FIOCLEX, TUNSETOFFLOAD):
        cmp = scmp_arg_cmp(1, SCMP_CMP_EQ, request, 0)
        _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, cmp), "ioctl")


def _check(result: int, what: str) -> None:
    if result < 0:
        raise ConfigError(f"seccomp: adding {what} failed: {os.strerror(-result)}")
