"""The guest bell's VMM side without KVM: its line, its eventfds, and what a ring does.

The SDK writes ``host_bell``; the VMM's event thread must then wake a parked VM and pulse
the line's irqfd, in that order (a pulse into a parked VM waits until something else wakes
it). The guest's end (``/dev/ember-doorbell``) and the SDK's are in test_code_ring.py;
tests/integration/test_guest_bell.py rings a real guest.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

from ember import ring
from ember.devices.bus import Bus
from ember.devices.virtio.balloon.device import Balloon
from ember.errors import ConfigError
from ember.memory import GuestMemory
from ember.vmm.event_loop import EventLoop
from ember.vmm.shm import SharedRegion
from ember.vmm.virtio_slots import FIRST_IRQ, LAST_IRQ, VirtioSlots

MIB = 1 << 20


class FakeVm:
    """What the region and the slots ask of KVM, recorded."""

    def __init__(self) -> None:
        self.irqfds: dict[int, int] = {}  # gsi -> eventfd
        self.slots: list[int] = []

    def set_user_memory_region(self, slot: int, *_: int) -> None:
        self.slots.append(slot)

    def ioeventfd(self, *_: int, **__: int) -> None:
        pass

    def irqfd(self, fd: int, gsi: int) -> None:
        self.irqfds[gsi] = fd


@pytest.fixture
def region() -> Iterator[tuple[SharedRegion, FakeVm]]:
    vm = FakeVm()
    shm = SharedRegion(vm, GuestMemory.anonymous(16 * MIB), 1)  # type: ignore[arg-type]
    try:
        yield shm, vm
    finally:
        shm.close()


def test_without_a_bell_the_region_is_as_before(region: tuple[SharedRegion, FakeVm]) -> None:
    shm, vm = region
    assert shm.host_bell == -1 and vm.irqfds == {}
    assert "ember_doorbell" not in shm.cmdline()
    assert shm.describe()["guest_bell"] is False
    assert len(shm.fds()) == 1 + ring.SLOT_COUNT


def test_the_bell_takes_a_line_and_announces_it(region: tuple[SharedRegion, FakeVm]) -> None:
    shm, vm = region
    shm.attach_guest_bell(vm, 9)  # type: ignore[arg-type]
    assert set(vm.irqfds) == {9}
    assert shm.cmdline().split()[1] == "ember_doorbell.irq=9"
    assert shm.describe()["guest_bell"] is True
    fds = shm.fds()
    assert len(fds) == 2 + ring.SLOT_COUNT and fds[-1] == shm.host_bell


def test_a_ring_wakes_the_vm_then_pulses_the_line(region: tuple[SharedRegion, FakeVm]) -> None:
    shm, vm = region
    shm.attach_guest_bell(vm, 9)  # type: ignore[arg-type]
    irqfd = vm.irqfds[9]
    order: list[str] = []
    woken = threading.Event()

    def wake() -> None:
        order.append("wake" if not _readable(irqfd) else "late")
        woken.set()

    events = EventLoop()
    shm.serve_bell(events, wake)
    events.start()
    try:
        os.eventfd_write(shm.host_bell, 1)  # the SDK rings
        assert woken.wait(10)
        assert select.select([irqfd], [], [], 10)[0] == [irqfd]  # the line was pulsed
        assert os.eventfd_read(irqfd) == 1
        assert order == ["wake"]  # the VM was woken before the pulse
    finally:
        events.stop()
        events.close()


def test_close_releases_the_bells_descriptors(region: tuple[SharedRegion, FakeVm]) -> None:
    shm, vm = region
    shm.attach_guest_bell(vm, 9)  # type: ignore[arg-type]
    held = [shm.host_bell, vm.irqfds[9]]
    shm.close()
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)
    shm.close()  # twice is fine


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_reserved_line_comes_after_the_devices_and_is_bounded() -> None:
    vm = FakeVm()
    events = EventLoop()
    slots = VirtioSlots(vm, GuestMemory.anonymous(MIB), Bus("mmio"), events)  # type: ignore[arg-type]
    try:
        slots.attach(Balloon())
        assert slots.reserve_irq() == FIRST_IRQ + 1  # the device kept the first line
        assert set(vm.irqfds) == {FIRST_IRQ}
        while FIRST_IRQ + len(slots.transports) + len(slots.reserved_irqs) <= LAST_IRQ:
            slots.reserve_irq()
        with pytest.raises(ConfigError, match="no interrupt line"):
            slots.reserve_irq()
        with pytest.raises(ConfigError, match="too many virtio devices"):
            slots.attach(Balloon())
    finally:
        slots.close()
        events.close()
