"""Page clearing for the guest kernel: a port where it hands the VMM a page to zero.

Why a VMM clears a guest's pages: under kvm_pvm the guest kernel runs in KVM's instruction
emulator, which steps ``rep stosq`` a quadword at a time. A fresh 2 MiB huge page took the
guest ~0.2 s to clear, and a 4 KiB page ~0.4 ms: most of what a large allocation, a tmpfs
file's first write or a new process's fresh pages cost. The VMM clears the same memory at
host speed. The guest side is kernel patch ``0017`` (``arch/x86/mm/ember_clear.c``), enabled
by ``ember.host_clear=PORT`` on the command line, which only the ``pvm`` CPU template adds
(:mod:`ember.arch.x86_64.cpuid`): on hardware KVM a VM exit per page is slower than the
guest's own clearing.

A 2 MiB page gets fresh anonymous host memory (:meth:`GuestMemory.renew`) where guest RAM
is 2 MiB aligned in the VMM, as a restored VMM's is: zeros without writing them, one host
huge page, and one 2 MiB mapping in KVM's shadow MMU instead of 512 (a restored guest's RAM
is the snapshot's memory file mapped private, in 4 KiB host pages). A 4 KiB page is cleared
with ``memset``.

The ABI: a 32-bit write of a page frame number to ``PORT`` clears 4 KiB there, to
``PORT + 4`` the naturally aligned 2 MiB there. The write completes after the memory reads
as zeros (the vCPU waits in the exit). Anything else is refused and counted, never raised:
a frame outside guest RAM, a misaligned 2 MiB frame, another size or offset, a read. A
guest can only clear its own RAM this way, which it could do itself.
"""

from __future__ import annotations

from ember.memory import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory

PAGE_CLEAR_LEN = 8  # two 32-bit ports: 4 KiB, then 2 MiB
_SIZES = {0: PAGE_SIZE, 4: HUGE_PAGE_SIZE}  # offset -> bytes cleared


class PageClear:
    """The port pair; counts what it cleared and what it refused (``counters``)."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self.pages = 0  # 4 KiB clears
        self.huge_pages = 0  # 2 MiB clears
        self.refused = 0

    def read(self, offset: int, size: int) -> bytes:
        self.refused += 1  # nothing to read: the guest never asks, a probe gets ones
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        length = _SIZES.get(offset)
        if length is None or len(data) != 4:
            self.refused += 1
            return
        addr = int.from_bytes(data, "little") * PAGE_SIZE
        if addr % length or not self._memory.contains(addr, length):
            self.refused += 1
            return
        if length == PAGE_SIZE:
            self._memory.fill(addr, length, 0)
            self.pages += 1
            return
        # A failing mmap in renew() is the host's (out of memory), not the guest's: it raises,
        # and the vCPU thread stops the VM with that error rather than leave a hole in its RAM.
        if not self._memory.renew(addr, length):
            self._memory.fill(addr, length, 0)
        self.huge_pages += 1

    def counters(self) -> dict[str, int]:
        return {"pages": self.pages, "huge_pages": self.huge_pages, "refused": self.refused}
