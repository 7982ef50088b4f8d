"""virtio-balloon against a fake driver writing real rings (no KVM): inflate frees the pages,
reporting frees free ranges, statistics come and go through the one held buffer."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from ember.devices.virtio.balloon.device import (
    DEFLATE_QUEUE,
    INFLATE_QUEUE,
    REPORTING_QUEUE,
    STATS_QUEUE,
    Balloon,
    _runs,
)
from ember.devices.virtio.device import VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, Interrupt
from ember.devices.virtio.queue import Queue
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
