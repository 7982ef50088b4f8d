"""Scatter-gather helpers for block requests: a chain's buffers as one byte range."""

from __future__ import annotations

import ctypes
import os

from ember.memory import GuestMemory

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate_punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range; it reads back as zeros (what DISCARD and WRITE_ZEROES ask)."""
    if length == 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BufferList:
    """A list of (guest address, length) buffers addressed as one contiguous range."""

    def __init__(self, buffers: list[tuple[int, int]]) -> None:
        self.buffers = buffers
        self.total = sum(length for _, length in buffers)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        if offset < 0 or length < 0 or offset + length > self.total:
            raise ValueError("range outside the buffers")
        out = []
        for addr, size in self.buffers:
            if length == 0:
                break
            if offset >= size:
                offset -= size
                continue
            n = min(size - offset, length)
            out.append((addr + offset, n))
            length -= n
            offset = 0
        return out

    def read(self, memory: GuestMemory, offset: int, length: int) -> bytes:
        return b"".join(memory.read(a, n) for a, n in self._pieces(offset, length))

    def write(self, memory: GuestMemory, offset: int, data: bytes) -> None:
        pos = 0
        for addr, n in self._pieces(offset, len(data)):
            memory.write(addr, data[pos : pos + n])
            pos += n

    def views(self, memory: GuestMemory, length: int) -> list[memoryview]:
        """Zero-copy views of the first ``length`` bytes; the caller releases them."""
        views: list[memoryview] = []
        try:
            for addr, n in self._pieces(0, length):
                views.append(memory.view(addr, n))
        except BaseException:
            for view in views:
                view.release()
            raise
        return views

    def skip(self, offset: int) -> BufferList:
        return BufferList(self._pieces(offset, self.total - offset))
