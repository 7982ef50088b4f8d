"""The common commands' files read into the guest's page cache, once, in the template.

A restored sandbox starts with the template's page cache, and that holds only what the
template's boot used: the agent, python3, numpy. The first ``ls`` or ``bash`` of every sandbox
then reads its binary and libraries from the disk, and on this host each page read costs the
emulated guest kernel (the block request, ext4, the page cache insertion, the interrupt):
0.1-0.7 s on a command's first run, measured, on top of the ~0.6-1.5 s every run costs. Read
here, before the snapshot, the pages are already in every restored copy's memory, shared with
the template like the rest of it.

Which files: the binaries of :data:`COMMAND_PACKAGES` and the shared libraries of
:data:`LIBRARY_PACKAGES` (what those binaries link, ``ldd``), as dpkg lists them; each file is
read with ``POSIX_FADV_WILLNEED`` (the kernel's readahead, no copy into this process). About
180 files, 17 MB, in Debian 12; the template build waits for the guest to go idle before
its snapshot, so the reads are done by then. A package that is not installed is skipped, and
so is a path that is not a regular file under :data:`WARM_DIRS`.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

__all__ = ["COMMAND_PACKAGES", "LIBRARY_PACKAGES", "Warmed", "files_of", "warm"]

#: The commands a sandbox's user runs most: coreutils, the shells, grep, sed, find, tar...
COMMAND_PACKAGES = (
    "coreutils", "bash", "dash", "grep", "sed", "findutils", "tar", "gzip", "diffutils",
    "debianutils", "mawk", "hostname",
)  # fmt: skip
#: What those link (``ldd`` on each binary, Debian 12), libc's own libraries included.
LIBRARY_PACKAGES = (
    "libc6", "libselinux1", "libpcre2-8-0", "libacl1", "libattr1", "libtinfo6", "libgmp10",
    "libcrypt1", "libcap2", "zlib1g",
)  # fmt: skip
BIN_DIRS = ("/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu/", "/lib/x86_64-linux-gnu/", "/lib64/", "/usr/lib64/")
WARM_DIRS = BIN_DIRS + LIB_DIRS
DPKG_INFO = "/var/lib/dpkg/info"
MAX_FILE = 16 << 20  # a bigger file in those directories is not a command's binary


class Warmed(NamedTuple):
    files: int
    nbytes: int


def _listed(package: str, info: str) -> list[str]:
    """The paths dpkg lists for ``package`` (``pkg.list`` or, multi-arch, ``pkg:ARCH.list``)."""
    names = [f"{package}.list"]
    try:
        names += sorted(
            n for n in os.listdir(info) if n.startswith(f"{package}:") and n.endswith(".list")
        )
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(info, name), encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            continue
    return []


def _wanted(path: str, library: bool) -> bool:
    if library:  # the libraries themselves, not gconv modules or other subdirectories
        return os.path.dirname(path) + "/" in LIB_DIRS and ".so" in os.path.basename(path)
    return path.startswith(BIN_DIRS)


def files_of(
    commands: Iterable[str] = COMMAND_PACKAGES,
    libraries: Iterable[str] = LIBRARY_PACKAGES,
    root: str = "/",
) -> Iterator[str]:
    """The regular files to warm as paths under ``root``, each file once: symlinks and the
    merged-/usr aliases (``/lib`` is ``/usr/lib``) are the same inode."""
    seen: set[tuple[int, int]] = set()
    info = os.path.join(root, DPKG_INFO.lstrip("/"))
    wanted = [(p, False) for p in commands] + [(p, True) for p in libraries]
    for package, library in wanted:
        for path in _listed(package, info):
            if not _wanted(path, library):
                continue
            full = os.path.join(root, path.lstrip("/"))
            try:
                st = os.stat(full)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_FILE:
                yield full


def warm(paths: Iterable[str]) -> Warmed:
    """Ask the kernel to read each file into the page cache; how many files and bytes."""
    files = nbytes = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            continue
        finally:
            os.close(fd)
        files += 1
        nbytes += size
    return Warmed(files, nbytes)
