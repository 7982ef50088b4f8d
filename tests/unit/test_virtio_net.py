"""virtio-net against a fake driver and a SOCK_SEQPACKET stand-in for the TAP (no KVM, no TAP):
frames go out whole, come in spread over mergeable buffers, and nothing piles up in the VMM."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from ember.devices.virtio.device import Interrupt
from ember.devices.virtio.net.device import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MRG_RXBUF,
    VNET_HDR_SIZE,
    Net,
)
from ember.devices.virtio.queue import VIRTQ_DESC_F_WRITE, Queue
from ember.memory import GuestMemory
from ember.vmm.event_loop import EventLoop
from tests.unit.fuzz_rigs import ManualLoop
from tests.unit.virtio_driver import UsedElem, VirtioDriver

MIB = 1 << 20
MAC = bytes.fromhex("02ee00000001")


class Guest:
    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(16 * MIB)
        self.rx = VirtioDriver(self.mem, 64, desc_table=0x10000, data_start=MIB, data_end=6 * MIB)
        self.tx = VirtioDriver(self.mem, 64, desc_table=0x20000, data_start=6 * MIB,
                               data_end=12 * MIB)  # fmt: skip
        self.queues = [Queue(256), Queue(256)]
        self.rx.configure(self.queues[RX_QUEUE])
        self.tx.configure(self.queues[TX_QUEUE])
        self.backend, self.tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.events = EventLoop()
        self.events.start()
        self.interrupt = Interrupt()
        self.dev = Net(self.tap.detach(), self.events, MAC)
        self.dev.acked_features = self.dev.device_features()
        self.dev.activate(self.mem, self.queues, self.interrupt)

    def close(self) -> None:
        self.dev.close()
        self.events.close()
        self.backend.close()
        self.interrupt.close()
        self.mem.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def frame(n: int) -> bytes:
    return bytes(VNET_HDR_SIZE) + bytes(i % 251 for i in range(n))


def wait_used(driver: VirtioDriver, count: int, dev: Net) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        with dev.lock:
            got += [(e.id, e.len) for e in driver.used_entries()]
        time.sleep(0.01)
    return got


def test_config_is_the_mac_and_link_up(guest: Guest) -> None:
    assert guest.dev.read_config(0, 6) == MAC
    assert struct.unpack("<H", guest.dev.read_config(6, 2))[0] == 1
    assert guest.dev.device_features() >> VIRTIO_NET_F_MRG_RXBUF & 1


def test_a_tx_chain_is_one_whole_packet(guest: Guest) -> None:
    packet = frame(1500)
    with guest.dev.lock:
        guest.tx.add_chain([packet[:VNET_HDR_SIZE], packet[VNET_HDR_SIZE:]], [])
        guest.dev.process_queue(TX_QUEUE)
    assert guest.backend.recv(70000) == packet
    assert (guest.dev.stats.tx_frames, guest.dev.stats.tx_bytes) == (1, 1500)


def test_a_chain_too_short_for_a_frame_is_counted_not_sent(guest: Guest) -> None:
    with guest.dev.lock:
        guest.tx.add_chain([bytes(4)], [])
        guest.dev.process_queue(TX_QUEUE)
    assert guest.dev.stats.tx_bad == 1
    guest.backend.setblocking(False)
    with pytest.raises(BlockingIOError):
        guest.backend.recv(100)


def test_rx_spreads_a_frame_over_mergeable_buffers(guest: Guest) -> None:
    with guest.dev.lock:
        heads = [guest.rx.add_chain([], [1526]) for _ in range(4)]
        guest.dev.process_queue(RX_QUEUE)
    packet = frame(2500)  # needs two 1526-byte buffers
    guest.backend.send(packet)
    used = wait_used(guest.rx, 2, guest.dev)
    assert used == [(heads[0], 1526), (heads[1], len(packet) - 1526)]
    first = guest.rx.written(heads[0], 1526)
    assert struct.unpack_from("<H", first, 10)[0] == 2  # num_buffers
    assert (
        first[VNET_HDR_SIZE:] + guest.rx.written(heads[1])[: len(packet) - 1526]
        == (packet[VNET_HDR_SIZE:])
    )


def test_without_rx_buffers_frames_wait_in_the_backend_not_the_vmm(guest: Guest) -> None:
    for _ in range(3):
        guest.backend.send(frame(100))
    time.sleep(0.2)
    assert guest.dev.stats.rx_frames == 0  # nowhere to put them: not read, not dropped
    with guest.dev.lock:
        for _ in range(3):
            guest.rx.add_chain([], [1526])
        guest.dev.process_queue(RX_QUEUE)  # the driver's kick after adding buffers
    assert len(wait_used(guest.rx, 3, guest.dev)) == 3
    assert guest.dev.stats.rx_frames == 3 and guest.dev.stats.rx_dropped == 0


def test_a_tx_flood_into_a_full_backend_is_dropped_not_buffered(guest: Guest) -> None:
    sent = 0
    with guest.dev.lock:
        for _ in range(40):  # the socket pair's buffer fills up; nobody reads it
            for _ in range(32):
                guest.tx.add_chain([frame(60000)], [])
            guest.dev.process_queue(TX_QUEUE)
            guest.tx.used_entries()
            sent += 32
    stats = guest.dev.stats
    assert stats.tx_dropped > 0 and stats.tx_frames + stats.tx_dropped == sent


def test_a_malformed_rx_chain_is_returned_empty_and_the_good_ones_carry_the_frame(
    guest: Guest,
) -> None:
    """Issue 14 item 5: one bad rx chain costs that buffer, not the device or its neighbours."""
    with guest.dev.lock:
        first = guest.rx.add_chain([], [1526])
        bad = guest.rx.size - 1  # a descriptor the driver's allocator has not handed out
        guest.rx.write_desc(bad, 1 << 40, 1526, VIRTQ_DESC_F_WRITE, 0)  # outside guest RAM
        guest.rx.push_avail(bad)
        second = guest.rx.add_chain([], [1526])
        guest.dev.process_queue(RX_QUEUE)
    packet = frame(2500)  # needs both good buffers
    guest.backend.send(packet)
    used = wait_used(guest.rx, 3, guest.dev)
    assert used == [(bad, 0), (first, 1526), (second, len(packet) - 1526)]
    assert not guest.dev.needs_reset
    assert struct.unpack_from("<H", guest.rx.written(first, 12), 10)[0] == 2  # num_buffers
    stats = guest.dev.stats
    assert (stats.rx_bad_chains, stats.rx_frames, stats.rx_dropped) == (1, 1, 0)


def test_a_malformed_rx_chain_then_no_buffers_returns_them_and_the_frame_waits(
    guest: Guest,
) -> None:
    """The good chain taken before a bad one goes back (empty); the frame waits for more."""
    with guest.dev.lock:
        first = guest.rx.add_chain([], [1526])
        bad = guest.rx.size - 1
        guest.rx.write_desc(bad, 1 << 40, 1526, VIRTQ_DESC_F_WRITE, 0)
        guest.rx.push_avail(bad)
        guest.dev.process_queue(RX_QUEUE)
    packet = frame(2500)
    guest.backend.send(packet)
    assert sorted(wait_used(guest.rx, 2, guest.dev)) == sorted([(first, 0), (bad, 0)])
    assert not guest.dev.needs_reset and guest.dev.stats.rx_dropped == 0
    with guest.dev.lock:
        heads = [guest.rx.add_chain([], [1526]) for _ in range(2)]
        guest.dev.process_queue(RX_QUEUE)  # the driver refills and kicks
    assert wait_used(guest.rx, 2, guest.dev) == [(heads[0], 1526), (heads[1], len(packet) - 1526)]
    assert (guest.dev.stats.rx_frames, guest.dev.stats.rx_bad_chains) == (1, 1)


def test_a_ring_broken_at_signal_time_fails_the_device_instead_of_raising(guest: Guest) -> None:
    """Issue 14 item 4: rx's interrupt decision reads the driver's used_event; a ring whose
    trailer lies outside RAM breaks there, which must fail the device, not escape."""
    queue = guest.queues[RX_QUEUE]
    with guest.dev.lock:
        queue.event_idx = True
        # The avail ring's flags, idx and ring[] fit in RAM; its used_event trailer does not
        # (the queue was never checked: only a transport's DRIVER_OK would have refused it).
        queue.avail_ring = guest.mem.size - (4 + 2 * queue.size)
        head = guest.rx.add_chain([], [1526])  # descriptors from the driver, avail by hand
        guest.mem.write(queue.avail_ring + 4, struct.pack("<H", head))
        guest.mem.write(queue.avail_ring + 2, struct.pack("<H", 1))
    guest.backend.send(frame(100))
    deadline = time.monotonic() + 10
    while not guest.dev.needs_reset and not guest.events.callback_errors:
        assert time.monotonic() < deadline, "the frame was never served"
        time.sleep(0.01)
    assert guest.events.callback_errors == 0  # nothing escaped into the event loop
    assert guest.dev.needs_reset and queue.broken


def test_a_device_the_driver_broke_stops_watching_its_tap() -> None:
    """Found by tests/unit/test_device_fuzz.py: a device failed by its driver kept its TAP
    watched; the next frame left the fd readable, rx returned at once (the device needs a
    reset) and the level-triggered event thread called it again, forever (and woke a parked
    VM each time).  The frame now waits in the kernel until the driver resets the device."""
    mem = GuestMemory.anonymous(16 * MIB)
    loop = ManualLoop()  # the event thread's loop, run by hand: a spin raises BusyLoop
    backend, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    interrupt = Interrupt()
    dev = Net(tap.detach(), loop, MAC)
    try:
        rx, tx = (VirtioDriver(mem, 64, desc_table=0x10000 * (i + 1), data_start=(i + 1) * MIB,
                               data_end=(i + 2) * MIB) for i in range(2))  # fmt: skip
        queues = [Queue(256), Queue(256)]
        rx.configure(queues[RX_QUEUE])
        tx.configure(queues[TX_QUEUE])
        dev.acked_features = dev.device_features()
        dev.activate(mem, queues, interrupt)
        tx.set_avail_idx(300)  # avail.idx further ahead than the ring holds: tx is broken
        dev.process_queue(TX_QUEUE)
        assert dev.needs_reset
        backend.send(frame(100))
        loop.run_ready()  # before the fix: BusyLoop, the fd stayed ready however often served
        assert dev.fd not in loop.readers
        dev.reset()  # the driver resets the device and sets it up again
        fresh = [Queue(256), Queue(256)]
        rx = VirtioDriver(mem, 64, desc_table=0x30000, data_start=3 * MIB, data_end=4 * MIB)
        rx.configure(fresh[RX_QUEUE])
        VirtioDriver(mem, 64, desc_table=0x40000, data_start=4 * MIB).configure(fresh[TX_QUEUE])
        dev.acked_features = dev.device_features()
        dev.activate(mem, fresh, interrupt)
        head = rx.add_chain([], [1526])
        dev.process_queue(RX_QUEUE)
        loop.run_ready()
        assert rx.used_entries() == [UsedElem(head, len(frame(100)))]  # the frame that waited
    finally:
        dev.close()
        loop.close()
        backend.close()
        interrupt.close()
        mem.close()
