"""A process's file descriptors as a limit on how many sandboxes it holds.

Each live sandbox holds about :data:`FDS_PER_SANDBOX` descriptors in the process that made it
(its pidfd, the channel server's wake-up, the shared region's doorbell eventfds, a kept agent
connection), so ``RLIMIT_NOFILE`` caps the sandboxes of one SDK process or daemon. Reaching it
must be one clear error, not an ``OSError`` from deep inside or a connection that looks broken.
"""

from __future__ import annotations

import contextlib
import errno
import resource
from collections.abc import Iterator

from ember.errors import SandboxError

__all__ = ["FDS_PER_SANDBOX", "descriptors_checked", "out_of_descriptors"]

FDS_PER_SANDBOX = 12  # measured: pidfd, wake eventfd, 8 doorbells, 1-2 connections


def out_of_descriptors(exc: OSError) -> SandboxError | None:
    """``EMFILE``/``ENFILE`` as one SandboxError that says what ran out and what lifts it.

    None for any other error.
    """
    if exc.errno not in (errno.EMFILE, errno.ENFILE):
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    whose = "the host's" if exc.errno == errno.ENFILE else "this process's"
    return SandboxError(
        f"{whose} file descriptors are used up (RLIMIT_NOFILE {soft}, hard {hard}; each live "
        f"sandbox holds about {FDS_PER_SANDBOX}): close sandboxes, or raise the limit "
        "(ulimit -n; resource.setrlimit)"
    )


@contextlib.contextmanager
def descriptors_checked() -> Iterator[None]:
    """Raise :func:`out_of_descriptors`' error for an ``EMFILE`` in the block."""
    try:
        yield
    except OSError as exc:
        error = out_of_descriptors(exc)
        if error is None:
            raise
        raise error from exc
