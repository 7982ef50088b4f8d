"""The per-role seccomp filters on a live jailed VMM: each thread runs its role's program, and
the whole life cycle works under them.

The filters' semantics (what each role may call, with which arguments) are tested against the
real kernel in ``tests/unit/test_seccomp.py``; here the programs a running VMM installed are read
back from the kernel (``PTRACE_SECCOMP_GET_FILTER``, root only) and compared with those.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from ember.jailer import seccomp
from ember.jailer.seccomp import Role
from ember.sandbox import Sandbox
from ember.templates import templates_root
from tests.integration.conftest import Images

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000  # __WALL: wait for threads too

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


@pytest.fixture(scope="module", autouse=True)
def as_root(images: Images) -> None:
    if os.geteuid() != 0:
        pytest.fail("the jail tests need root (the jail itself does)")


def installed_filters(tid: int) -> list[bytes]:
    """The seccomp programs attached to thread ``tid``, newest first (stops it for a moment)."""
    if _libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {tid}")
    try:
        if _libc.ptrace(PTRACE_INTERRUPT, tid, None, None) != 0:
            raise OSError(ctypes.get_errno(), f"PTRACE_INTERRUPT {tid}")
        os.waitpid(tid, WALL)
        programs = []
        for index in range(8):
            count = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, None)
            if count < 0:
                break  # ENOENT: no more filters
            buf = ctypes.create_string_buffer(count * 8)
            got = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, buf)
            assert got == count
            programs.append(buf.raw)
        return programs
    finally:
        _libc.ptrace(PTRACE_DETACH, tid, None, None)


def thread_roles(pid: int) -> dict[int, Role]:
    """Each thread of VMM ``pid`` by the role whose program it installed (exactly one)."""
    by_program = {seccomp.program(role): role for role in Role}
    assert len(by_program) == len(Role)  # the three programs differ
    roles = {}
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        if Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith("kvm-"):
            # KVM's own worker (kvm-nx-lpage-recovery): a kernel thread in the VM's process,
            # made from a vCPU thread (whose filter it copies); it never runs user code.
            continue
        programs = installed_filters(tid)
        assert len(programs) == 1, f"thread {tid} has {len(programs)} filters"
        assert programs[0] in by_program, f"thread {tid} runs an unknown filter"
        roles[tid] = by_program[programs[0]]
    return roles


def test_each_vmm_thread_runs_its_roles_filter(images: Images) -> None:
    with Sandbox() as sb:
        assert sb.exec(["true"]).exit_code == 0
        pid = sb._vmm.vmm_pid
        assert pid is not None
        roles = thread_roles(pid)
        assert roles[pid] is Role.MAIN
        vcpus = len(sb._vmm.control("status")["vcpu_cpu_s"])
        assert vcpus >= 1
        assert Counter(roles.values()) == {Role.MAIN: 1, Role.EVENTS: 1, Role.VCPU: vcpus}
        # Each thread's name in the kernel (top -H, perf) says the same role.
        names = {tid: Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for tid in roles}
        expected = {Role.MAIN: "ember-vmm", Role.EVENTS: "ember-events", Role.VCPU: "ember-vcpu"}
        for tid, role in roles.items():
            assert names[tid].startswith(expected[role]), (role, names[tid])
        # Stopping and resuming every thread did the VMM no harm.
        assert sb.exec(["echo", "still here"]).stdout == b"still here\n"


def test_the_life_cycle_works_under_the_narrowed_filters(images: Images) -> None:
    """Everything a jailed VMM serves: exec, files, run_code, balloon, status, snapshot (a
    template), fork, parking and waking, restore from the new template."""
    name = f"seccomp-roles-{os.getpid()}"
    try:
        with Sandbox() as sb:
            assert sb.exec(["echo", "hi"]).stdout == b"hi\n"
            sb.files.write("/tmp/data", b"x" * 200_000)
            assert sb.files.read("/tmp/data") == b"x" * 200_000
            sb.files.remove("/tmp/data")
            assert sb.run_code("6 * 7").value == "42"
            assert sb.set_memory(448) <= 448
            assert "available_memory" in sb.memory_stats()
            sb.set_memory(512)
            assert sb._vmm.control("status")["ok"]
            sb.snapshot(name)
            with sb.fork() as child:
                assert child.exec(["echo", "child"]).stdout == b"child\n"
            time.sleep(2.5)  # parked after 1 s idle; the next request wakes it
            assert sb.exec(["echo", "woken"]).stdout == b"woken\n"
            assert not sb._vmm.exited()
        with Sandbox(template=name) as sb:
            assert sb.exec(["echo", "restored"]).stdout == b"restored\n"
    finally:
        shutil.rmtree(templates_root() / name, ignore_errors=True)
