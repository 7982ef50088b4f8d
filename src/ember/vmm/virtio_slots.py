"""Placing virtio-mmio devices: an MMIO window and an IRQ each, announced on the command line.

The guest learns about each device from ``virtio_mmio.device=4K@<base>:<irq>``
(``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``); there is no bus to probe.  Kicks
come back through one ioeventfd per queue (data-matched on the queue index)
and interrupts go out through one irqfd per device, so neither needs the
vCPU thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.devices.bus import Bus
from ember.devices.virtio.device import Interrupt, TransportDevice
from ember.devices.virtio.mmio import MMIO_SIZE, VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from ember.errors import ConfigError
from ember.kvm.system import Vm
from ember.memory import MMIO_GAP_START, GuestMemory
from ember.vmm.event_loop import EventLoop

VIRTIO_MMIO_BASE = 0xD000_0000
FIRST_IRQ = 5  # 4 is the serial port
LAST_IRQ = 23  # the I/O APIC has 24 pins
assert MMIO_GAP_START <= VIRTIO_MMIO_BASE


@dataclass
class VirtioSlots:
    vm: Vm
    memory: GuestMemory
    mmio: Bus
    events: EventLoop
    transports: list[MmioTransport] = field(default_factory=list)
    interrupts: list[Interrupt] = field(default_factory=list)
    kick_fds: list[int] = field(default_factory=list)
    cmdline: list[str] = field(default_factory=list)
    reserved_irqs: list[int] = field(default_factory=list)

    def reserve_irq(self) -> int:
        """The next free interrupt line, for something that is not a virtio device (the
        guest bell, ember.vmm.shm): taken after the devices', so theirs never move."""
        irq = self._next_irq("no interrupt line is left")
        self.reserved_irqs.append(irq)
        return irq

    def _next_irq(self, refusal: str) -> int:
        irq = FIRST_IRQ + len(self.transports) + len(self.reserved_irqs)
        if irq > LAST_IRQ:
            raise ConfigError(f"{refusal}: at most {LAST_IRQ - FIRST_IRQ + 1}")
        return irq

    def attach(self, device: TransportDevice) -> MmioTransport:
        index = len(self.transports)
        irq = self._next_irq("too many virtio devices")
        base = VIRTIO_MMIO_BASE + index * MMIO_SIZE
        interrupt = Interrupt()
        self.interrupts.append(interrupt)
        self.vm.irqfd(interrupt.eventfd, irq)
        transport = MmioTransport(device, self.memory, interrupt)
        self.mmio.insert(transport, base, MMIO_SIZE)
        for queue_index in range(len(transport.queues)):
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kick_fds.append(kick)
            self.vm.ioeventfd(kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=queue_index)
            self.events.add_eventfd(kick, _notifier(transport, queue_index))
        self.transports.append(transport)
        self.cmdline.append(f"virtio_mmio.device=4K@{base:#x}:{irq}")
        return transport

    def close(self) -> None:
        for transport in self.transports:
            transport.device.close()
        for interrupt in self.interrupts:
            interrupt.close()
        for fd in self.kick_fds:
            os.close(fd)
        self.kick_fds.clear()


def _notifier(transport: MmioTransport, index: int) -> Callable[[], None]:
    def notify() -> None:
        transport.notify(index)

    return notify
