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

Sizes come from the guest too, and descriptors may all point at the same
page, so one chain can claim up to 4 GiB of "PFNs" or "statistics".  The
device never reads or allocates in proportion to them: an inflate or deflate
request longer than any driver sends is refused whole (counted, returned
unread), a stats buffer is read only as far as the ten tags the spec defines
could need, and one kick serves a bounded number of chains.  A driver that
breaks the device's own state (hands back a queue on which the held stats
buffer cannot be returned) fails the device through ``fail()``.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
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

# What one request and one kick may cost, whatever sizes the guest writes.  The spec
# (§5.5.6) bounds neither; Linux sends at most 256 PFNs a request
# (VIRTIO_BALLOON_ARRAY_PFNS_MAX) and keeps one request in flight per queue.
MAX_PFNS_PER_REQUEST = 1024  # one 4 KiB page of le32 PFNs
MAX_CHAINS_PER_KICK = 32  # so one kick costs at most 32 * 1024 PFNs or 32 * 512 ranges
NUM_PAGES_MAX = 0xFFFF_FFFF  # struct virtio_balloon_config.num_pages is le32 (§5.5.4)

# §5.5.6.3 virtio_balloon_stat tags
STAT_TAGS = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
    4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
    8: "hugetlb_allocations", 9: "hugetlb_failures",
}  # fmt: skip
_STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat is packed: 10 bytes
# Entries read from a stats buffer: room for every tag the spec defines and those newer
# Linux kernels add (16 in 6.12); the rest of a longer buffer is not read.
MAX_STAT_ENTRIES = 32


@dataclass
class BalloonStats:
    inflated_pages: int = 0
    deflated_pages: int = 0
    reported_bytes: int = 0
    bad_pfns: int = 0  # PFNs outside guest RAM, skipped
    stats_updates: int = 0
    pfns_read: int = 0  # PFNs taken from inflate/deflate requests (work done)
    discards: int = 0  # madvise calls made (work done)
    refused_requests: int = 0  # inflate/deflate requests longer than MAX_PFNS_PER_REQUEST
    unknown_stat_tags: int = 0  # stats entries with a tag the spec does not define, ignored


class Balloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.target_pages = 0
        self.actual_pages = 0
        self.guest_stats: dict[str, int] = {}
        self.stats = BalloonStats()
        self._stats_head: int | None = None
        self._restored_stats_head: object = None

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self.stats)

    def device_features(self) -> int:
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BALLOON_F_STATS_VQ
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | 1 << VIRTIO_BALLOON_F_REPORTING
        )

    def read_config(self, offset: int, size: int) -> bytes:
        # struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val
        # (both page counts are kept in le32 range by set_target, write_config, load_state)
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
        target = int(state.get("target_pages", 0))
        actual = int(state.get("actual_pages", 0))
        if not (0 <= target <= NUM_PAGES_MAX and 0 <= actual <= NUM_PAGES_MAX):
            raise ValueError(f"balloon pages {target}/{actual} in a snapshot do not fit le32")
        self.target_pages, self.actual_pages = target, actual
        names = set(STAT_TAGS.values())  # so a reply stays as small as the device keeps it
        self.guest_stats = {
            str(k): int(v) for k, v in state.get("guest_stats", {}).items() if k in names
        }
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
        """Ask the guest to hold ``pages`` pages in the balloon (0: give them all back).

        ``num_pages`` is le32 (§5.5.4): a count that does not fit raises ValueError
        here, not ``struct.error`` later on the vCPU thread reading the config.
        """
        if not 0 <= pages <= NUM_PAGES_MAX:
            raise ValueError(f"balloon target {pages} pages: num_pages is 0..{NUM_PAGES_MAX}")
        with self.lock:
            self.target_pages = pages
            if self.interrupt is not None:
                self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    def request_stats(self) -> bool:
        """Hand the stats buffer back, which asks the driver for fresh numbers.

        Not on a device the driver broke (DEVICE_NEEDS_RESET): its kicks are ignored
        then, and the host's requests too leave its rings alone until the driver resets it.
        """
        with self.lock:
            memory, head = self.memory, self._stats_head
            failed = self.needs_reset
            if memory is None or head is None or failed or len(self.queues) <= STATS_QUEUE:
                return False
            queue = self.queues[STATS_QUEUE]
            self._stats_head = None
            try:
                queue.add_used(memory, head, 0)
                self.signal_used(queue)
            except QueueError as exc:
                self.fail(f"stats queue: {exc}")
                return False
            return True

    # --- guest side (kicks, on the event thread)
    def process_queue(self, index: int) -> None:
        with self.lock:
            if index == INFLATE_QUEUE:
                self.serve_queue(index, self._inflate, max_chains=MAX_CHAINS_PER_KICK)
            elif index == DEFLATE_QUEUE:
                self.serve_queue(index, self._deflate, max_chains=MAX_CHAINS_PER_KICK)
            elif index == STATS_QUEUE:
                self._take_stats()
            elif index == REPORTING_QUEUE:
                self.serve_queue(index, self._report, max_chains=MAX_CHAINS_PER_KICK)

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        """The request's array of le32 PFNs (§5.5.6); [] for a request too long to serve.

        The length is checked before anything is read, so a chain of aliased
        descriptors claiming gigabytes costs a sum over its (at most 2 x 256)
        descriptors, not a copy.  A trailing partial PFN is ignored.
        """
        memory = self.memory
        assert memory is not None
        total = chain.total_readable()
        if total > MAX_PFNS_PER_REQUEST * 4:
            self.stats.refused_requests += 1
            log.debug("balloon: refused a request of %d bytes of PFNs", total)
            return []
        data = b"".join(memory.read(addr, length) for addr, length in chain.readable)
        count = len(data) // 4
        self.stats.pfns_read += count
        return list(struct.unpack_from(f"<{count}I", data))

    def _inflate(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        for start, pages in _runs(self._pfns(chain)):
            addr, length = start << VIRTIO_BALLOON_PFN_SHIFT, pages * PAGE_SIZE
            try:
                self.stats.discards += 1
                memory.discard(addr, length)
                self.stats.inflated_pages += pages
            except GuestMemoryError:
                self.stats.bad_pfns += pages
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        self.stats.deflated_pages += len(self._pfns(chain))
        return 0

    def _report(self, chain: DescriptorChain) -> int:
        """Free page reporting: each buffer is a free range the guest will not touch.

        One madvise per buffer, and a chain has at most 2 x 256 of them (the
        queue checked it), however large the ranges claim to be.
        """
        memory = self.memory
        assert memory is not None
        for addr, length in chain.writable + chain.readable:
            start = -(-addr // PAGE_SIZE) * PAGE_SIZE
            end = (addr + length) // PAGE_SIZE * PAGE_SIZE
            if end <= start:
                continue
            try:
                self.stats.discards += 1
                memory.discard(start, end - start)
                self.stats.reported_bytes += end - start
            except GuestMemoryError:
                self.stats.bad_pfns += (end - start) // PAGE_SIZE
        return 0

    def _take_stats(self) -> None:
        """Keep the driver's stats buffer (returning it later asks for an update).

        Anything the driver breaks here (a ring it corrupted, a queue it set up
        again so the held buffer's head no longer fits) fails the device; it
        must never raise out of a kick.
        """
        memory = self.memory
        if memory is None or len(self.queues) <= STATS_QUEUE:
            return
        queue = self.queues[STATS_QUEUE]
        try:
            for _ in range(MAX_CHAINS_PER_KICK):
                try:
                    chain = queue.pop(memory)
                except QueueError as exc:
                    if queue.broken:
                        raise
                    if exc.head is not None:
                        queue.add_used(memory, exc.head, 0)
                    continue
                if chain is None:
                    break
                if self._stats_head is not None:  # a second buffer: give the older one back
                    head, self._stats_head = self._stats_head, None
                    queue.add_used(memory, head, 0)
                self._stats_head = chain.head
                self._read_stats(memory, chain)
            self.signal_used(queue)
        except QueueError as exc:
            self.fail(f"stats queue: {exc}")

    def _read_stats(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        """Take the tags the spec defines from the first MAX_STAT_ENTRIES entries (§5.5.6.3).

        Unknown tags are counted and ignored, so what the device keeps, and the
        control socket reports, is at most the ten named values.
        """
        data = _read_prefix(memory, chain.readable, MAX_STAT_ENTRIES * _STAT.size)
        for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
            tag, value = _STAT.unpack_from(data, offset)
            name = STAT_TAGS.get(tag)
            if name is None:
                self.stats.unknown_stat_tags += 1
            else:
                self.guest_stats[name] = value
        self.stats.stats_updates += 1


def _read_prefix(memory: GuestMemory, buffers: list[tuple[int, int]], limit: int) -> bytes:
    """The first ``limit`` bytes of a chain's buffers (all of them when shorter)."""
    pieces: list[bytes] = []
    for addr, length in buffers:
        if limit <= 0:
            break
        n = min(length, limit)
        pieces.append(memory.read(addr, n))
        limit -= n
    return b"".join(pieces)


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of page frame numbers, as (first, count): one madvise per run."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
