"""The virtio-mmio transport (virtio 1.2 §4.2.2), driven register by register like Linux does.

``linux_probe`` replays what ``drivers/virtio/virtio_mmio.c`` and
``drivers/virtio/virtio.c`` write and read when a device appears (§3.1.1):
identify, reset, ACKNOWLEDGE, DRIVER, feature negotiation through the two
32-bit windows, FEATURES_OK read back, per-queue set-up, DRIVER_OK.  Kicks
are QueueNotify writes (unit tests register no ioeventfd), interrupts are
checked both in InterruptStatus and on the device's real eventfd.  Every
hostile access must be counted and leave the transport working.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.devices.virtio.balloon.device import (
    STATS_QUEUE,
    VIRTIO_BALLOON_F_STATS_VQ,
    Balloon,
)
from ember.devices.virtio.block.device import (
    QUEUE_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
)
from ember.devices.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Interrupt,
    VirtioDevice,
)
from ember.devices.virtio.mmio import (
    VIRT_MAGIC,
    VIRT_VENDOR,
    VIRT_VERSION,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    MmioTransport,
)
from ember.devices.virtio.queue import DescriptorChain
from ember.memory import GuestMemory
from tests.unit.virtio_driver import UsedElem, VirtioDriver

MEM_SIZE = 4 << 20
DISK_SIZE = 1 << 20
ACK, DRIVER, FEATURES_OK, DRIVER_OK = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
)
VERSION_1 = 1 << VIRTIO_F_VERSION_1
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
ECHO_F_REVERSE = 1 << 0  # the test device's one device-specific feature
ECHO_ID = 0x2A


# -- a tiny device and register access --------------------------------------------------------


class EchoDevice(VirtioDevice):
    """Two queues; each request's readable bytes come back reversed in its writable buffers."""

    device_id = ECHO_ID
    queue_max_sizes = (16, 8)

    def __init__(self) -> None:
        super().__init__()
        self.served: list[tuple[int, bytes]] = []
        self.config = bytearray(b"ECHOCONF")

    def device_features(self) -> int:
        return VERSION_1 | EVENT_IDX | ECHO_F_REVERSE

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data
        del self.config[8:]

    def process_queue(self, index: int) -> None:
        def handle(chain: DescriptorChain) -> int:
            memory = self.memory
            assert memory is not None
            data = b"".join(memory.read(a, n) for a, n in chain.readable)
            self.served.append((index, data))
            reply = data[::-1][: chain.total_writable()]
            pos = 0
            for addr, n in chain.writable:
                memory.write(addr, reply[pos : pos + n])
                pos += n
            return len(reply)

        self.serve_queue(index, handle)


class Regs:
    """32-bit register access to a transport, the only width the driver uses below 0x100."""

    def __init__(self, transport: MmioTransport) -> None:
        self.t = transport

    def __getitem__(self, offset: int) -> int:
        value: int = struct.unpack("<I", self.t.read(offset, 4))[0]
        return value

    def __setitem__(self, offset: int, value: int) -> None:
        self.t.write(offset, struct.pack("<I", value & 0xFFFFFFFF))

    def add_status(self, bits: int) -> None:
        """virtio_add_status(): read, or in the bits, write back."""
        self[VIRTIO_MMIO_STATUS] = self[VIRTIO_MMIO_STATUS] | bits


def pending_signals(interrupt: Interrupt) -> int:
    """Drain the interrupt's eventfd: how many times it was written since the last drain."""
    try:
        return os.eventfd_read(interrupt.eventfd)
    except BlockingIOError:
        return 0


def read_features(regs: Regs) -> int:
    """vm_get_features(): the high window first, then the low one."""
    regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = 1
    high = regs[VIRTIO_MMIO_DEVICE_FEATURES]
    regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = 0
    return high << 32 | regs[VIRTIO_MMIO_DEVICE_FEATURES]


def write_features(regs: Regs, features: int) -> None:
    """vm_finalize_features()."""
    regs[VIRTIO_MMIO_DRIVER_FEATURES_SEL] = 1
    regs[VIRTIO_MMIO_DRIVER_FEATURES] = features >> 32
    regs[VIRTIO_MMIO_DRIVER_FEATURES_SEL] = 0
    regs[VIRTIO_MMIO_DRIVER_FEATURES] = features & 0xFFFFFFFF


def setup_queue(regs: Regs, index: int, driver: VirtioDriver) -> None:
    """vm_setup_vq() for a virtio-mmio version 2 device."""
    regs[VIRTIO_MMIO_QUEUE_SEL] = index
    assert regs[VIRTIO_MMIO_QUEUE_READY] == 0  # "queue already in use"
    num_max = regs[VIRTIO_MMIO_QUEUE_NUM_MAX]
    assert num_max >= driver.size  # 0 would mean "no such queue"
    regs[VIRTIO_MMIO_QUEUE_NUM] = driver.size
    for low, high, addr in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, driver.desc_table),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, driver.avail_ring),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, driver.used_ring),
    ]:
        regs[low] = addr & 0xFFFFFFFF
        regs[high] = addr >> 32
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    assert regs[VIRTIO_MMIO_QUEUE_READY] == 1


def negotiate(regs: Regs, want: int) -> bool:
    """§3.1.1 steps 1-6: returns whether the device accepted FEATURES_OK."""
    assert regs[VIRTIO_MMIO_MAGIC_VALUE] == VIRT_MAGIC
    assert regs[VIRTIO_MMIO_VERSION] == 2
    assert regs[VIRTIO_MMIO_DEVICE_ID] != 0
    regs[VIRTIO_MMIO_STATUS] = 0
    assert regs[VIRTIO_MMIO_STATUS] == 0
    regs.add_status(ACK)
    regs.add_status(DRIVER)
    write_features(regs, read_features(regs) & want)
    regs.add_status(FEATURES_OK)
    return bool(regs[VIRTIO_MMIO_STATUS] & FEATURES_OK)


def linux_probe(regs: Regs, drivers: list[VirtioDriver], want: int = ~0) -> None:
    """The whole Linux bring-up: negotiation, find_vqs(), virtio_device_ready()."""
    assert negotiate(regs, want)
    for index, driver in enumerate(drivers):
        setup_queue(regs, index, driver)
    regs.add_status(DRIVER_OK)
    assert regs[VIRTIO_MMIO_STATUS] == ACK | DRIVER | FEATURES_OK | DRIVER_OK


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous(MEM_SIZE)
    yield m
    m.close()


@pytest.fixture
def interrupt() -> Iterator[Interrupt]:
    irq = Interrupt()
    yield irq
    irq.close()


@pytest.fixture
def echo() -> EchoDevice:
    return EchoDevice()


@pytest.fixture
def transport(echo: EchoDevice, mem: GuestMemory, interrupt: Interrupt) -> MmioTransport:
    return MmioTransport(echo, mem, interrupt)


@pytest.fixture
def regs(transport: MmioTransport) -> Regs:
    return Regs(transport)


@pytest.fixture
def drivers(mem: GuestMemory) -> list[VirtioDriver]:
    """One driver per EchoDevice queue, their rings and buffers apart."""
    return [
        VirtioDriver(mem, size=16, desc_table=0x1000, data_end=0x80000),
        VirtioDriver(mem, size=8, desc_table=0x80000),
    ]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(DISK_SIZE))
    return path


@pytest.fixture
def block(disk: Path) -> Iterator[Block]:
    dev = Block(disk, serial="mmio-test")
    yield dev
    dev.close()


# -- identification and negotiation -----------------------------------------------------------


def test_identification_registers(regs: Regs, echo: EchoDevice) -> None:
    assert regs[VIRTIO_MMIO_MAGIC_VALUE] == VIRT_MAGIC == int.from_bytes(b"virt", "little")
    assert regs[VIRTIO_MMIO_VERSION] == VIRT_VERSION == 2
    assert regs[VIRTIO_MMIO_DEVICE_ID] == ECHO_ID
    assert regs[VIRTIO_MMIO_VENDOR_ID] == VIRT_VENDOR
    assert regs[VIRTIO_MMIO_STATUS] == 0
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    assert regs.t.bad_accesses == 0


def test_register_offsets_are_the_specs() -> None:
    """§4.2.2 table 4.1, spot-checked against the numbers Linux's virtio_mmio.h uses."""
    assert (VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL) == (0x010, 0x024)
    assert (VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_NUM) == (
        0x030,
        0x034,
        0x038,
    )
    assert (VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_NOTIFY) == (0x044, 0x050)
    assert (VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_STATUS) == (
        0x060,
        0x064,
        0x070,
    )
    assert (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_AVAIL_LOW) == (0x080, 0x090)
    assert (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH) == (0x0A0, 0x0A4)
    assert (VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_CONFIG) == (0x0FC, 0x100)
    assert (VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_CONFIG) == (1, 2)
    assert (ACK, DRIVER, DRIVER_OK, FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET) == (1, 2, 4, 8, 64)


def test_device_features_through_both_windows(regs: Regs, echo: EchoDevice) -> None:
    regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = 0
    assert regs[VIRTIO_MMIO_DEVICE_FEATURES] == EVENT_IDX | ECHO_F_REVERSE
    regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = 1
    assert regs[VIRTIO_MMIO_DEVICE_FEATURES] == 1  # VERSION_1 is bit 0 of the high word
    for sel in (2, 3, 0xFFFFFFFF):
        regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = sel
        assert regs[VIRTIO_MMIO_DEVICE_FEATURES] == 0
    assert read_features(regs) == echo.device_features()


def test_linux_probe_activates_the_device(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, drivers: list[VirtioDriver]
) -> None:
    linux_probe(regs, drivers)
    assert echo.active and not echo.needs_reset
    assert echo.acked_features == VERSION_1 | EVENT_IDX | ECHO_F_REVERSE
    assert echo.queues is transport.queues
    for queue, driver in zip(transport.queues, drivers, strict=True):
        assert queue.ready and queue.size == driver.size and queue.event_idx
        assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (
            driver.desc_table,
            driver.avail_ring,
            driver.used_ring,
        )
    assert transport.bad_accesses == 0


def test_driver_may_ack_a_subset(regs: Regs, echo: EchoDevice, drivers: list[VirtioDriver]) -> None:
    linux_probe(regs, drivers, want=VERSION_1)
    assert echo.acked_features == VERSION_1
    assert not any(q.event_idx for q in echo.queues)


@pytest.mark.parametrize(
    "features",
    [
        EVENT_IDX | ECHO_F_REVERSE,  # VERSION_1 omitted: a legacy driver on a modern device
        0,
        VERSION_1 | 1 << 5,  # not offered (low window)
        VERSION_1 | 1 << 40,  # not offered (high window)
        VERSION_1 | 1 << 63,
    ],
)
def test_features_ok_refused(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, features: int
) -> None:
    regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER
    write_features(regs, features)
    regs.add_status(FEATURES_OK)
    status = regs[VIRTIO_MMIO_STATUS]
    assert status == ACK | DRIVER  # the driver reads FEATURES_OK back and gives up
    assert echo.acked_features == 0
    # It then says FAILED; DRIVER_OK without FEATURES_OK never activates anything.
    regs.add_status(DRIVER_OK)
    assert not echo.active
    regs.add_status(VIRTIO_CONFIG_S_FAILED)
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_FAILED and not echo.active
    # A reset and a correct negotiation are still accepted.
    regs[VIRTIO_MMIO_STATUS] = 0
    assert negotiate(regs, VERSION_1)
    assert echo.acked_features == VERSION_1


def test_driver_ok_without_features_ok_is_refused(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, drivers: list[VirtioDriver]
) -> None:
    regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER
    write_features(regs, VERSION_1)
    setup_queue(regs, 0, drivers[0])
    regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER | DRIVER_OK
    assert not echo.active and transport.bad_accesses == 1
    assert not regs[VIRTIO_MMIO_STATUS] & DRIVER_OK


def test_driver_features_are_frozen_after_features_ok(
    regs: Regs, echo: EchoDevice, transport: MmioTransport
) -> None:
    assert negotiate(regs, VERSION_1)
    regs[VIRTIO_MMIO_DRIVER_FEATURES_SEL] = 0
    regs[VIRTIO_MMIO_DRIVER_FEATURES] = ECHO_F_REVERSE
    assert transport.bad_accesses == 1
    assert transport.driver_features == echo.acked_features == VERSION_1


def test_driver_features_window_beyond_64_bits_is_refused(
    regs: Regs, transport: MmioTransport
) -> None:
    regs[VIRTIO_MMIO_DRIVER_FEATURES_SEL] = 2
    regs[VIRTIO_MMIO_DRIVER_FEATURES] = 0xFFFFFFFF
    assert transport.bad_accesses == 1 and transport.driver_features == 0


# -- queues, kicks and interrupts -------------------------------------------------------------


def test_queue_registers(regs: Regs, transport: MmioTransport) -> None:
    regs[VIRTIO_MMIO_QUEUE_SEL] = 0
    assert regs[VIRTIO_MMIO_QUEUE_NUM_MAX] == 16
    regs[VIRTIO_MMIO_QUEUE_SEL] = 1
    assert regs[VIRTIO_MMIO_QUEUE_NUM_MAX] == 8
    regs[VIRTIO_MMIO_QUEUE_NUM] = 4
    regs[VIRTIO_MMIO_QUEUE_DESC_LOW] = 0x1234_5670
    regs[VIRTIO_MMIO_QUEUE_DESC_HIGH] = 0x9
    regs[VIRTIO_MMIO_QUEUE_AVAIL_LOW] = 0x2000
    regs[VIRTIO_MMIO_QUEUE_AVAIL_HIGH] = 0xFFFF_FFFF
    regs[VIRTIO_MMIO_QUEUE_USED_HIGH] = 0x1  # high before low: each half is independent
    regs[VIRTIO_MMIO_QUEUE_USED_LOW] = 0x3000
    q = transport.queues[1]
    assert q.size == 4 and not q.ready
    assert q.desc_table == 0x9_1234_5670
    assert q.avail_ring == 0xFFFF_FFFF_0000_2000
    assert q.used_ring == 0x1_0000_3000
    regs[VIRTIO_MMIO_QUEUE_DESC_HIGH] = 0  # rewriting a half replaces only that half
    assert q.desc_table == 0x1234_5670
    assert transport.queues[0].desc_table == 0  # the other queue was never selected
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    assert regs[VIRTIO_MMIO_QUEUE_READY] == 1 and q.ready
    regs[VIRTIO_MMIO_QUEUE_READY] = 0
    assert regs[VIRTIO_MMIO_QUEUE_READY] == 0 and not q.ready
    assert transport.bad_accesses == 0


def test_queue_notify_serves_the_queue_and_interrupts(
    regs: Regs,
    echo: EchoDevice,
    interrupt: Interrupt,
    drivers: list[VirtioDriver],
) -> None:
    linux_probe(regs, drivers, want=VERSION_1)
    d0, d1 = drivers
    h0 = d0.add_chain([b"hello"], [5])
    h1 = d1.add_chain([b"abc", b"def"], [2, 4])
    assert echo.served == []  # nothing happens until the kick
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 1
    assert echo.served == [(1, b"abcdef")]
    assert d1.used_entries() == [UsedElem(h1, 6)] and d1.written(h1) == b"fedcba"
    assert d0.used_entries() == []
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_VRING
    assert pending_signals(interrupt) == 1
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = VIRTIO_MMIO_INT_VRING
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert d0.used_entries() == [UsedElem(h0, 5)] and d0.written(h0) == b"olleh"
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_VRING
    assert pending_signals(interrupt) == 1
    # A kick with nothing new completes nothing and does not interrupt.
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = VIRTIO_MMIO_INT_VRING
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert pending_signals(interrupt) == 0 and regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    # A kick for a queue that does not exist is ignored.
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 2
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0xFFFF
    assert len(echo.served) == 2 and regs.t.bad_accesses == 0


def test_notify_from_the_ioeventfd_path(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, drivers: list[VirtioDriver]
) -> None:
    linux_probe(regs, drivers)
    head = drivers[0].add_chain([b"xy"], [2])
    transport.notify(0)
    assert drivers[0].used_entries() == [UsedElem(head, 2)]
    transport.notify(7)  # no such queue
    assert len(echo.served) == 1


def test_kick_before_driver_ok_is_ignored(
    regs: Regs, echo: EchoDevice, drivers: list[VirtioDriver]
) -> None:
    assert negotiate(regs, VERSION_1)
    setup_queue(regs, 0, drivers[0])
    drivers[0].add_chain([b"early"], [5])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert echo.served == [] and drivers[0].used_idx == 0
    regs.add_status(DRIVER_OK)
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert echo.served == [(0, b"early")]


def test_no_interrupt_when_the_driver_suppresses_it(
    regs: Regs, interrupt: Interrupt, drivers: list[VirtioDriver]
) -> None:
    linux_probe(regs, drivers, want=VERSION_1)
    d0 = drivers[0]
    d0.avail_flags = 1  # VIRTQ_AVAIL_F_NO_INTERRUPT
    head = d0.add_chain([b"quiet"], [5])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert d0.used_entries() == [UsedElem(head, 5)]
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0 and pending_signals(interrupt) == 0


def test_interrupt_ack_clears_only_the_acked_bits(regs: Regs, interrupt: Interrupt) -> None:
    interrupt.trigger(VIRTIO_MMIO_INT_VRING)
    interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 3
    assert pending_signals(interrupt) == 2
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = VIRTIO_MMIO_INT_CONFIG
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_VRING
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = 0
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_VRING
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = 0xFFFFFFFF
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0


# -- configuration space ----------------------------------------------------------------------


def test_config_space_of_a_block_device(
    block: Block, mem: GuestMemory, interrupt: Interrupt
) -> None:
    """virtio_cread() of struct virtio_blk_config through the window at 0x100."""
    regs = Regs(MmioTransport(block, mem, interrupt))
    t = regs.t
    assert regs[VIRTIO_MMIO_DEVICE_ID] == VIRTIO_ID_BLOCK
    generation = regs[VIRTIO_MMIO_CONFIG_GENERATION]
    # A u64 is read as two 32-bit halves (vm_get() for len 8).
    capacity = regs[VIRTIO_MMIO_CONFIG] | regs[VIRTIO_MMIO_CONFIG + 4] << 32
    assert regs[VIRTIO_MMIO_CONFIG_GENERATION] == generation
    assert capacity == DISK_SIZE // SECTOR_SIZE
    assert regs[VIRTIO_MMIO_CONFIG + 12] == QUEUE_SIZE - 2  # seg_max
    assert regs[VIRTIO_MMIO_CONFIG + 20] == SECTOR_SIZE  # blk_size
    assert t.read(VIRTIO_MMIO_CONFIG + 20, 2) == struct.pack("<H", SECTOR_SIZE)  # readw
    assert t.read(VIRTIO_MMIO_CONFIG, 8) == struct.pack("<Q", capacity)
    assert t.read(VIRTIO_MMIO_CONFIG + 0x800, 4) == b"\0" * 4  # beyond the struct
    t.write(VIRTIO_MMIO_CONFIG, b"\xff" * 8)  # read-only: ignored
    assert t.read(VIRTIO_MMIO_CONFIG, 8) == struct.pack("<Q", capacity)
    assert t.bad_accesses == 0


def test_config_space_reads_and_writes_of_any_width(regs: Regs, echo: EchoDevice) -> None:
    t = regs.t
    assert t.read(VIRTIO_MMIO_CONFIG, 1) == b"E"
    assert t.read(VIRTIO_MMIO_CONFIG + 1, 2) == b"CH"
    assert t.read(VIRTIO_MMIO_CONFIG + 6, 4) == b"NF\0\0"  # padded past the device's bytes
    t.write(VIRTIO_MMIO_CONFIG + 4, b"conf")
    assert t.read(VIRTIO_MMIO_CONFIG, 8) == b"ECHOconf"
    assert t.bad_accesses == 0


def test_shared_memory_registers_say_none(regs: Regs) -> None:
    regs[VIRTIO_MMIO_SHM_SEL] = 0
    for offset in (
        VIRTIO_MMIO_SHM_LEN_LOW,
        VIRTIO_MMIO_SHM_LEN_HIGH,
        VIRTIO_MMIO_SHM_BASE_LOW,
        VIRTIO_MMIO_SHM_BASE_HIGH,
    ):
        assert regs[offset] == 0xFFFFFFFF  # Linux: len == ~0 means "no such region"
    assert regs.t.bad_accesses == 0


# -- a block device end to end ----------------------------------------------------------------


def test_block_device_through_the_transport(
    block: Block, disk: Path, mem: GuestMemory, interrupt: Interrupt
) -> None:
    transport = MmioTransport(block, mem, interrupt)
    regs = Regs(transport)
    assert regs[VIRTIO_MMIO_QUEUE_NUM_MAX] == QUEUE_SIZE
    driver = VirtioDriver(mem, size=128)
    linux_probe(regs, [driver], want=VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC)
    assert block.active
    assert not read_features(regs) & 1 << VIRTIO_BLK_F_RO
    content = disk.read_bytes()
    # read sector 3 (header, data, status: Linux's layout)
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 3)
    head = driver.add_chain([hdr], [SECTOR_SIZE, 1])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert driver.used_entries() == [UsedElem(head, SECTOR_SIZE + 1)]
    reply = driver.written(head)
    assert reply[:SECTOR_SIZE] == content[3 * SECTOR_SIZE : 4 * SECTOR_SIZE]
    assert reply[SECTOR_SIZE] == VIRTIO_BLK_S_OK
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] & VIRTIO_MMIO_INT_VRING
    assert pending_signals(interrupt) == 1
    regs[VIRTIO_MMIO_INTERRUPT_ACK] = VIRTIO_MMIO_INT_VRING
    # write sector 5, indirect
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 5)
    head = driver.add_chain([hdr, b"\xab" * SECTOR_SIZE], [1], indirect=True)
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert driver.used_entries() == [UsedElem(head, 1)]
    assert driver.written(head) == bytes([VIRTIO_BLK_S_OK])
    assert disk.read_bytes()[5 * SECTOR_SIZE : 6 * SECTOR_SIZE] == b"\xab" * SECTOR_SIZE
    assert pending_signals(interrupt) == 1


# -- reset ------------------------------------------------------------------------------------


def test_status_zero_resets_everything(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    interrupt: Interrupt,
    mem: GuestMemory,
    drivers: list[VirtioDriver],
) -> None:
    linux_probe(regs, drivers)
    head = drivers[0].add_chain([b"one"], [3])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert drivers[0].used_entries() == [UsedElem(head, 3)]
    regs[VIRTIO_MMIO_QUEUE_SEL] = 1
    regs[VIRTIO_MMIO_DEVICE_FEATURES_SEL] = 1
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_VRING

    regs[VIRTIO_MMIO_STATUS] = 0
    assert regs[VIRTIO_MMIO_STATUS] == 0
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    assert not echo.active and echo.acked_features == 0 and echo.queues == []
    assert transport.driver_features == 0
    assert (transport.queue_sel, transport.device_features_sel) == (0, 0)
    for queue in transport.queues:
        assert not queue.ready and queue.size == queue.max_size
        assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (0, 0, 0)
        assert (queue.next_avail, queue.next_used) == (0, 0)
    for index in (0, 1):
        regs[VIRTIO_MMIO_QUEUE_SEL] = index
        assert regs[VIRTIO_MMIO_QUEUE_READY] == 0
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0  # nothing to serve after a reset
    assert len(echo.served) == 1

    # The driver starts over with fresh rings (free-running indices back at 0).
    fresh = [
        VirtioDriver(mem, size=16, desc_table=0x100000, data_end=0x180000),
        VirtioDriver(mem, size=8, desc_table=0x180000),
    ]
    linux_probe(regs, fresh, want=VERSION_1)
    head = fresh[0].add_chain([b"two"], [3])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert fresh[0].used_entries() == [UsedElem(head, 3)] and fresh[0].written(head) == b"owt"
    assert drivers[0].used_idx == 1  # the old rings are not touched again
    assert transport.bad_accesses == 0


# -- hostile drivers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (VIRTIO_MMIO_MAGIC_VALUE, 1),
        (VIRTIO_MMIO_MAGIC_VALUE, 2),
        (VIRTIO_MMIO_MAGIC_VALUE, 8),
        (VIRTIO_MMIO_MAGIC_VALUE + 1, 4),  # unaligned
        (VIRTIO_MMIO_STATUS + 2, 4),
        (VIRTIO_MMIO_STATUS, 1),
        (0x018, 4),  # reserved
        (0x0C0, 4),
        (0x0F8, 4),
        (VIRTIO_MMIO_QUEUE_NOTIFY, 4),  # write-only
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 4),  # write-only
        (VIRTIO_MMIO_INTERRUPT_ACK, 4),  # write-only
    ],
)
def test_bad_reads_are_counted_and_return_zeros(
    regs: Regs, transport: MmioTransport, offset: int, size: int
) -> None:
    assert transport.read(offset, size) == b"\0" * size
    assert transport.bad_accesses == 1


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        (VIRTIO_MMIO_STATUS, b"\x0f"),  # a byte write of Status: ignored
        (VIRTIO_MMIO_STATUS, b"\x0f\0"),
        (VIRTIO_MMIO_STATUS, b"\x0f\0\0\0\0\0\0\0"),
        (VIRTIO_MMIO_STATUS + 1, b"\x0f\0\0\0"),
        (VIRTIO_MMIO_QUEUE_NOTIFY, b"\0"),
        (VIRTIO_MMIO_MAGIC_VALUE, b"\0\0\0\0"),  # read-only registers
        (VIRTIO_MMIO_VERSION, b"\1\0\0\0"),
        (VIRTIO_MMIO_DEVICE_FEATURES, b"\xff\xff\xff\xff"),
        (VIRTIO_MMIO_QUEUE_NUM_MAX, b"\0\1\0\0"),
        (VIRTIO_MMIO_INTERRUPT_STATUS, b"\0\0\0\0"),
        (VIRTIO_MMIO_CONFIG_GENERATION, b"\1\0\0\0"),
        (0x0C0, b"\1\0\0\0"),  # reserved
    ],
)
def test_bad_writes_are_counted_and_harmless(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    drivers: list[VirtioDriver],
    offset: int,
    data: bytes,
) -> None:
    transport.write(offset, data)
    assert transport.bad_accesses == 1
    assert regs[VIRTIO_MMIO_STATUS] == 0
    assert regs[VIRTIO_MMIO_MAGIC_VALUE] == VIRT_MAGIC and regs[VIRTIO_MMIO_VERSION] == 2
    # The device still comes up and works.
    linux_probe(regs, drivers)
    head = drivers[0].add_chain([b"ok"], [2])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert drivers[0].used_entries() == [UsedElem(head, 2)]
    assert transport.bad_accesses == 1


def test_queue_sel_out_of_range(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, drivers: list[VirtioDriver]
) -> None:
    assert negotiate(regs, VERSION_1)
    for sel in (2, 3, 0xFFFF, 0xFFFFFFFF):
        regs[VIRTIO_MMIO_QUEUE_SEL] = sel
        # Linux probes for a queue this way: NumMax 0 means "none", and Ready reads 0.
        assert regs[VIRTIO_MMIO_QUEUE_NUM_MAX] == 0
        assert regs[VIRTIO_MMIO_QUEUE_READY] == 0
    assert transport.bad_accesses == 0  # selecting and probing is legitimate
    regs[VIRTIO_MMIO_QUEUE_NUM] = 8
    regs[VIRTIO_MMIO_QUEUE_DESC_LOW] = 0x1000
    regs[VIRTIO_MMIO_QUEUE_AVAIL_HIGH] = 1
    regs[VIRTIO_MMIO_QUEUE_USED_LOW] = 0x3000
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    assert transport.bad_accesses == 5  # configuring a queue that does not exist is not
    for queue in transport.queues:
        assert not queue.ready and queue.desc_table == queue.avail_ring == queue.used_ring == 0
        assert queue.size == queue.max_size
    for index, driver in enumerate(drivers):
        setup_queue(regs, index, driver)
    regs.add_status(DRIVER_OK)
    assert echo.active
    head = drivers[1].add_chain([b"fine"], [4])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 1
    assert drivers[1].used_entries() == [UsedElem(head, 4)]


def test_queue_addresses_are_frozen_while_ready(
    regs: Regs, echo: EchoDevice, transport: MmioTransport, drivers: list[VirtioDriver]
) -> None:
    linux_probe(regs, drivers)
    queue = transport.queues[0]
    before = (queue.size, queue.desc_table, queue.avail_ring, queue.used_ring)
    regs[VIRTIO_MMIO_QUEUE_SEL] = 0
    for offset in (
        VIRTIO_MMIO_QUEUE_NUM,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        VIRTIO_MMIO_QUEUE_DESC_HIGH,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
        VIRTIO_MMIO_QUEUE_USED_LOW,
        VIRTIO_MMIO_QUEUE_USED_HIGH,
    ):
        regs[offset] = 0x40
    assert transport.bad_accesses == 7
    assert (queue.size, queue.desc_table, queue.avail_ring, queue.used_ring) == before
    head = drivers[0].add_chain([b"still"], [5])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert drivers[0].used_entries() == [UsedElem(head, 5)]


def bad_queue_setups(driver: VirtioDriver) -> list[tuple[int, int]]:
    """(register, value) writes that each make queue 0's configuration unusable."""
    return [
        (VIRTIO_MMIO_QUEUE_DESC_HIGH, 1),  # 4 GiB up: no RAM there
        (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0xFFFFFFFF),
        (VIRTIO_MMIO_QUEUE_USED_LOW, MEM_SIZE - 8),  # straddles the end of RAM
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0xC000_0000),  # the MMIO gap
        (VIRTIO_MMIO_QUEUE_DESC_LOW, driver.desc_table + 8),  # misaligned
        (VIRTIO_MMIO_QUEUE_USED_LOW, driver.used_ring + 2),  # misaligned
        (VIRTIO_MMIO_QUEUE_NUM, 12),  # not a power of 2
        (VIRTIO_MMIO_QUEUE_NUM, 32),  # more than QueueNumMax
        (VIRTIO_MMIO_QUEUE_NUM, 0),
    ]


@pytest.mark.parametrize("case", range(9))
def test_driver_ok_with_an_unusable_queue_needs_reset(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    interrupt: Interrupt,
    drivers: list[VirtioDriver],
    case: int,
) -> None:
    offset, value = bad_queue_setups(drivers[0])[case]
    assert negotiate(regs, VERSION_1)
    for index, driver in enumerate(drivers):
        regs[VIRTIO_MMIO_QUEUE_SEL] = index
        regs[VIRTIO_MMIO_QUEUE_NUM] = driver.size
        regs[VIRTIO_MMIO_QUEUE_DESC_LOW] = driver.desc_table
        regs[VIRTIO_MMIO_QUEUE_AVAIL_LOW] = driver.avail_ring
        regs[VIRTIO_MMIO_QUEUE_USED_LOW] = driver.used_ring
        if index == 0:
            regs[offset] = value
        regs[VIRTIO_MMIO_QUEUE_READY] = 1
    generation = regs[VIRTIO_MMIO_CONFIG_GENERATION]
    regs.add_status(DRIVER_OK)
    assert not echo.active and echo.needs_reset
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_CONFIG
    assert pending_signals(interrupt) == 1
    assert regs[VIRTIO_MMIO_CONFIG_GENERATION] != generation
    # Kicks are ignored; nothing is read from or written to the rings.
    drivers[1].add_chain([b"no"], [2])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 1
    transport.notify(1)
    assert echo.served == [] and drivers[1].used_idx == 0
    assert pending_signals(interrupt) == 0
    # A reset clears DEVICE_NEEDS_RESET and a correct set-up works.
    regs[VIRTIO_MMIO_STATUS] = 0
    assert regs[VIRTIO_MMIO_STATUS] == 0 and not echo.needs_reset
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    fresh = VirtioDriver(drivers[0].mem, size=16, desc_table=0x100000)
    linux_probe(regs, [fresh])
    head = fresh.add_chain([b"yes"], [3])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert fresh.used_entries() == [UsedElem(head, 3)]


def test_broken_ring_sets_needs_reset_and_stays_quiet(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    interrupt: Interrupt,
    drivers: list[VirtioDriver],
) -> None:
    linux_probe(regs, drivers, want=VERSION_1)
    d0, d1 = drivers
    d0.add_chain([b"x"], [1])
    d0.set_avail_idx(d0.avail_idx + 70000)
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert echo.needs_reset and echo.active
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_CONFIG
    assert pending_signals(interrupt) == 1
    assert echo.served == [] and d0.used_idx == 0
    # Nothing is served any more, on any queue, by either kick path, until a reset.
    d0.set_avail_idx(1)
    d1.add_chain([b"y"], [1])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 1
    transport.notify(0)
    transport.notify(1)
    assert echo.served == [] and d0.used_idx == d1.used_idx == 0
    assert pending_signals(interrupt) == 0
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] == VIRTIO_MMIO_INT_CONFIG
    regs[VIRTIO_MMIO_STATUS] = 0
    assert not echo.needs_reset and regs[VIRTIO_MMIO_STATUS] == 0


def test_rings_moved_outside_ram_after_driver_ok(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    interrupt: Interrupt,
    drivers: list[VirtioDriver],
) -> None:
    """QueueReady=0, new addresses, QueueReady=1 behind the device's back: never raises."""
    linux_probe(regs, drivers, want=VERSION_1)
    drivers[0].add_chain([b"x"], [1])
    regs[VIRTIO_MMIO_QUEUE_SEL] = 0
    regs[VIRTIO_MMIO_QUEUE_READY] = 0
    regs[VIRTIO_MMIO_QUEUE_USED_HIGH] = 1
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    transport.notify(0)
    assert echo.needs_reset
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] & VIRTIO_MMIO_INT_CONFIG
    assert pending_signals(interrupt) == 1  # one config interrupt; the second kick is ignored
    assert echo.served == [] and drivers[0].used_idx == 0
    regs[VIRTIO_MMIO_STATUS] = 0
    assert not echo.needs_reset


def test_queue_ready_again_after_driver_ok_fails_the_device(
    regs: Regs,
    echo: EchoDevice,
    transport: MmioTransport,
    interrupt: Interrupt,
    drivers: list[VirtioDriver],
) -> None:
    """Issue 14 item 4: a queue stopped and set up again after DRIVER_OK is never served.

    Without VIRTIO_F_RING_RESET the driver may not bring a queue back (§2.6.1); even a
    configuration that looks valid was never checked and the device may hold buffers of
    the old ring, so QueueReady=1 fails the device at once.  Stopping a queue is allowed.
    """
    linux_probe(regs, drivers, want=VERSION_1)
    pending_signals(interrupt)
    regs[VIRTIO_MMIO_QUEUE_SEL] = 0
    regs[VIRTIO_MMIO_QUEUE_READY] = 0  # allowed: Linux's del_vqs writes it
    assert not echo.needs_reset and transport.bad_accesses == 0
    smaller = VirtioDriver(drivers[0].mem, size=8, desc_table=0x100000)
    regs[VIRTIO_MMIO_QUEUE_NUM] = smaller.size  # a valid, smaller ring
    for low, addr in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, smaller.desc_table),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, smaller.avail_ring),
        (VIRTIO_MMIO_QUEUE_USED_LOW, smaller.used_ring),
    ]:
        regs[low] = addr
    generation = regs[VIRTIO_MMIO_CONFIG_GENERATION]
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    assert echo.needs_reset and transport.bad_accesses == 1
    assert regs[VIRTIO_MMIO_QUEUE_READY] == 0  # refused
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
    assert regs[VIRTIO_MMIO_INTERRUPT_STATUS] & VIRTIO_MMIO_INT_CONFIG
    assert regs[VIRTIO_MMIO_CONFIG_GENERATION] != generation
    assert pending_signals(interrupt) == 1
    smaller.add_chain([b"no"], [2])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    regs[VIRTIO_MMIO_QUEUE_READY] = 1  # again: counted, no second interrupt
    assert echo.served == [] and smaller.used_idx == 0
    assert pending_signals(interrupt) == 0 and transport.bad_accesses == 2
    regs[VIRTIO_MMIO_STATUS] = 0  # a reset brings it back
    assert not echo.needs_reset
    fresh = VirtioDriver(drivers[0].mem, size=16, desc_table=0x180000)
    linux_probe(regs, [fresh])
    head = fresh.add_chain([b"ok"], [2])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
    assert fresh.used_entries() == [UsedElem(head, 2)]


def test_a_balloon_whose_stats_queue_is_set_up_again_never_raises(
    mem: GuestMemory, interrupt: Interrupt
) -> None:
    """The issue's case end to end: the balloon holds stats buffer 12, the driver re-readies
    the stats queue with 8 entries after DRIVER_OK and kicks.  No exception may escape."""
    balloon = Balloon()
    transport = MmioTransport(balloon, mem, interrupt)
    regs = Regs(transport)
    drivers = [
        VirtioDriver(mem, size=16, desc_table=0x10000 * (i + 1),
                     data_start=0x100000 + i * 0x40000, data_end=0x140000 + i * 0x40000)
        for i in range(4)
    ]  # fmt: skip
    linux_probe(regs, drivers, want=VERSION_1 | 1 << VIRTIO_BALLOON_F_STATS_VQ)
    stats = drivers[STATS_QUEUE]
    buffer = stats.alloc(10, struct.pack("<HQ", 4, 1 << 20))
    stats.write_desc(12, buffer, 10, 0, 0)
    stats.push_avail(12)
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = STATS_QUEUE
    assert balloon.guest_stats == {"free_memory": 1 << 20}  # buffer 12 is held
    smaller = VirtioDriver(mem, size=8, desc_table=0x50000,
                           data_start=stats.data_start, data_end=stats.data_end)  # fmt: skip
    smaller.start_at(1)  # the device's indices carry on from where they were
    regs[VIRTIO_MMIO_QUEUE_SEL] = STATS_QUEUE
    regs[VIRTIO_MMIO_QUEUE_READY] = 0
    regs[VIRTIO_MMIO_QUEUE_NUM] = smaller.size
    regs[VIRTIO_MMIO_QUEUE_DESC_LOW] = smaller.desc_table
    regs[VIRTIO_MMIO_QUEUE_AVAIL_LOW] = smaller.avail_ring
    regs[VIRTIO_MMIO_QUEUE_USED_LOW] = smaller.used_ring
    regs[VIRTIO_MMIO_QUEUE_READY] = 1
    smaller.add_chain([struct.pack("<HQ", 4, 2 << 20)], [])
    regs[VIRTIO_MMIO_QUEUE_NOTIFY] = STATS_QUEUE
    transport.notify(STATS_QUEUE)
    assert balloon.needs_reset
    assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
