"""virtio-balloon (virtio 1.2 §5.5): inflate/deflate, statistics and free page reporting.

The host sets a target (``num_pages``) and the driver inflates toward it,
handing over page frame numbers the guest promises not to touch; the device
drops those pages from the VMM (``madvise(MADV_DONTNEED)``), so their host
memory is freed.  Deflating needs no work: a page comes back when touched.
With ``VIRTIO_BALLOON_F_REPORTING`` the guest also reports free memory on
its own (2 MiB blocks at a time), which the device drops the same way: a
guest that frees memory returns it to the host without anyone asking.
``VIRTIO_BALLOON_F_DEFLATE_ON_OOM`` lets the guest take balloon pages back
instead of OOM-killing.

The statistics queue works by holding the driver's one buffer: returning
it asks for fresh numbers, which arrive when the driver adds it again.
Every PFN and range comes from the guest and is checked against guest RAM;
a bad one is counted and skipped.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any

from ember.devices.virtio.chain import DescriptorChain
from ember.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
    VIRTIO_MMIO_INT_CONFIG,
    Interrupt,
    VirtioDevice,
)
from ember.devices.virtio.queue import Queue, QueueError
from ember.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# §5.5.3 feature bits
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_REPORTING = 5

VIRTIO_BALLOON_PFN_SHIFT = 12
INFLATE_QUEUE, DEFLATE_QUEUE, STATS_QUEUE, REPORTING_QUEUE = 0, 1, 2, 3
QUEUE_SIZE = 256

# §5.5.6.3 virtio_balloon_stat tags
STAT_TAGS = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
    4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
    8: "hugetlb_allocations", 9: "hugetlb_failures",
}  # fmt: skip
_STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat is packed: 10 bytes


@dataclass
class BalloonStats:
    inflated_pages: int = 0
    deflated_pages: int = 0
    reported_bytes: int = 0
    bad_pfns: int = 0  # PFNs outside guest RAM, skipped
    stats_updates: int = 0


class Balloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.RLock()  # adopted by the transport: control requests come too
        self.target_pages = 0
        self.actual_pages = 0
        self.guest_stats: dict[str, int] = {}
        self.stats = BalloonStats()
        self._stats_head: int | None = None
        self._restored_stats_head: object = None

    def device_features(self) -> int:
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BALLOON_F_STATS_VQ
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | 1 << VIRTIO_BALLOON_F_REPORTING
        )

    def read_config(self, offset: int, size: int) -> bytes:
        # struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val
        config = struct.pack("<IIII", self.target_pages, self.actual_pages, 0, 0)
        return config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:  # the driver reports `actual`
            self.actual_pages = struct.unpack("<I", data)[0]

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None:
        with self.lock:
            super().activate(memory, queues, interrupt)
            self._stats_head = None

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.actual_pages = 0
            self._stats_head = None

    # --- snapshots
    def save_state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "target_pages": self.target_pages,
                "actual_pages": self.actual_pages,
                "stats_head": self._stats_head,
                "guest_stats": dict(self.guest_stats),
            }

    def load_state(self, state: dict[str, Any]) -> None:
        self.target_pages = int(state.get("target_pages", 0))
        self.actual_pages = int(state.get("actual_pages", 0))
        self.guest_stats = {str(k): int(v) for k, v in state.get("guest_stats", {}).items()}
        self._restored_stats_head = state.get("stats_head")

    def restored(self) -> None:
        """The driver's stats buffer is still ours (it was held when the snapshot was taken)."""
        with self.lock:
            head = self._restored_stats_head
            queues = self.queues
            if isinstance(head, int) and len(queues) > STATS_QUEUE and 0 <= head < queues[2].size:
                self._stats_head = head

    # --- host side (control requests)
    def set_target(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` pages in the balloon (0: give them all back)."""
        with self.lock:
            self.target_pages = max(0, pages)
            if self.interrupt is not None:
                self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    def request_stats(self) -> bool:
        """Hand the stats buffer back, which asks the driver for fresh numbers."""
        with self.lock:
            memory, head = self.memory, self._stats_head
            if memory is None or head is None or len(self.queues) <= STATS_QUEUE:
                return False
            queue = self.queues[STATS_QUEUE]
            self._stats_head = None
            try:
                queue.add_used(memory, head, 0)
            except QueueError as exc:
                self.fail(f"stats queue: {exc}")
                return False
            self.signal_used(queue)
            return True

    # --- guest side (kicks, on the event thread)
    def process_queue(self, index: int) -> None:
        with self.lock:
            if index == INFLATE_QUEUE:
                self.serve_queue(index, self._inflate)
            elif index == DEFLATE_QUEUE:
                self.serve_queue(index, self._deflate)
            elif index == STATS_QUEUE:
                self._take_stats()
            elif index == REPORTING_QUEUE:
                self.serve_queue(index, self._report)

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        memory = self.memory
        assert memory is not None
        data = b"".join(memory.read(addr, length) for addr, length in chain.readable)
        count = len(data) // 4
        return list(struct.unpack_from(f"<{count}I", data))

    def _inflate(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        for start, pages in _runs(self._pfns(chain)):
            addr, length = start << VIRTIO_BALLOON_PFN_SHIFT, pages * PAGE_SIZE
            try:
                memory.discard(addr, length)
                self.stats.inflated_pages += pages
            except GuestMemoryError:
                self.stats.bad_pfns += pages
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        self.stats.deflated_pages += len(self._pfns(chain))
        return 0

    def _report(self, chain: DescriptorChain) -> int:
        """Free page reporting: each buffer is a free range the guest will not touch."""
        memory = self.memory
        assert memory is not None
        for addr, length in chain.writable + chain.readable:
            start = -(-addr // PAGE_SIZE) * PAGE_SIZE
            end = (addr + length) // PAGE_SIZE * PAGE_SIZE
            if end <= start:
                continue
            try:
                memory.discard(start, end - start)
                self.stats.reported_bytes += end - start
            except GuestMemoryError:
                self.stats.bad_pfns += (end - start) // PAGE_SIZE
        return 0

    def _take_stats(self) -> None:
        """Keep the driver's stats buffer (returning it later asks for an update)."""
        memory = self.memory
        if memory is None or len(self.queues) <= STATS_QUEUE:
            return
        queue = self.queues[STATS_QUEUE]
        while True:
            try:
                chain = queue.pop(memory)
            except QueueError as exc:
                if queue.broken:
                    self.fail(f"stats queue: {exc}")
                    return
                continue
            if chain is None:
                return
            if self._stats_head is not None:  # a second buffer: give the older one back
                queue.add_used(memory, self._stats_head, 0)
                self.signal_used(queue)
            self._stats_head = chain.head
            data = b"".join(memory.read(a, n) for a, n in chain.readable)
            for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, offset)
                self.guest_stats[STAT_TAGS.get(tag, f"tag_{tag}")] = value
            self.stats.stats_updates += 1


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of page frame numbers, as (first, count): one madvise per run."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
