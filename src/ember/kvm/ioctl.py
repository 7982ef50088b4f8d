"""Raw ioctl calls, translating errno into :class:`KvmError`.

``fcntl.ioctl`` parses an integer argument as a signed C int, so arguments
such as ``KVM_SET_TSS_ADDR``'s 0xfffbd000 go through libc's ``ioctl`` via
ctypes instead.  Both release the GIL, which lets vCPU threads sit in
``KVM_RUN`` while other threads work.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

from ember.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl_int(fd: int, request: int, arg: int = 0, *, what: str = "") -> int:
    """An ioctl whose argument is an integer (or none); returns the result."""
    result: int = _libc.ioctl(fd, request, ctypes.c_void_p(arg))
    if result < 0:
        err = ctypes.get_errno()
        raise KvmError(f"{what or hex(request)} failed: {os.strerror(err)}") from OSError(
            err, os.strerror(err)
        )
    return result


def ioctl_run(fd: int, request: int) -> int:
    """``KVM_RUN``: returns 0, or the errno (EINTR/EAGAIN) instead of raising."""
    result: int = _libc.ioctl(fd, request, None)
    if result < 0:
        return ctypes.get_errno()
    return 0


def ioctl_buf(fd: int, request: int, buf: Any, *, what: str = "") -> int:
    """An ioctl on a ctypes struct, which the kernel may read and fill in."""
    try:
        result: int = fcntl.ioctl(fd, request, buf, True)
        return result
    except OSError as exc:
        name = what or hex(request)
        if exc.errno == errno.E2BIG:
            raise KvmError(f"{name} failed: buffer too small (E2BIG)") from exc
        raise KvmError(f"{name} failed: {exc.strerror}") from exc
