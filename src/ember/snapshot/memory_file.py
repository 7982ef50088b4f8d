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
    memory: GuestMemory, path: Path, *, digest: bool = False, durable: bool = False
) -> str | None:
    """Write every region back to back; returns the SHA-256 of the whole image if asked.

    ``durable`` (templates) fsyncs; a fork's file lives only as long as its sandbox.
    """
    hasher = hashlib.sha256() if digest else None
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
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
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write the memory file {path}: {exc.strerror}") from None
    os.close(fd)
    os.replace(tmp, path)
    return hasher.hexdigest() if hasher is not None else None


def memory_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
