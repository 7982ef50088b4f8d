"""Guest RAM to a snapshot's memory file, sparse.

Pages the guest never touched are zero; they become holes, so the file costs
disk and page cache only for what the guest used (a booted template of
256 MiB writes a few tens of MiB).  Restores map the file with
:meth:`ember.memory.GuestMemory.from_file`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ember.errors import SnapshotError
from ember.memory import GuestMemory

CHUNK = 64 << 10
_ZERO = bytes(CHUNK)


def write_memory(
    memory: GuestMemory, fd: int, *, digest: bool = False, durable: bool = False
) -> str | None:
    """Write every region back to back into the open file ``fd``; returns the SHA-256 of the
    whole image if asked.

    The file comes from the caller (over the control socket, from outside
    the VMM's jail), which also renames it into place: the VMM needs no path.
    ``durable`` (templates) fsyncs; a fork's file lives only as long as its sandbox.
    """
    hasher = hashlib.sha256() if digest else None
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, memory.size)
        base = 0
        for region in memory.regions:
            view = memoryview(region.mem)
            try:
                for start in range(0, region.size, CHUNK):
                    chunk = bytes(view[start : start + CHUNK])
                    if hasher is not None:
                        hasher.update(chunk)
                    if chunk != _ZERO[: len(chunk)]:
                        os.pwrite(fd, chunk, base + start)
            finally:
                view.release()
            base += region.size
        if durable:
            os.fsync(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot write the memory file: {exc.strerror}") from None
    return hasher.hexdigest() if hasher is not None else None


def memory_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
