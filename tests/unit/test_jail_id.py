"""The jailed VMM's uid: unique per VMM, though every VMM is PID 1 of its own PID namespace."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

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


def test_the_sandbox_directory_is_given_to_the_jails_uid_but_nothing_a_link_names(
    tmp_path: Path,
) -> None:
    """Everything in the sandbox's directory becomes the jail's (its sockets, its console);
    a symlink placed there is chowned itself, never the host file it points at."""
    outside = tmp_path / "host-file"
    outside.write_text("root's")
    root = tmp_path / "sandbox"
    (root / "deeper" / "still").mkdir(parents=True)
    (root / "console.log").write_text("")
    (root / "deeper" / "still" / "vsock.sock").write_text("")
    (root / "link").symlink_to(outside)
    (root / "deeper" / "dirlink").symlink_to(tmp_path)
    uid = gid = JAIL_ID_BASE + 12345
    jail._chown_tree(str(root), uid, gid)
    inside = [root, *root.rglob("*")]
    assert len(inside) == 7
    for path in inside:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (uid, gid), path
    assert outside.stat().st_uid == os.getuid()  # not followed
    assert tmp_path.stat().st_uid == os.getuid()
