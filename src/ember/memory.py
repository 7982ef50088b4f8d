"""Guest physical memory: anonymous mmaps registered with KVM as slots.

Every access from the VMM goes through :meth:`GuestMemory.read` /
:meth:`GuestMemory.write` / :meth:`GuestMemory.view`, which check that the
whole range lies inside one region.  Addresses come from the guest, which is
an adversary, so a bad one raises :class:`GuestMemoryError` (caught by the
device that asked) instead of touching host memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass, field

from ember.errors import EmberError

PAGE_SIZE = 4096
MIB = 1 << 20
HUGE_PAGE_SIZE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)

# mmap(2) at a fixed address (x86-64 Linux), and what it returns on failure
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value
_mmap = ctypes.CDLL(None, use_errno=True).mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long)

# Below 4 GiB, [MMIO_GAP_START, 4 GiB) is left for devices (virtio-mmio, IOAPIC, LAPIC).
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 1 << 32


class GuestMemoryError(EmberError):
    """An access outside guest RAM (usually a guest bug or attack)."""


@dataclass
class Region:
    guest_addr: int
    size: int
    mem: mmap.mmap = field(repr=False)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Where ``size`` bytes of RAM go: below the MMIO gap, the rest above 4 GiB."""
    below = min(size, MMIO_GAP_START)
    layout = [(0, below)]
    if size > below:
        layout.append((MMIO_GAP_END, size - below))
    return layout


class GuestMemory:
    """The guest's RAM, as one or two regions around the 32-bit MMIO gap."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = sorted(regions, key=lambda r: r.guest_addr)

    @classmethod
    def anonymous(cls, size: int) -> GuestMemory:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of 4 KiB")
        regions = []
        for start, length in ram_layout(size):
            mem = mmap.mmap(
                -1,
                length,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
            )
            regions.append(Region(start, length, mem))
        return cls(regions)

    @classmethod
    def from_file(cls, path: str, size: int) -> GuestMemory:
        """RAM restored from a snapshot's memory file, mapped copy-on-write.

        ``MAP_PRIVATE``: every sandbox restored from one file shares its page
        cache and pays only for the pages its guest writes.  The file holds
        the regions back to back in guest-address order.
        """
        import os

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                raise GuestMemoryError(
                    f"memory file {path} is {os.fstat(fd).st_size} bytes, expected {size}"
                )
            regions: list[Region] = []
            offset = 0
            try:
                for start, length in ram_layout(size):
                    mem = mmap.mmap(
                        fd,
                        length,
                        mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0),
                        mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=offset,
                    )
                    regions.append(Region(start, length, mem))
                    offset += length
            except BaseException:
                for region in regions:
                    region.mem.close()
                raise
            return cls(regions)
        finally:
            os.close(fd)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _find(self, addr: int, length: int) -> tuple[Region, int]:
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"bad guest range {addr:#x}+{length:#x}")
        for region in self.regions:
            if region.guest_addr <= addr and addr + length <= region.end:
                return region, addr - region.guest_addr
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest RAM")

    def contains(self, addr: int, length: int) -> bool:
        try:
            self._find(addr, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, addr: int, length: int) -> bytes:
        region, offset = self._find(addr, length)
        return region.mem[offset : offset + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._find(addr, len(data))
        region.mem[offset : offset + len(data)] = data

    def fill(self, addr: int, length: int, byte: int) -> None:
        """Set a range to one byte value at host speed (``memset``), without building it in
        host memory first: a loader's bss, and the guest kernel's page clearing
        (:mod:`ember.devices.legacy.page_clear`)."""
        region, offset = self._find(addr, length)
        if length:
            ctypes.memset(c_address(region.mem) + offset, byte, length)

    def renew(self, addr: int, length: int) -> bool:
        """Map fresh anonymous memory (zeros) over a range, host huge pages asked for; False,
        and nothing changed, if the range is not 2 MiB aligned both as a guest address and
        in this process (KVM maps guest memory huge only where both are).

        Why not ``memset``: RAM restored from a snapshot is the memory file mapped private,
        so its host pages are 4 KiB and KVM's shadow MMU maps them one by one, an exit per
        4 KiB the guest touches; fresh anonymous memory gets one host huge page and one
        2 MiB mapping. Its old private pages, if any, go back to the host. A failing ``mmap``
        raises GuestMemoryError: an older kernel may have unmapped the range first, and guest
        RAM with a hole in it must not run on.
        """
        region, offset = self._find(addr, length)
        host = c_address(region.mem) + offset
        if not length or addr % HUGE_PAGE_SIZE or length % HUGE_PAGE_SIZE or host % HUGE_PAGE_SIZE:
            return False
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        flags |= getattr(mmap, "MAP_NORESERVE", 0)
        got = _mmap(host, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if got == _MAP_FAILED or got != host:
            raise GuestMemoryError(
                f"mmap of fresh memory at guest {addr:#x}+{length:#x} failed: "
                f"{os.strerror(ctypes.get_errno())}"
            )
        try:
            region.mem.madvise(MADV_HUGEPAGE, offset, length)
        except OSError:  # a kernel without THP: fresh zero pages all the same
            pass
        return True

    def discard(self, addr: int, length: int) -> None:
        """Give the host memory behind a page-aligned range back (the balloon's job).

        ``MADV_DONTNEED``: anonymous RAM reads back as zeros, RAM mapped from a
        snapshot's memory file as the file's content; either way the VMM's
        private copy is freed.
        """
        if addr % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard of {addr:#x}+{length:#x} is not page aligned")
        region, offset = self._find(addr, length)
        if length:
            region.mem.madvise(mmap.MADV_DONTNEED, offset, length)

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy window; the caller must release it before :meth:`close`."""
        region, offset = self._find(addr, length)
        return memoryview(region.mem)[offset : offset + length]

    def close(self) -> None:
        for region in self.regions:
            region.mem.close()


def c_address(buf: mmap.mmap) -> int:
    """The user-space address of an mmap (for KVM_SET_USER_MEMORY_REGION, ``memset`` and a
    fixed ``mmap``); the ctypes view is dropped at once, so the mmap can still be closed."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
