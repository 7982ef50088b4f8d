"""Entering a network namespace (``setns(2)`` with ``CLONE_NEWNET``).

Below both the devices and the jail: the TAP backend and the sandbox's DNS
resolver enter a sandbox's namespace for one ``open``/``bind`` and leave it
again, and the jail must not be needed to do that.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def set_net_namespace(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to; OSError if not."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
