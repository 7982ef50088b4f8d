"""The split virtqueue, driven by a fake driver that writes real rings into guest memory.

Good paths first (plain, chained, indirect, index wraparound, notification
suppression both ways), then every hostile ring we can think of: each must
end in a clean, counted QueueError, after which the next good request is
still served — except a corrupted avail.idx, which breaks the ring until reset.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio.queue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Descriptor,
    DescriptorChain,
    Queue,
    QueueError,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
    vring_need_event,
)
from ember.memory import GuestMemory
from tests.unit.virtio_driver import UsedElem, VirtioDriver

MEM_SIZE = 1 << 20
T = TypeVar("T")
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous(MEM_SIZE)
    yield m
    m.close()


@pytest.fixture
def driver(mem: GuestMemory) -> VirtioDriver:
    return VirtioDriver(mem, size=16)


@pytest.fixture
def queue(driver: VirtioDriver) -> Queue:
    q = Queue(256)
    driver.configure(q)
    return q


def pop(queue: Queue, mem: GuestMemory) -> DescriptorChain:
    chain = queue.pop(mem)
    assert chain is not None
    return chain


def read_all(mem: GuestMemory, buffers: list[tuple[int, int]]) -> bytes:
    return b"".join(mem.read(addr, n) for addr, n in buffers)


# -- constants and layout ---------------------------------------------------------------------


def test_abi_constants_match_the_spec() -> None:
    assert (NEXT, WRITE, INDIRECT) == (1, 2, 4)
    assert VIRTQ_USED_F_NO_NOTIFY == 1 and VIRTQ_AVAIL_F_NO_INTERRUPT == 1
    assert (VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX) == (28, 29)
    assert len(Descriptor(1, 2, 3, 4).pack()) == 16
    assert Descriptor.unpack_from(Descriptor(0x1122, 7, WRITE | NEXT, 9).pack()) == Descriptor(
        0x1122, 7, WRITE | NEXT, 9
    )
    assert Descriptor(0, 0, WRITE, 0).is_write_only and not Descriptor(0, 0, NEXT, 0).is_write_only
    assert (desc_table_bytes(256), avail_ring_bytes(256), used_ring_bytes(256)) == (
        4096,
        6 + 512,
        6 + 2048,
    )


@pytest.mark.parametrize("bad", [0, 3, 100, 65536])
def test_max_size_must_be_a_power_of_two_up_to_32768(bad: int) -> None:
    with pytest.raises(ValueError):
        Queue(bad)
    assert Queue(32768).size == 32768


def test_is_valid(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    assert queue.is_valid(mem)
    queue.ready = False
    assert not queue.is_valid(mem)
    for field, value in [
        ("size", 12),
        ("size", 0),
        ("size", 512),  # more than max_size
        ("desc_table", driver.desc_table + 8),
        ("avail_ring", driver.avail_ring + 1),
        ("used_ring", driver.used_ring + 2),
        ("desc_table", MEM_SIZE - 16),
        ("avail_ring", MEM_SIZE - 8),
        ("used_ring", MEM_SIZE - 64),
        ("used_ring", 1 << 40),
    ]:
        q = Queue(256)
        driver.configure(q)
        setattr(q, field, value)
        assert not q.is_valid(mem), (field, value)


# -- good paths -------------------------------------------------------------------------------


def test_empty_ring_pops_nothing(mem: GuestMemory, queue: Queue) -> None:
    assert queue.pop(mem) is None
    assert queue.pending(mem) == 0


def test_not_ready_pops_nothing(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    driver.add_chain([b"x"], [])
    queue.ready = False
    assert queue.pop(mem) is None
    assert queue.pending(mem) == 0


def test_single_readable_descriptor(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    head = driver.add_chain([b"hello"], [])
    assert queue.pending(mem) == 1
    chain = pop(queue, mem)
    assert chain.head == head
    assert read_all(mem, chain.readable) == b"hello"
    assert chain.writable == [] and chain.total_readable() == 5 and chain.total_writable() == 0
    assert queue.pending(mem) == 0 and queue.pop(mem) is None
    queue.add_used(mem, head, 0)
    assert driver.used_entries() == [UsedElem(head, 0)]


@pytest.mark.parametrize("indirect", [False, True])
def test_multi_descriptor_chain(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, indirect: bool
) -> None:
    head = driver.add_chain([b"head", b"er+body"], [3, 100], indirect=indirect)
    chain = pop(queue, mem)
    assert chain.head == head
    assert chain.readable == driver.readable(head)
    assert chain.writable == driver.writable(head)
    assert read_all(mem, chain.readable) == b"header+body"
    assert (chain.total_readable(), chain.total_writable()) == (11, 103)
    mem.write(chain.writable[0][0], b"ok!")
    mem.write(chain.writable[1][0], b"reply")
    queue.add_used(mem, chain.head, 8)
    assert driver.used_idx == 1
    assert driver.used_entries() == [UsedElem(head, 8)]
    assert driver.written(head, 8) == b"ok!reply"


def test_requests_come_out_in_order(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    heads = [driver.add_chain([bytes([i])], [1], indirect=i % 2 == 1) for i in range(5)]
    assert queue.pending(mem) == 5
    chains = [pop(queue, mem) for _ in range(5)]
    assert [c.head for c in chains] == heads
    assert [read_all(mem, c.readable) for c in chains] == [bytes([i]) for i in range(5)]
    for c in reversed(chains):  # completion order is the device's choice
        queue.add_used(mem, c.head, 1)
    assert [e.id for e in driver.used_entries()] == heads[::-1]


def test_direct_descriptors_then_an_indirect_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    """§2.7.5.3.2: zero or more chained descriptors may precede the one indirect descriptor."""
    a = driver.alloc(4, b"abcd")
    b = driver.alloc(4, b"efgh")
    w = driver.alloc(16)
    table = driver.write_indirect_table([(b, 4, NEXT, 1), (w, 16, WRITE, 0)])
    driver.write_desc(3, a, 4, NEXT, 7)
    # The WRITE flag of the descriptor naming the table is ignored.
    driver.write_desc(7, table, 32, INDIRECT | WRITE, 0)
    driver.push_avail(3)
    chain = pop(queue, mem)
    assert chain.head == 3
    assert chain.readable == [(a, 4), (b, 4)] and chain.writable == [(w, 16)]


def test_chain_of_exactly_queue_size_is_accepted(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    head = driver.add_chain([b"r"] * 8, [1] * 8)
    chain = pop(queue, mem)
    assert chain.head == head and len(chain.readable) == 8 and len(chain.writable) == 8


def test_indirect_table_of_queue_size_is_accepted(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    head = driver.add_chain([b"r"] * 16, [], indirect=True)
    assert len(pop(queue, mem).readable) == 16 == driver.size
    queue.add_used(mem, head, 0)


def test_zero_length_buffers_are_returned(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    head = driver.add_chain([b""], [0])
    chain = pop(queue, mem)
    assert chain.head == head and chain.total_readable() == chain.total_writable() == 0
    head = driver.add_chain([], [0, 0], indirect=True)
    chain = pop(queue, mem)
    assert chain.readable == [] and [n for _, n in chain.writable] == [0, 0]
    assert queue.invalid_chains == 0


def test_indices_wrap_past_65535(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    driver.start_at(65533, queue)
    served = []
    for round_ in range(3):
        heads = [driver.add_chain([bytes([round_, i])], [2]) for i in range(3)]
        assert queue.pending(mem) == 3
        for i, head in enumerate(heads):
            chain = pop(queue, mem)
            assert chain.head == head and read_all(mem, chain.readable) == bytes([round_, i])
            mem.write(chain.writable[0][0], b"ok")
            queue.add_used(mem, chain.head, 2)
            served.append(head)
        assert queue.pop(mem) is None
        assert [e.id for e in driver.used_entries()] == heads
    assert queue.next_avail == queue.next_used == (65533 + 9) & 0xFFFF == 6
    assert driver.used_idx == 6 and len(served) == 9


def test_pending_is_mod_2_16(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    driver.start_at(65535, queue)
    driver.add_chain([b"a"], [])
    driver.add_chain([b"b"], [])
    assert driver.avail_idx == 1 and queue.pending(mem) == 2


# -- notifications ----------------------------------------------------------------------------


def test_vring_need_event() -> None:
    assert vring_need_event(0, 1, 0)  # stepping 0 -> 1 passes event 0
    assert not vring_need_event(1, 1, 0)  # event 1 is passed only when idx goes beyond 1
    assert vring_need_event(5, 10, 3)
    assert not vring_need_event(11, 10, 3)
    assert vring_need_event(65535, 2, 65534)  # across the wrap
    assert not vring_need_event(3, 2, 65534)


def serve_one(driver: VirtioDriver, queue: Queue, mem: GuestMemory) -> None:
    driver.add_chain([b"x"], [])
    queue.add_used(mem, pop(queue, mem).head, 0)
    driver.used_entries()


def test_interrupt_without_event_idx(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    assert not queue.needs_notification(mem)  # nothing was completed
    serve_one(driver, queue, mem)
    assert queue.needs_notification(mem)
    assert not queue.needs_notification(mem)  # already told about it
    driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    serve_one(driver, queue, mem)
    assert not queue.needs_notification(mem)
    driver.avail_flags = 0
    serve_one(driver, queue, mem)
    assert queue.needs_notification(mem)


def test_interrupt_with_event_idx(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    queue.event_idx = True
    driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT  # must be ignored with event idx
    driver.used_event = 0  # "interrupt me once entry 0 is used"
    serve_one(driver, queue, mem)
    assert queue.needs_notification(mem)
    driver.used_event = 3  # "... once used.idx passes 3", i.e. reaches 4
    for expected_idx in (2, 3):
        serve_one(driver, queue, mem)
        assert driver.used_idx == expected_idx
        assert not queue.needs_notification(mem)
    serve_one(driver, queue, mem)
    assert queue.needs_notification(mem)
    serve_one(driver, queue, mem)
    assert not queue.needs_notification(mem)  # used_event is behind us now


def test_event_idx_batched_completions_that_step_over_used_event(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    """Several add_used before one check: the test is "passed", not "equal" (as Linux does)."""
    queue.event_idx = True
    driver.used_event = 1
    heads = [driver.add_chain([b"x"], []) for _ in range(4)]
    for head in heads:
        assert pop(queue, mem).head == head
        queue.add_used(mem, head, 0)
    assert queue.needs_notification(mem)


def test_event_idx_across_the_wrap(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    queue.event_idx = True
    driver.start_at(65534, queue)
    driver.used_event = 65535
    serve_one(driver, queue, mem)  # used.idx 65534 -> 65535
    assert not queue.needs_notification(mem)
    serve_one(driver, queue, mem)  # -> 0: passes 65535
    assert driver.used_idx == 0 and queue.needs_notification(mem)


def test_event_idx_after_2_16_silent_completions(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    """More than 65536 completions without an interrupt must have passed any used_event."""
    queue.event_idx = True
    driver.used_event = 5
    queue.signalled_used = queue.next_used = 10
    queue.num_added = 0x10000
    assert queue.needs_notification(mem)


def test_set_notification_without_event_idx(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    queue.set_notification(mem, False)
    assert driver.used_flags == VIRTQ_USED_F_NO_NOTIFY
    queue.set_notification(mem, True)
    assert driver.used_flags == 0
    assert driver.avail_event == 0


def test_set_notification_with_event_idx(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    queue.event_idx = True
    for _ in range(3):
        serve_one(driver, queue, mem)
    queue.set_notification(mem, True)
    assert driver.avail_event == 3 == queue.next_avail
    assert driver.used_flags == 0
    driver.add_chain([b"x"], [])
    queue.set_notification(mem, False)  # nothing to write: avail_event stays behind
    assert driver.avail_event == 3 and driver.used_flags == 0
    pop(queue, mem)
    queue.set_notification(mem, True)
    assert driver.avail_event == 4


# -- hostile drivers: each request fails cleanly, the next one is served ------------------------


def expect_rejected(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, head: int | None, match: str = ""
) -> None:
    """The pending request fails with QueueError(head), is counted, and the queue goes on."""
    before = queue.invalid_chains
    with pytest.raises(QueueError, match=match) as info:
        queue.pop(mem)
    assert info.value.head == head
    assert queue.invalid_chains == before + 1
    assert not queue.broken
    if head is not None:
        queue.add_used(mem, head, 0)
        assert driver.used_entries()[-1] == UsedElem(head, 0)
    good = driver.add_chain([b"still fine"], [4])
    chain = pop(queue, mem)
    assert chain.head == good and read_all(mem, chain.readable) == b"still fine"
    queue.add_used(mem, good, 0)
    driver.used_entries()


def offer_raw(driver: VirtioDriver, *descs: tuple[int, int, int, int], head: int = 10) -> int:
    """Write descriptors head, head+1, ... verbatim and offer ``head``."""
    for i, d in enumerate(descs):
        driver.write_desc(head + i, *d)
    driver.push_avail(head)
    return head


def test_descriptor_loop(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    a = driver.alloc(8)
    offer_raw(driver, (a, 8, NEXT, 11), (a, 8, NEXT, 10))
    expect_rejected(mem, driver, queue, 10, "loop")


def test_descriptor_pointing_at_itself(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    offer_raw(driver, (driver.alloc(8), 8, WRITE | NEXT, 10))
    expect_rejected(mem, driver, queue, 10, "loop")


@pytest.mark.parametrize("nxt", [16, 17, 0xFFFF])
def test_next_beyond_the_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, nxt: int
) -> None:
    offer_raw(driver, (driver.alloc(8), 8, NEXT, nxt))
    expect_rejected(mem, driver, queue, 10, "next index")


@pytest.mark.parametrize("head", [16, 0xFFFF])
def test_avail_entry_beyond_the_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, head: int
) -> None:
    driver.push_avail(head)
    expect_rejected(mem, driver, queue, None, "outside a table")


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (MEM_SIZE, 1),  # just past the end
        (MEM_SIZE - 4, 8),  # straddles the end
        (MEM_SIZE + 4096, 0),  # even empty, an address must be RAM
        (0xC000_0000, 16),  # the MMIO gap
        (0, 0xFFFF_FFFF),  # a 4 GiB length
        (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wraps a 64-bit address
    ],
)
def test_buffer_outside_guest_ram(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, addr: int, length: int
) -> None:
    offer_raw(driver, (driver.alloc(4), 4, NEXT, 11), (addr, length, WRITE, 0))
    expect_rejected(mem, driver, queue, 10, "outside guest RAM")


def test_readable_after_writable(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    a = driver.alloc(8)
    offer_raw(driver, (a, 8, WRITE | NEXT, 11), (a, 8, 0, 0))
    expect_rejected(mem, driver, queue, 10, "readable buffer follows")


def test_readable_after_writable_inside_an_indirect_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    a = driver.alloc(8)
    table = driver.write_indirect_table([(a, 8, WRITE | NEXT, 1), (a, 8, 0, 0)])
    offer_raw(driver, (table, 32, INDIRECT, 0))
    expect_rejected(mem, driver, queue, 10, "readable buffer follows")


def test_nested_indirect(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    inner = driver.write_indirect_table([(driver.alloc(8), 8, 0, 0)])
    outer = driver.write_indirect_table([(inner, 16, INDIRECT, 0)])
    offer_raw(driver, (outer, 16, INDIRECT, 0))
    expect_rejected(mem, driver, queue, 10, "nested")


def test_indirect_with_next(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    table = driver.write_indirect_table([(driver.alloc(8), 8, 0, 0)])
    offer_raw(driver, (table, 16, INDIRECT | NEXT, 11), (driver.alloc(8), 8, 0, 0))
    expect_rejected(mem, driver, queue, 10, "INDIRECT together with")


@pytest.mark.parametrize(
    ("table_addr", "table_len", "match"),
    [
        (None, 24, "multiple of 16"),
        (None, 0, "multiple of 16"),
        (None, 17 * 16, "exceeds the queue size"),  # more entries than the queue's size
        (MEM_SIZE - 16, 32, "outside guest RAM"),
        (1 << 40, 16, "outside guest RAM"),
    ],
)
def test_bad_indirect_table(
    mem: GuestMemory,
    driver: VirtioDriver,
    queue: Queue,
    table_addr: int | None,
    table_len: int,
    match: str,
) -> None:
    buf = driver.alloc(8)
    if table_addr is None:
        table_addr = driver.write_indirect_table([(buf, 8, 0, 0)] * 17)
    offer_raw(driver, (table_addr, table_len, INDIRECT, 0))
    expect_rejected(mem, driver, queue, 10, match)


def test_loop_inside_an_indirect_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    a = driver.alloc(8)
    table = driver.write_indirect_table([(a, 8, NEXT, 1), (a, 8, NEXT, 0)])
    offer_raw(driver, (table, 32, INDIRECT, 0))
    expect_rejected(mem, driver, queue, 10, "loop")


def test_indirect_next_beyond_its_table(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    table = driver.write_indirect_table([(driver.alloc(8), 8, NEXT, 1)])
    offer_raw(driver, (table, 16, INDIRECT, 0))
    expect_rejected(mem, driver, queue, 10, "indirect next index")


def test_total_length_beyond_4_gib() -> None:
    """32768 overlapping 128 KiB + 1 buffers: each in RAM, together more than a le32 can say."""
    mem = GuestMemory.anonymous(4 << 20)
    try:
        driver = VirtioDriver(mem, size=32768)
        queue = Queue(32768)
        driver.configure(queue)
        buf = driver.alloc((128 << 10) + 1)
        table = driver.write_indirect_table(
            [(buf, (128 << 10) + 1, NEXT, i + 1) for i in range(32768)]
        )
        offer_raw(driver, (table, 16 * 32768, INDIRECT, 0), head=0)
        expect_rejected(mem, driver, queue, 0, "4 GiB")
    finally:
        mem.close()


def test_longest_loop_ends_quickly() -> None:
    """The worst a 32768-entry table can do: one loop through all of it, walked once."""
    mem = GuestMemory.anonymous(2 << 20)
    try:
        driver = VirtioDriver(mem, size=32768)
        queue = Queue(32768)
        driver.configure(queue)
        buf = driver.alloc(64)
        for i in range(32768):
            driver.write_desc(i, buf, 64, NEXT, (i + 1) % 32768)
        driver.push_avail(0)
        start = time.monotonic()
        expect_rejected(mem, driver, queue, 0, "loop")
        assert time.monotonic() - start < 5.0
    finally:
        mem.close()


def test_descriptor_table_outside_ram(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    queue.desc_table = MEM_SIZE - 64  # heads 0..3 readable, 4.. not
    driver.push_avail(9)
    with pytest.raises(QueueError, match="unreadable") as info:
        queue.pop(mem)
    assert info.value.head == 9 and queue.invalid_chains == 1 and not queue.broken


def test_avail_idx_far_ahead_breaks_the_ring(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue
) -> None:
    driver.add_chain([b"x"], [])
    driver.set_avail_idx(driver.avail_idx + 70000)  # 70000 mod 2**16 = 4464 > 16
    with pytest.raises(QueueError, match="broken") as info:
        queue.pop(mem)
    assert info.value.head is None and queue.broken and queue.invalid_chains == 1
    driver.set_avail_idx(1)  # even a now-sane ring stays broken ...
    assert queue.pop(mem) is None and queue.pending(mem) == 0
    queue.reset()  # ... until the device is reset and the driver sets the queue up again
    assert not queue.broken and not queue.ready and queue.invalid_chains == 1
    driver = VirtioDriver(mem, size=16)
    driver.configure(queue)
    head = driver.add_chain([b"again"], [])
    assert pop(queue, mem).head == head


def test_avail_ring_outside_ram_breaks_the_ring(mem: GuestMemory, queue: Queue) -> None:
    queue.avail_ring = MEM_SIZE
    with pytest.raises(QueueError) as info:
        queue.pop(mem)
    assert info.value.head is None and queue.broken
    assert queue.pop(mem) is None


def test_nonsense_size_breaks_the_ring(mem: GuestMemory, queue: Queue) -> None:
    queue.size = 12
    with pytest.raises(QueueError):
        queue.pop(mem)
    assert queue.broken


def test_add_used_checks_its_arguments(mem: GuestMemory, queue: Queue) -> None:
    with pytest.raises(QueueError) as info:
        queue.add_used(mem, 16, 0)
    assert info.value.head is None and not queue.broken
    with pytest.raises(ValueError):
        queue.add_used(mem, 0, 1 << 32)


@pytest.mark.parametrize("call", ["add_used", "set_notification"])
def test_used_ring_outside_ram_breaks_the_ring(
    mem: GuestMemory, driver: VirtioDriver, queue: Queue, call: str
) -> None:
    driver.add_chain([b"x"], [])
    head = pop(queue, mem).head
    queue.used_ring = MEM_SIZE
    with pytest.raises(QueueError, match="used ring unwritable") as info:
        if call == "add_used":
            queue.add_used(mem, head, 0)
        else:
            queue.set_notification(mem, True)
    assert info.value.head is None and queue.broken
    # A broken ring is left alone: nothing raises again, nothing is served.
    queue.add_used(mem, head, 0)
    queue.set_notification(mem, False)
    assert not queue.needs_notification(mem)
    assert queue.pop(mem) is None and queue.pending(mem) == 0


def test_reset(mem: GuestMemory, driver: VirtioDriver, queue: Queue) -> None:
    driver.add_chain([b"x"], [])
    queue.event_idx = True
    queue.add_used(mem, pop(queue, mem).head, 1)
    queue.reset()
    assert (queue.next_avail, queue.next_used, queue.num_added) == (0, 0, 0)
    assert not queue.ready and not queue.event_idx and queue.size == 256
    assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (0, 0, 0)


# -- property tests: random rings never crash the device --------------------------------------

PROP_MEM = 64 << 10
U16 = struct.Struct("<H")


def drive_to_exhaustion(mem: GuestMemory, queue: Queue) -> None:
    """What a device does: pop until empty, completing good and bad requests alike."""
    for _ in range(queue.size + 2):  # at most size entries can be pending
        start = time.monotonic()
        try:
            chain = queue.pop(mem)
        except QueueError as exc:
            if exc.head is not None:
                queue.add_used(mem, exc.head, 0)
            if queue.broken:
                assert queue.pop(mem) is None
                break
            continue
        finally:
            assert time.monotonic() - start < 1.0
        if chain is None:
            break
        for addr, n in chain.readable + chain.writable:
            assert mem.contains(addr, n)
        assert chain.total_readable() + chain.total_writable() <= 0xFFFF_FFFF
        queue.add_used(mem, chain.head, chain.total_writable())
    else:
        pytest.fail("pop kept returning chains beyond the ring size")
    assert queue.broken or queue.pending(mem) == 0
    queue.needs_notification(mem)
    queue.set_notification(mem, False)
    queue.set_notification(mem, True)
    queue.needs_notification(mem)


SIZES = st.sampled_from([1, 2, 4, 8, 16, 32])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=SIZES, data=st.data(), next_avail=st.integers(0, 0xFFFF), event_idx=st.booleans())
def test_random_ring_bytes_only_raise_queue_error(
    size: int, data: st.DataObject, next_avail: int, event_idx: bool
) -> None:
    mem = GuestMemory.anonymous(PROP_MEM)
    try:
        driver = VirtioDriver(mem, size=size)
        queue = Queue(32)
        driver.configure(queue, event_idx=event_idx)
        for addr, n in [
            (driver.desc_table, desc_table_bytes(size)),
            (driver.avail_ring, avail_ring_bytes(size)),
            (driver.used_ring, used_ring_bytes(size)),
        ]:
            mem.write(addr, data.draw(st.binary(min_size=n, max_size=n)))
        # Mostly a plausible number of pending entries, sometimes anything at all.
        ahead = data.draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)))
        mem.write(driver.avail_ring + 2, U16.pack((next_avail + ahead) & 0xFFFF))
        queue.next_avail = next_avail
        queue.next_used = data.draw(st.integers(0, 0xFFFF))
        drive_to_exhaustion(mem, queue)
    finally:
        mem.close()


PLAIN_FLAGS = [0, NEXT, WRITE, NEXT | WRITE, INDIRECT]


def mostly(plain: st.SearchStrategy[T], wild: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``plain`` seven times out of eight: hostile values often, but not in every field."""
    return st.integers(0, 7).flatmap(lambda k: wild if k == 0 else plain)


def descriptors(
    size: int, buffers: int, tables: list[tuple[int, int]]
) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """Mostly plausible descriptors, so that long chains and indirect tables get explored.

    A buffer lies in the 4 KiB at ``buffers`` or is wild; an INDIRECT one may
    name one of ``tables`` exactly; ``next`` mostly stays inside the table.
    """
    plain_buffer = st.tuples(st.integers(buffers, buffers + 4096), st.integers(0, 64))
    if tables:
        plain_buffer = st.one_of(plain_buffer, st.sampled_from(tables))
    where = mostly(
        plain_buffer, st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFF_FFFF))
    )
    flags = mostly(st.sampled_from(PLAIN_FLAGS), st.integers(0, 0xFFFF))
    nxt = mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF))
    return st.tuples(where, flags, nxt).map(lambda t: (*t[0], t[1], t[2]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=SIZES, data=st.data(), event_idx=st.booleans())
def test_random_descriptors_only_raise_queue_error(
    size: int, data: st.DataObject, event_idx: bool
) -> None:
    mem = GuestMemory.anonymous(PROP_MEM)
    try:
        driver = VirtioDriver(mem, size=size)
        queue = Queue(32)
        driver.configure(queue, event_idx=event_idx)
        buffers = driver.alloc(4096)
        # Indirect tables first, so descriptors (and later tables: nesting) can point at them.
        tables: list[tuple[int, int]] = []
        for _ in range(data.draw(st.integers(0, 3))):
            count = data.draw(st.integers(1, size + 1))
            table = [data.draw(descriptors(count, buffers, tables)) for _ in range(count)]
            tables.append((driver.write_indirect_table(table), 16 * count))
        for i in range(size):
            driver.write_desc(i, *data.draw(descriptors(size, buffers, tables)))
        heads = data.draw(
            st.lists(mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)), max_size=size)
        )
        for head in heads:
            driver.push_avail(head)
        driver.used_event = data.draw(st.integers(0, 0xFFFF))
        driver.avail_flags = data.draw(st.integers(0, 0xFFFF))
        drive_to_exhaustion(mem, queue)
        assert queue.invalid_chains <= len(heads) and not queue.broken
    finally:
        mem.close()


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 70000),
    desc=st.integers(-8, 1 << 65),
    avail=st.integers(-8, 1 << 65),
    used=st.integers(-8, 1 << 65),
    ready=st.booleans(),
    event_idx=st.booleans(),
)
def test_random_queue_configuration_only_raises_queue_error(
    size: int, desc: int, avail: int, used: int, ready: bool, event_idx: bool
) -> None:
    mem = GuestMemory.anonymous(PROP_MEM)
    try:
        queue = Queue(256)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, desc, avail, used
        queue.ready, queue.event_idx = ready, event_idx
        queue.is_valid(mem)
        for call in (
            lambda: queue.pending(mem),
            lambda: queue.pop(mem),
            lambda: queue.add_used(mem, 0, 0),
            lambda: queue.needs_notification(mem),
            lambda: queue.set_notification(mem, True),
            lambda: queue.set_notification(mem, False),
        ):
            with contextlib.suppress(QueueError):
                call()
    finally:
        mem.close()
