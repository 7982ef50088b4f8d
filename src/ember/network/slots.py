"""Sandbox network slots: which /30, namespace and veth a sandbox gets, held by a lock file.

A slot K is the addresses 10.253.0.0/16 + 4K .. 4K+3, the namespace
``ember-K`` and the veth ``emberK``.  It belongs to whoever holds the
``flock`` on ``/run/ember/net/K.lock`` (one process, one open file): the
flock dies with its holder, so a crashed owner's slot becomes free by
itself, and what it left is removed before anyone builds in it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import signal
import subprocess

from ember.errors import SandboxError
from ember.network.commands import _run

POOL = ipaddress.IPv4Network("10.253.0.0/16")  # /30 per sandbox: 16384 of them
SLOTS = POOL.num_addresses // 4
NETNS_DIR = "/run/netns"
LOCK_DIR = "/run/ember/net"
NS_PREFIX = "ember-"
VETH_PREFIX = "ember"


def _claim_slot() -> tuple[int, int]:
    """A free slot and the lock that holds it.

    Slots are claimed with an exclusive ``flock`` on ``/run/ember/net/K.lock``,
    held for the sandbox's life: a namespace whose lock is free belongs to
    an owner that died without cleaning up, and is removed (:func:`_clean_stale`);
    the slot then gets a new one, never the old one again.
    """
    os.makedirs(NETNS_DIR, exist_ok=True)
    os.makedirs(LOCK_DIR, exist_ok=True)
    start = random.randrange(SLOTS)
    for i in range(SLOTS):
        slot = (start + i) % SLOTS
        fd = os.open(f"{LOCK_DIR}/{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _clean_stale(slot)
        except BaseException:
            os.close(fd)
            raise
        return slot, fd
    raise SandboxError(f"all {SLOTS} sandbox network slots are in use")


def _clean_stale(slot: int) -> None:
    """Remove what a dead owner left in ``slot``: the processes in its namespace (killed:
    they would keep it, its TAP and its rules alive), the namespace's name, and the host
    end of its veth, which outlives the name while anything holds the namespace."""
    name, veth = f"{NS_PREFIX}{slot}", f"{VETH_PREFIX}{slot}"
    if os.path.exists(f"{NETNS_DIR}/{name}"):
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "delete", name], "")
    _delete_link(veth)


def _delete_link(name: str) -> None:
    """Delete the host link ``name`` if it is there.

    The host end of a veth dies with its namespace, and a namespace dies
    asynchronously once its last process has exited (the kernel's netns
    clean-up work), so the link can vanish between a look and the ``ip``
    call: that is the outcome wanted, not a failure.
    """
    if not os.path.exists(f"/sys/class/net/{name}"):
        return
    try:
        _run(["ip", "link", "delete", name], "")
    except SandboxError:
        if os.path.exists(f"/sys/class/net/{name}"):
            raise
