"""A writer for the "newc" cpio format the Linux initramfs unpacker reads.

Why write our own instead of running ``cpio -o``: the archive must hold
``/dev/console`` and ``/dev/null`` device nodes owned by root, which ``cpio``
can only copy from real nodes (``mknod`` needs privileges and leaves files
behind), and the output must be byte-for-byte reproducible (mtime 0, fixed
inode numbers, fixed order) so that its cache key means something.  The format
is small: a 110-byte ASCII header of 13 hex fields, the NUL-terminated name,
padding to 4 bytes, the data, padding to 4 bytes; a ``TRAILER!!!`` entry ends
the archive.  The guest kernel has no decompressors, so nothing is compressed.

Reference: ``Documentation/driver-api/early-userspace/buffer-format.rst``.
"""

from __future__ import annotations

import stat
from typing import BinaryIO, Final

#: Part of the initramfs cache key: bump it whenever the bytes this module
#: writes for the same entries change.
CPIO_WRITER_VERSION: Final = "newc-1"

MAGIC: Final = b"070701"
HEADER_SIZE: Final = 110
TRAILER: Final = "TRAILER!!!"
_MAX_FIELD: Final = 0xFFFFFFFF


def _pad(length: int) -> bytes:
    """Zero bytes that bring ``length`` up to the next multiple of 4."""
    return b"\0" * (-length % 4)


def _check_name(name: str) -> bytes:
    """Refuse names the kernel would misplace: absolute, ``..``, NUL, empty."""
    if not name or name.startswith("/") or "\0" in name:
        raise ValueError(f"bad cpio entry name {name!r}: use a relative path like 'bin/sh'")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"bad cpio entry name {name!r}: no empty, '.' or '..' components")
    return name.encode()


class CpioWriter:
    """Streams newc entries to a binary file; call :meth:`finish` once at the end.

    Every entry is owned by root (uid 0, gid 0) with mtime 0, and inode numbers
    count up from 1 in the order entries are added, so the same calls always
    produce the same bytes.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._next_ino = 1
        self._names: set[str] = set()
        self._finished = False

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        if self._finished:
            raise ValueError("cpio archive already finished")
        encoded = _check_name(name) if name != TRAILER else name.encode()
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        if ino is None:
            ino, self._next_ino = self._next_ino, self._next_ino + 1
        fields = (
            ino,
            mode,
            0,  # uid: root
            0,  # gid: root
            nlink,
            0,  # mtime: fixed, for reproducible archives
            len(data),
            0,  # devmajor of the file's own file system: irrelevant here
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded) + 1,  # namesize counts the trailing NUL
            0,  # check: only used by the "070702" crc variant
        )
        for value in fields:
            if not 0 <= value <= _MAX_FIELD:
                raise ValueError(f"cpio field out of range for {name!r}: {value}")
        header = MAGIC + b"".join(b"%08X" % value for value in fields)
        head = header + encoded + b"\0"
        self._out.write(head + _pad(len(head)))
        if data:
            self._out.write(data + _pad(len(data)))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        """A directory; parents must be added before their children."""
        self._entry(name, stat.S_IFDIR | (perm & 0o7777), nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """A regular file holding ``data``."""
        self._entry(name, stat.S_IFREG | (perm & 0o7777), data)

    def add_symlink(self, name: str, target: str) -> None:
        """A symbolic link; the target is stored as the entry's data, unterminated."""
        if not target or "\0" in target:
            raise ValueError(f"bad symlink target {target!r} for {name!r}")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """A character device node, e.g. ``dev/console`` (5, 1): no ``mknod`` needed."""
        self._entry(name, stat.S_IFCHR | (perm & 0o7777), rdev=(major, minor))

    def add_block_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """A block device node."""
        self._entry(name, stat.S_IFBLK | (perm & 0o7777), rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer; the kernel stops reading the archive there."""
        self._entry(TRAILER, 0, ino=0)
        self._finished = True
