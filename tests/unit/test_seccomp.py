"""The seccomp allow-lists, enforced by the real kernel in a forked child (no KVM needed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
from collections.abc import Callable

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


def test_a_vcpu_thread_may_start_virtio_net_but_not_make_taps() -> None:
    """Activation (on the vCPU thread) sets the TAP's offloads and watches its fd."""
    from ember.devices.virtio.net.tap import TUNSETIFF, TUNSETOFFLOAD

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
