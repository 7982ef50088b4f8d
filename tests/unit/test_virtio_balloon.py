"""virtio-balloon against a fake driver writing real rings (no KVM): inflate frees the pages,
reporting frees free ranges, statistics come and go through the one held buffer."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator

import pytest

from ember.devices.virtio.balloon.device import (
    DEFLATE_QUEUE,
    INFLATE_QUEUE,
    MAX_CHAINS_PER_KICK,
    MAX_STAT_ENTRIES,
    NUM_PAGES_MAX,
    REPORTING_QUEUE,
    STAT_TAGS,
    STATS_QUEUE,
    Balloon,
    _runs,
)
from ember.devices.virtio.device import VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, Interrupt
from ember.devices.virtio.queue import VIRTQ_DESC_F_NEXT, Queue
from ember.memory import PAGE_SIZE, GuestMemory
from tests.unit.virtio_driver import UsedElem, VirtioDriver

MIB = 1 << 20
PAGES_AT = 8 * MIB  # the test pages live here, away from rings and buffers


class Guest:
    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(16 * MIB)
        self.drivers = [
            VirtioDriver(self.mem, 16, desc_table=0x10000 * (i + 1),
                         data_start=(i + 1) * MIB, data_end=(i + 2) * MIB)
            for i in range(4)
        ]  # fmt: skip
        self.queues = [Queue(256) for _ in range(4)]
        for driver, queue in zip(self.drivers, self.queues, strict=True):
            driver.configure(queue)
        self.interrupt = Interrupt()
        self.dev = Balloon()
        self.dev.acked_features = self.dev.device_features()
        self.dev.activate(self.mem, self.queues, self.interrupt)

    def close(self) -> None:
        self.interrupt.close()
        self.mem.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def _pfns(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def test_inflate_frees_the_pages_and_skips_bad_pfns(guest: Guest) -> None:
    first = PAGES_AT // PAGE_SIZE
    for i in range(3):
        guest.mem.write(PAGES_AT + i * PAGE_SIZE, b"guest data")
    head = guest.drivers[INFLATE_QUEUE].add_chain([_pfns(first, first + 1, 0xFFFFFF)], [])
    guest.dev.process_queue(INFLATE_QUEUE)
    assert guest.drivers[INFLATE_QUEUE].used_entries() == [UsedElem(head, 0)]
    assert guest.mem.read(PAGES_AT, 10) == bytes(10)  # given back: reads as fresh memory
    assert guest.mem.read(PAGES_AT + PAGE_SIZE, 10) == bytes(10)
    assert guest.mem.read(PAGES_AT + 2 * PAGE_SIZE, 10) == b"guest data"  # not ballooned
    assert (guest.dev.stats.inflated_pages, guest.dev.stats.bad_pfns) == (2, 1)
    guest.drivers[DEFLATE_QUEUE].add_chain([_pfns(first)], [])
    guest.dev.process_queue(DEFLATE_QUEUE)
    assert guest.dev.stats.deflated_pages == 1


def test_free_page_reporting_frees_whole_pages_of_each_range(guest: Guest) -> None:
    guest.mem.write(PAGES_AT, b"x" * (3 * PAGE_SIZE))
    driver = guest.drivers[REPORTING_QUEUE]
    # The driver hands over free ranges as device-writable buffers; this one is unaligned,
    # so only the whole page inside it may go.
    range_addr = PAGES_AT + 100
    driver.write_desc(0, range_addr, 2 * PAGE_SIZE, 2, 0)  # VIRTQ_DESC_F_WRITE
    driver.push_avail(0)
    guest.dev.process_queue(REPORTING_QUEUE)
    assert guest.mem.read(PAGES_AT, 1) == b"x"  # partly outside the range: kept
    assert guest.mem.read(PAGES_AT + PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert guest.mem.read(PAGES_AT + 2 * PAGE_SIZE, 1) == b"x"
    assert guest.dev.stats.reported_bytes == PAGE_SIZE


def test_stats_buffer_is_held_and_returned_to_ask_for_fresh_numbers(guest: Guest) -> None:
    driver = guest.drivers[STATS_QUEUE]
    stats = struct.pack("<HQ", 4, 123 * MIB) + struct.pack("<HQ", 5, 256 * MIB)
    head = driver.add_chain([stats], [])
    guest.dev.process_queue(STATS_QUEUE)
    assert guest.dev.guest_stats == {"free_memory": 123 * MIB, "total_memory": 256 * MIB}
    assert driver.used_entries() == []  # held until the host wants an update
    assert guest.dev.request_stats()
    assert driver.used_entries() == [UsedElem(head, 0)]
    assert guest.interrupt.status & VIRTIO_MMIO_INT_VRING
    assert not guest.dev.request_stats()  # nothing held until the driver adds it again


def test_target_is_config_and_a_change_interrupts(guest: Guest) -> None:
    guest.dev.set_target(1000)
    assert guest.interrupt.status & VIRTIO_MMIO_INT_CONFIG
    assert struct.unpack("<II", guest.dev.read_config(0, 8)) == (1000, 0)
    guest.dev.write_config(4, struct.pack("<I", 640))  # the driver reports what it holds
    assert guest.dev.actual_pages == 640
    guest.dev.write_config(0, struct.pack("<I", 5))  # num_pages is the device's
    assert guest.dev.target_pages == 1000


def test_pfn_runs_coalesce_for_one_madvise_each() -> None:
    assert _runs([5, 3, 4, 10, 11, 4]) == [(3, 3), (10, 2)]
    assert _runs([]) == []


def _aliased_chain(driver: VirtioDriver, count: int, length: int, flags: int = 0) -> int:
    """A hostile chain: ``count`` descriptors all naming the same ``length`` bytes of RAM."""
    addr = driver.alloc(length)
    for i in range(count):
        more = VIRTQ_DESC_F_NEXT if i + 1 < count else 0
        driver.write_desc(i, addr, length, flags | more, i + 1)
    driver.push_avail(0)
    return 0


def test_a_request_claiming_megabytes_of_pfns_costs_nothing_in_proportion(guest: Guest) -> None:
    """Issue 14 item 1: 16 aliased descriptors of 512 KiB claim 2 M PFNs (8 MiB).  The request
    is refused before anything is read: no host memory, no PFN and no madvise for it."""
    driver = guest.drivers[INFLATE_QUEUE]
    head = _aliased_chain(driver, 16, 512 * 1024)
    tracemalloc.start()
    try:
        guest.dev.process_queue(INFLATE_QUEUE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert driver.used_entries() == [UsedElem(head, 0)]  # returned, so the driver goes on
    stats = guest.dev.stats
    assert (stats.refused_requests, stats.pfns_read, stats.discards) == (1, 0, 0)
    assert not guest.dev.needs_reset
    _aliased_chain(guest.drivers[DEFLATE_QUEUE], 16, 512 * 1024)
    guest.dev.process_queue(DEFLATE_QUEUE)
    assert (stats.refused_requests, stats.pfns_read, stats.deflated_pages) == (2, 0, 0)


def test_a_request_of_linux_size_is_served(guest: Guest) -> None:
    first = PAGES_AT // PAGE_SIZE
    pfns = list(range(first, first + 256))  # VIRTIO_BALLOON_ARRAY_PFNS_MAX
    guest.drivers[INFLATE_QUEUE].add_chain([_pfns(*pfns)], [])
    guest.dev.process_queue(INFLATE_QUEUE)
    stats = guest.dev.stats
    assert (stats.inflated_pages, stats.pfns_read, stats.discards) == (256, 256, 1)
    assert stats.refused_requests == 0


def test_one_kick_serves_a_bounded_number_of_requests(guest: Guest) -> None:
    """A ring full of requests is served MAX_CHAINS_PER_KICK at a time, the rest at later kicks
    (a driver on another vCPU could otherwise keep one kick, and the device lock, forever)."""
    driver = VirtioDriver(guest.mem, 64, desc_table=0xA0000, data_start=12 * MIB,
                          data_end=13 * MIB)  # fmt: skip
    driver.configure(guest.queues[INFLATE_QUEUE])
    first = PAGES_AT // PAGE_SIZE
    for i in range(64):
        driver.add_chain([_pfns(first + i)], [])
    guest.dev.process_queue(INFLATE_QUEUE)
    assert len(driver.used_entries()) == MAX_CHAINS_PER_KICK
    assert guest.dev.stats.pfns_read == MAX_CHAINS_PER_KICK
    assert not driver.used_flags & 1  # VIRTQ_USED_F_NO_NOTIFY clear: the next kick comes
    guest.dev.process_queue(INFLATE_QUEUE)
    assert len(driver.used_entries()) == 64 - MAX_CHAINS_PER_KICK
    assert guest.dev.stats.inflated_pages == 64


def test_stats_keep_only_the_spec_tags_and_read_a_bounded_prefix(guest: Guest) -> None:
    """Issue 14 item 6: a stats buffer of 65,546 entries (640 KiB), nearly all of unknown tags,
    keeps at most the ten named values and reads no more than MAX_STAT_ENTRIES entries."""
    entries = [struct.pack("<HQ", 4, 77)]
    entries += [struct.pack("<HQ", 10 + i % 65000, i) for i in range(65_544)]
    entries += [struct.pack("<HQ", 5, 99)]  # beyond the prefix: not read
    driver = guest.drivers[STATS_QUEUE]
    tracemalloc.start()
    try:
        driver.add_chain([b"".join(entries)], [])
        tracemalloc.reset_peak()
        guest.dev.process_queue(STATS_QUEUE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert guest.dev.guest_stats == {"free_memory": 77}
    assert guest.dev.stats.unknown_stat_tags == MAX_STAT_ENTRIES - 1
    assert peak < 64 * 1024
    assert set(guest.dev.save_state()["guest_stats"]) <= set(STAT_TAGS.values())


def test_a_stale_stats_head_fails_the_device_instead_of_raising(guest: Guest) -> None:
    """Issue 14 item 4: the held stats buffer's head no longer fits a queue the driver set up
    again (smaller) behind the device's back: returning it must fail the device, every time."""
    driver = guest.drivers[STATS_QUEUE]
    buffer = driver.alloc(10, struct.pack("<HQ", 4, 1))
    driver.write_desc(12, buffer, 10, 0, 0)
    driver.push_avail(12)
    guest.dev.process_queue(STATS_QUEUE)
    assert guest.dev.guest_stats == {"free_memory": 1}  # head 12 held
    queue = guest.queues[STATS_QUEUE]
    smaller = VirtioDriver(guest.mem, 8, desc_table=0xB0000, data_start=13 * MIB,
                           data_end=14 * MIB)  # fmt: skip
    smaller.configure(queue)
    smaller.start_at(queue.next_avail)
    smaller.add_chain([struct.pack("<HQ", 4, 2)], [])
    guest.dev.process_queue(STATS_QUEUE)  # must not raise
    assert guest.dev.needs_reset
    assert guest.interrupt.status & VIRTIO_MMIO_INT_CONFIG
    guest.dev.process_queue(STATS_QUEUE)  # nor later (a transport would not even call it)
    assert not guest.dev.request_stats()


def test_a_target_beyond_num_pages_is_a_clear_error(guest: Guest) -> None:
    """Issue 14 item 6: num_pages is le32; 2**32 used to break every later config read."""
    with pytest.raises(ValueError, match="num_pages"):
        guest.dev.set_target(1 << 32)
    with pytest.raises(ValueError, match="num_pages"):
        guest.dev.set_target(-1)
    guest.dev.set_target(NUM_PAGES_MAX)
    assert struct.unpack("<I", guest.dev.read_config(0, 4)) == (NUM_PAGES_MAX,)
    with pytest.raises(ValueError, match="le32"):
        Balloon().load_state({"target_pages": 1 << 32})


def test_a_failed_device_keeps_the_stats_buffer_and_stays_quiet(guest: Guest) -> None:
    """Found by tests/unit/test_device_fuzz.py: the host's refresh_stats handed the held
    buffer back (a used entry, a ring interrupt) on a device its driver had broken, which
    no kick may do until the driver resets it."""
    driver = guest.drivers[STATS_QUEUE]
    driver.add_chain([struct.pack("<HQ", 4, 123 * MIB)], [])
    guest.dev.process_queue(STATS_QUEUE)  # held
    guest.drivers[INFLATE_QUEUE].set_avail_idx(300)  # further ahead than the ring holds
    guest.dev.process_queue(INFLATE_QUEUE)
    assert guest.dev.needs_reset
    guest.interrupt.ack(0xFFFF_FFFF)
    assert not guest.dev.request_stats()
    assert driver.used_entries() == [] and guest.interrupt.status == 0
