"""Jailing the VMM process once its VM is built, before it runs guest code.

By then every file the VMM needs is open (``/dev/kvm``, the disk images, the
snapshot's memory mapped) and every socket bound, so the jail can take the
file system away almost entirely:

1. new mount, IPC, UTS and network namespaces (``unshare``; a child the
   zygote forked ahead of its request has left all but the mount namespace
   while it waited: :func:`leave_namespaces_ahead`); the PID
   namespace is entered at fork time by the zygote (a process cannot move
   itself and still start threads), so a VMM that managed to fork would not
   see the host's processes either;
2. the root becomes the sandbox's own directory (``chroot``), which holds
   only its sockets and console log; a symlink inside makes the directory's
   host path resolve to the new root, so vsock paths stay valid;
3. rlimits: no core dumps, a file-size cap (console and snapshot files),
   a bounded number of fds;
4. the environment is emptied and all privileges dropped: supplementary
   groups cleared, then gid and uid set to an unprivileged id of the
   sandbox's own (``JAIL_ID_BASE`` + the VMM's pid as the host sees it, so
   unique among live VMMs: not its pid inside its own PID namespace, which is
   1 for all of them), so two VMMs cannot signal or trace each other.

Seccomp comes last, per thread (:mod:`ember.jailer.seccomp`).  Everything
here is Linux-only and needs root (or CAP_SYS_ADMIN/CHROOT/SETUID).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from pathlib import Path

from ember.errors import ConfigError
from ember.network.netns import CLONE_NEWNET

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

JAIL_ID_BASE = 0x3B000000  # ~989 million: far above any real account's id
MAX_FDS = 8192

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
]  # fmt: skip
_libc.unshare.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ConfigError(f"jail: {what} failed: {os.strerror(err)} (the jail needs root)")


def host_pid(status: str | None = None) -> int:
    """This process's pid in the outermost PID namespace ``/proc`` shows (proc(5) NSpid).

    A jailed VMM is PID 1 of a namespace of its own, so ``getpid()`` is the
    same for all of them; the host's /proc, still mounted until the chroot,
    tells them apart.  ``status`` is ``/proc/self/status`` (given by tests).
    """
    if status is None:
        status = Path("/proc/self/status").read_text()
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "NSpid" and value.split():
            return int(value.split()[0])
    raise ConfigError(
        "jail: /proc/self/status has no NSpid line, so the VMM cannot pick a uid of its own "
        "(the jail needs Linux >= 4.1 with /proc mounted)"
    )


def jail_id(pid: int | None = None) -> int:
    """The uid and gid a jailed VMM runs as: unique among live VMMs (its host pid)."""
    return JAIL_ID_BASE + (pid if pid is not None else host_pid())


#: The namespaces :func:`enter` makes new, and those this process has already left ahead.
JAIL_NAMESPACES = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
AHEAD_NAMESPACES = CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
_left_ahead = 0


def leave_namespaces_ahead() -> None:
    """In the child forked ahead of a request: new IPC, UTS and network namespaces now, the
    ~1 ms of the jail's ``unshare`` that does not depend on the request (a new network
    namespace is most of it). Not the mount namespace: a copy of the host's mounts made now
    would miss a mount made before the request comes. A request whose TAP is in the host's
    own network namespace is not given to such a child (:func:`ember.zygote_fork.fits`)."""
    global _left_ahead
    _check(_libc.unshare(AHEAD_NAMESPACES), "unshare ahead")
    _left_ahead = AHEAD_NAMESPACES


def enter(root: Path, *, file_size_limit: int) -> int:
    """Jail the calling (single-threaded) process in ``root``; returns the uid it now runs as.

    ``root`` is the sandbox directory: it is given to the jail's uid so the
    VMM can still create and remove its sockets there.
    """
    root = root.resolve()
    uid = gid = jail_id()
    env_area = _environment_area()  # /proc is out of reach after the chroot
    _check(_libc.unshare(JAIL_NAMESPACES & ~_left_ahead), "unshare")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    inner = root / root.relative_to("/")  # the host path, recreated inside the new root
    inner.parent.mkdir(parents=True, exist_ok=True)
    if not inner.is_symlink():
        inner.symlink_to("/")
    _chown_tree(str(root), uid, gid)
    os.chroot(root)
    os.chdir("/")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full console is EFBIG, not a dead VMM
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(MAX_FDS, hard) if hard != resource.RLIM_INFINITY else MAX_FDS
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    _scrub_environment(env_area)
    death_signal = ctypes.c_int(0)
    _check(_libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0), "PR_GET_PDEATHSIG")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A change of uid or gid clears the parent-death signal (prctl(2)): without this, a VMM
    # outlived its zygote, and so the process that made the sandbox, when that process
    # ended without closing it (a script's last line, a crash). Armed again at once; a
    # parent gone in between is not seen from PID 1 of a namespace (getppid() is 0).
    if death_signal.value:
        _check(_libc.prctl(PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0), "PR_SET_PDEATHSIG")
    return uid


PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2


def _chown_tree(root: str, uid: int, gid: int) -> None:
    """``root`` and everything under it, symlinks themselves (not what they name). With
    ``os.scandir``, not ``Path.rglob``: the glob's first use in a fresh VMM (its pattern,
    its path objects) was ~1 ms of a ~25 ms restore; this is ~0.05 ms."""
    os.chown(root, uid, gid, follow_symlinks=False)
    directories = [root]
    while directories:
        with os.scandir(directories.pop()) as entries:
            for entry in entries:
                os.chown(entry.path, uid, gid, follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    directories.append(entry.path)


def _environment_area() -> tuple[int, int]:
    """Where the kernel put this process's initial environment strings (proc(5) stat 50-51)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[47]), int(fields[48])


def _scrub_environment(area: tuple[int, int]) -> None:
    """Forget the environment (the host app's secrets often live there), also in memory:
    ``/proc/PID/environ`` shows the original strings until they are overwritten."""
    os.environ.clear()
    start, end = area
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def enter_pid_namespace() -> None:
    """Continue in a child that is PID 1 of a new PID namespace; this process only relays.

    Called before the VM exists (KVM ties a VM to the process that made it)
    and before any thread starts (a process whose children go to another PID
    namespace may not start threads).  The parent forwards SIGTERM/SIGINT/
    SIGHUP and leaves with the child's status, or dies of the child's signal,
    so whoever started us sees exactly what the VMM did.
    """
    if os.getpid() == 1:
        return  # forked into a new PID namespace already (the zygote does that)
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    pid = os.fork()
    if pid == 0:
        _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        return
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: os.kill(pid, s))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be handled anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)
