"""PIO and MMIO dispatch from vCPU exits to devices.

A device claims a half-open address range; an access is routed with the
offset inside that range.  Accesses nobody claims are answered as real
hardware answers an empty bus (reads return all ones, writes vanish) and
counted, so a guest probing for hardware it does not have is harmless.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class _Range:
    base: int
    length: int
    device: BusDevice
    lock: threading.Lock = field(default_factory=threading.Lock)


class BusConflict(ValueError):
    """Two devices claim overlapping ranges (a VMM bug, not a guest one)."""


class Bus:
    """One address space (ports or MMIO); devices are serialised by a per-device lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0:
            raise BusConflict(f"{self.name}: empty range at {base:#x}")
        for r in self._ranges:
            if base < r.base + r.length and r.base < base + length:
                raise BusConflict(f"{self.name}: {base:#x}+{length:#x} overlaps {r.base:#x}")
        index = bisect.bisect(self._bases, base)
        self._ranges.insert(index, _Range(base, length, device))
        self._bases.insert(index, base)

    def _lookup(self, addr: int) -> tuple[_Range, int] | None:
        index = bisect.bisect(self._bases, addr) - 1
        if index >= 0:
            r = self._ranges[index]
            if addr < r.base + r.length:
                return r, addr - r.base
        return None

    def read(self, addr: int, size: int) -> bytes:
        found = self._lookup(addr)
        if found is None:
            self.unhandled_reads += 1
            return b"\xff" * size
        r, offset = found
        with r.lock:
            data = r.device.read(offset, size)
        return data[:size].ljust(size, b"\xff")

    def write(self, addr: int, data: bytes) -> None:
        found = self._lookup(addr)
        if found is None:
            self.unhandled_writes += 1
            return
        r, offset = found
        with r.lock:
            r.device.write(offset, data)
