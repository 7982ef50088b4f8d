"""The jailed VMM's uid: unique per VMM, though every VMM is PID 1 of its own PID namespace."""

from __future__ import annotations

import ctypes
import os

import pytest

from ember.errors import ConfigError
from ember.jailer import jail
from ember.jailer.jail import JAIL_ID_BASE, host_pid, jail_id

CLONE_NEWUSER = 0x10000000


def test_host_pid_is_the_outermost_nspid() -> None:
    status = "Name:\tpython3\nPid:\t1\nNSpid:\t48213\t7\t1\nUid:\t0\t0\t0\t0\n"
    assert host_pid(status) == 48213
    assert host_pid() == os.getpid()  # the tests run in the namespace /proc belongs to


def test_no_nspid_line_names_the_requirement() -> None:
    with pytest.raises(ConfigError, match="NSpid"):
        host_pid("Name:\tpython3\nPid:\t1\n")


def _ids_in_new_pid_namespace() -> tuple[int, int, int]:
    """(pid inside, jail_id() inside, pid as the host sees it) of a child that is PID 1 of a
    new PID namespace, as a zygote-forked VMM is."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        status = 1
        try:
            os.close(read_end)
            flags = jail.CLONE_NEWPID | (CLONE_NEWUSER if os.geteuid() != 0 else 0)
            if ctypes.CDLL(None, use_errno=True).unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            child = os.fork()
            if child == 0:
                os.write(write_end, f"{os.getpid()} {jail_id()} ".encode())
                os._exit(0)
            os.waitpid(child, 0)
            os.write(write_end, f"{child}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    _, status = os.waitpid(middle, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    inside, uid, seen = (int(word) for word in data.split())
    return inside, uid, seen


def test_two_vmms_that_are_both_pid_1_get_different_ids() -> None:
    first, second = _ids_in_new_pid_namespace(), _ids_in_new_pid_namespace()
    assert first[0] == second[0] == 1  # getpid() cannot tell them apart
    assert first[1] == JAIL_ID_BASE + first[2]
    assert second[1] == JAIL_ID_BASE + second[2]
    assert first[1] != second[1]
