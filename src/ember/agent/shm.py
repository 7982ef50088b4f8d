"""Guest side of memory channels: map the VMM's shared region into this process.

The VMM puts the region above guest RAM, marks it reserved in the e820 map and says
where on the kernel command line (``ember.shm=SIZE@BASE``, see ``ember.vmm.shm``).
A process maps it through ``/dev/mem``: ``mmap`` there fills the page tables at
once, so every later access runs at native speed, with no page fault and no
guest-kernel copy per byte. A process that maps it before the template snapshot
(the run_code worker calls :func:`premap`) keeps the mapping in every sandbox
restored from it: the guest-physical range is the same, only the memfd behind it
is new, and its header (magic, version, generation) is checked before each use.

Anything missing (an older kernel without ``/dev/mem``, a VMM without the region,
a header that does not validate) makes :func:`region` return ``None``, and
channels use vsock as before.
"""

from __future__ import annotations

import mmap
import os

from ember import ring

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEVMEM = "/dev/mem"

_region: Region | None = None
_probed = False


def _cmdline_region() -> tuple[int, int] | None:
    try:
        with open("/proc/cmdline", "rb") as f:
            words = f.read().split()
    except OSError:
        return None
    for word in words:
        if word.startswith(b"ember.shm="):
            size, _, base = word[len(b"ember.shm=") :].partition(b"@")
            try:
                return int(size, 16), int(base, 16)
            except ValueError:
                return None
    return None


class Region:
    """The region as mapped in this process: header, doorbells, slots (mapped lazily)."""

    def __init__(self, fd: int, size: int, base: int) -> None:
        self._fd = fd
        self.size = size
        self.base = base
        self._header = mmap.mmap(fd, ring.PAGE, offset=base)
        self._words = memoryview(self._header).cast("Q")
        if not self.valid():
            raise OSError("the shared region's header does not validate")
        self.slot_count = self._words[ring.H_SLOT_COUNT]
        self.slot_size = self._words[ring.H_SLOT_SIZE]
        needed = ring.region_size(self.slot_count, self.slot_size)
        if self.slot_size < 2 * ring.PAGE or needed > size:
            raise OSError("the shared region's geometry does not fit its size")
        self._doorbells = mmap.mmap(fd, ring.PAGE, offset=base + size)
        self._bells = memoryview(self._doorbells).cast("I")
        self._whole: mmap.mmap | None = None
        self._slots: dict[int, mmap.mmap] = {}
        self._controls: dict[int, mmap.mmap] = {}  # control pages mapped alone

    def valid(self) -> bool:
        """Magic and version as this agent knows them (a restore rewrote the header)."""
        words = self._words
        return words[ring.H_MAGIC] == ring.MAGIC and words[ring.H_VERSION] == ring.VERSION

    @property
    def generation(self) -> int:
        return int(self._words[ring.H_GENERATION])

    def clock_pair(self) -> tuple[int, int, int] | None:
        """The VMM's clock pair ``(tsc, realtime_ns, khz)`` (``ember.agent.tscclock``), or
        ``None`` from a VMM that publishes none."""
        words = self._words
        pair = (int(words[ring.H_TSC]), int(words[ring.H_TSC_REALTIME]), int(words[ring.H_TSC_KHZ]))
        return pair if all(pair) else None

    def premap(self) -> None:
        """Map every slot now (in the template: restored sandboxes inherit the mapping)."""
        if self._whole is None:
            self._whole = mmap.mmap(self._fd, self.size, offset=self.base)

    @property
    def mapped_whole(self) -> bool:
        """Whether every slot is mapped (:meth:`premap`): a slot then costs no system call."""
        return self._whole is not None

    def slot(self, index: int, size: int = 0) -> memoryview:
        """Slot ``index`` (control page, then data), mapped now if the region is not; its
        first ``size`` bytes (whole pages) if given: each page mapped is a page-table entry
        the guest kernel fills (~0.27 ms here), so a ring that needs less maps less."""
        offset = ring.SLOT_BASE + index * self.slot_size
        size = min(-(-size // ring.PAGE) * ring.PAGE, self.slot_size) or self.slot_size
        if self._whole is not None:
            return memoryview(self._whole)[offset : offset + size]
        found = self._slots.get(index)
        if found is None or len(found) < size:
            found = self._slots[index] = mmap.mmap(self._fd, size, offset=self.base + offset)
        return memoryview(found)[:size]

    def control(self, index: int) -> memoryview:
        """Just slot ``index``'s control page as u64 words (one page mapped, not the slot)."""
        if self._whole is not None:
            return self.slot(index)[: ring.PAGE].cast("Q")
        page = self._controls.get(index)
        if page is None:
            offset = self.base + ring.SLOT_BASE + index * self.slot_size
            page = self._controls[index] = mmap.mmap(self._fd, ring.PAGE, offset=offset)
        return memoryview(page).cast("Q")

    def bell(self, index: int) -> memoryview:
        """Slot ``index``'s doorbell: storing to it signals the host (an ioeventfd)."""
        return self._bells[index : index + 1]

    def writer(self, index: int, lease: int, wait: Callable[[], None]) -> ring.RingWriter | None:
        """The producer end of slot ``index`` if the host leased it as ``lease``."""
        if not 0 <= index < self.slot_count or not self.valid():
            return None
        slot = self.slot(index)
        ctl = slot[: ring.PAGE].cast("Q")
        data = slot[ring.PAGE :]
        if ctl[ring.LEASE] != lease or ctl[ring.CAPACITY] != len(data):
            return None
        return ring.RingWriter(ctl, data, self.bell(index), wait)


def region() -> Region | None:
    """This process's mapping of the shared region, or None when there is none."""
    global _region, _probed
    if _region is not None:
        return _region if _region.valid() else None
    if _probed:
        return None
    _probed = True
    where = _cmdline_region()
    if where is None:
        return None
    try:
        fd = os.open(DEVMEM, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        _region = Region(fd, *where)
    except (OSError, ValueError):
        os.close(fd)
        return None
    return _region if _region.valid() else None


def premap() -> bool:
    """Map the whole region now if there is one (the run_code worker, before the snapshot)."""
    found = region()
    if found is None:
        return False
    try:
        found.premap()
    except (OSError, ValueError):
        return False
    return True
