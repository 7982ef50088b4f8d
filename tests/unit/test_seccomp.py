"""The seccomp allow-lists, enforced by the real kernel in a forked child (no KVM needed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.jailer import seccomp
from ember.jailer.seccomp import Role
from ember.kvm import abi


def in_confined_child(role: Role, action: Callable[[], object]) -> int:
    """Fork, confine the child to ``role``, run ``action``: the child's exit code (or -signal)."""
    pid = os.fork()
    if pid == 0:
        try:
            seccomp.install(role)
            action()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_allowed_calls_work_under_every_role() -> None:
    for role in Role:
        assert in_confined_child(role, lambda: (os.getpid(), os.write(2, b""))) == 0, role


@pytest.mark.parametrize("role", list(Role))
def test_exec_is_killed_with_sigsys(role: Role) -> None:
    assert in_confined_child(role, lambda: os.execv("/bin/true", ["true"])) == -signal.SIGSYS


def test_only_the_event_thread_may_open_sockets() -> None:
    assert in_confined_child(Role.EVENTS, lambda: socket.socket(socket.AF_UNIX).close()) == 0
    assert in_confined_child(Role.VCPU, lambda: socket.socket(socket.AF_UNIX)) == -signal.SIGSYS


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        (socket.AF_UNIX, socket.SOCK_STREAM),
        (socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK),
    ],
)
def test_the_event_thread_may_open_unix_sockets(family: int, kind: int) -> None:
    assert in_confined_child(Role.EVENTS, lambda: socket.socket(family, kind).close()) == 0


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        pytest.param(socket.AF_INET, socket.SOCK_STREAM, id="inet"),
        pytest.param(socket.AF_INET6, socket.SOCK_DGRAM, id="inet6"),
        # AF_VSOCK ignores network namespaces: it would reach the host's own vsock services
        pytest.param(socket.AF_VSOCK, socket.SOCK_STREAM, id="vsock"),
        pytest.param(socket.AF_NETLINK, socket.SOCK_RAW, id="netlink"),
        pytest.param(socket.AF_PACKET, socket.SOCK_RAW, id="packet"),
    ],
)
@pytest.mark.parametrize("role", list(Role))
def test_no_thread_may_open_a_socket_of_another_family(role: Role, family: int, kind: int) -> None:
    def make() -> None:  # closed at once: an unclosed socket's warning calls getpeername
        socket.socket(family, kind).close()

    assert in_confined_child(role, make) == -signal.SIGSYS


def test_the_family_is_read_as_the_kernel_reads_an_int() -> None:
    """Garbage in the upper half of the register neither smuggles AF_INET through nor kills
    an AF_UNIX socket (the kernel looks at the low 32 bits only)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr_socket = 41  # x86_64

    def raw_socket(family: int) -> None:
        fd = libc.syscall(ctypes.c_long(nr_socket), ctypes.c_long(family),
                          ctypes.c_long(socket.SOCK_STREAM), ctypes.c_long(0))  # fmt: skip
        if fd < 0:
            raise OSError(ctypes.get_errno(), "socket")
        os.close(fd)

    assert in_confined_child(Role.EVENTS, lambda: raw_socket((1 << 32) | socket.AF_UNIX)) == 0
    assert (
        in_confined_child(Role.EVENTS, lambda: raw_socket((1 << 32) | socket.AF_INET))
        == -signal.SIGSYS
    )


def test_ioctl_is_limited_to_the_roles_requests() -> None:
    def kvm_run_on_devnull() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, abi.KVM_RUN)
        except OSError:  # allowed by the filter; /dev/null just does not know it
            pass

    def create_vm_on_devnull() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        fcntl.ioctl(fd, abi.KVM_CREATE_VM)

    assert in_confined_child(Role.VCPU, kvm_run_on_devnull) == 0
    assert in_confined_child(Role.VCPU, create_vm_on_devnull) == -signal.SIGSYS
    assert in_confined_child(Role.EVENTS, kvm_run_on_devnull) == -signal.SIGSYS


def test_role_lists_are_distinct_and_exclude_process_creation() -> None:
    for role in Role:
        names = seccomp.syscall_names(role)
        assert not {"execve", "execveat", "fork", "vfork", "clone", "clone3", "ptrace"} & set(names)
    assert "socket" in seccomp.syscall_names(Role.EVENTS)
    assert "socket" not in seccomp.syscall_names(Role.VCPU)
    changes_names = {
        "mkdir", "mkdirat", "rename", "renameat", "renameat2", "rmdir", "link", "linkat",
        "symlink", "symlinkat", "chmod", "fchmodat", "chown", "open",
    }  # fmt: skip
    for role in Role:
        assert not changes_names & set(seccomp.syscall_names(role)), role
    unlinkers = [r for r in Role if {"unlink", "unlinkat"} & set(seccomp.syscall_names(r))]
    assert unlinkers == [Role.MAIN]


def test_a_vcpu_thread_may_start_virtio_net_but_not_make_taps() -> None:
    """Activation (on the vCPU thread) sets the TAP's offloads and watches its fd."""
    from ember.network.if_tun import TUNSETIFF, TUNSETOFFLOAD

    poller = select.epoll()  # made before confinement, as the VMM's event loop and TAP are
    tap, other_end = os.pipe()

    def watch() -> None:
        poller.register(tap, select.EPOLLIN)
        poller.unregister(tap)

    def set_offload() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        with contextlib.suppress(OSError):  # /dev/null is no TAP; the filter let it through
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)

    def make_tap() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        fcntl.ioctl(fd, TUNSETIFF, bytes(40))

    try:
        assert in_confined_child(Role.VCPU, watch) == 0
        assert in_confined_child(Role.VCPU, set_offload) == 0
        assert in_confined_child(Role.VCPU, make_tap) == -signal.SIGSYS
    finally:
        poller.close()
        os.close(tap)
        os.close(other_end)


# -- files: openat by its flags; no rename, mkdir or rmdir anywhere; unlink on main only ------


def _open(path: str, flags: int) -> Callable[[], None]:
    def action() -> None:
        os.close(os.open(path, flags | os.O_CLOEXEC, 0o600))

    return action


@pytest.mark.parametrize("role", list(Role))
def test_every_role_may_open_read_only(role: Role) -> None:
    """CPython reads source files to format a traceback (and logging the time zone)."""
    assert in_confined_child(role, _open(__file__, os.O_RDONLY)) == 0
    assert in_confined_child(role, lambda: open(__file__, "rb").close()) == 0
    assert in_confined_child(role, _open(os.path.dirname(__file__), os.O_DIRECTORY)) == 0


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(os.O_RDWR, id="rdwr"),
        pytest.param(os.O_WRONLY | os.O_TRUNC, id="trunc"),
        pytest.param(os.O_WRONLY | os.O_APPEND, id="append"),
        pytest.param(os.O_RDWR | os.O_CREAT, id="rdwr-creat"),
        pytest.param(os.O_RDONLY | os.O_TRUNC, id="rdonly-trunc"),
        pytest.param(os.O_WRONLY | os.O_CREAT | os.O_TRUNC, id="creat-trunc"),
        pytest.param(os.O_TMPFILE | os.O_RDWR, id="tmpfile"),
    ],
)
def test_no_role_may_open_for_writing_otherwise(role: Role, flags: int, tmp_path: Path) -> None:
    path = str(tmp_path if flags & os.O_TMPFILE == os.O_TMPFILE else tmp_path / "f")
    assert in_confined_child(role, _open(path, flags)) == -signal.SIGSYS


def test_only_main_may_create_its_ready_file(tmp_path: Path) -> None:
    """``O_WRONLY|O_CREAT`` (the ready file), main only."""
    flags = os.O_WRONLY | os.O_CREAT
    assert in_confined_child(Role.VCPU, _open(str(tmp_path / "v"), flags)) == -signal.SIGSYS
    assert in_confined_child(Role.EVENTS, _open(str(tmp_path / "e"), flags)) == -signal.SIGSYS
    assert not (tmp_path / "v").exists() and not (tmp_path / "e").exists()
    assert in_confined_child(Role.MAIN, _open(str(tmp_path / "ready"), flags)) == 0
    assert (tmp_path / "ready").exists()


@pytest.mark.parametrize("role", list(Role))
def test_no_role_may_rename_or_make_or_remove_directories(role: Role, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "d").mkdir()
    actions = {
        "rename": lambda: os.rename(tmp_path / "a", tmp_path / "b"),
        "mkdir": lambda: os.mkdir(tmp_path / "n"),
        "rmdir": lambda: os.rmdir(tmp_path / "d"),
        "rmdir-at": lambda: _unlinkat(str(tmp_path / "d"), AT_REMOVEDIR),
    }
    for name, action in actions.items():
        assert in_confined_child(role, action) == -signal.SIGSYS, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]


AT_REMOVEDIR = 0x200


def _unlinkat(path: str, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unlinkat(-100, path.encode(), flags) != 0:  # AT_FDCWD
        raise OSError(ctypes.get_errno(), "unlinkat")


def test_only_main_may_unlink_files(tmp_path: Path) -> None:
    """Teardown (main thread) removes the vsock and control sockets; nothing else unlinks."""
    for name in ("v", "e", "m", "m2"):
        (tmp_path / name).write_bytes(b"")
    assert in_confined_child(Role.VCPU, lambda: os.unlink(tmp_path / "v")) == -signal.SIGSYS
    assert in_confined_child(Role.EVENTS, lambda: os.unlink(tmp_path / "e")) == -signal.SIGSYS
    assert in_confined_child(Role.MAIN, lambda: os.unlink(tmp_path / "m")) == 0
    assert in_confined_child(Role.MAIN, lambda: _unlinkat(str(tmp_path / "m2"), 0)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "v"]
