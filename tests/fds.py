"""The process's open descriptors, for tests that check a teardown closed everything."""

from __future__ import annotations

import os


def open_fds() -> set[tuple[int, str]]:
    """Each open descriptor with what it refers to.

    Compare with set difference (``open_fds() - before``): a descriptor another thread closed
    meanwhile is not a leak, and a number it freed that a leak took again still differs by
    its target.
    """
    found: set[tuple[int, str]] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except FileNotFoundError:  # the listing's own descriptor, or one closed meanwhile
            pass
    return found
