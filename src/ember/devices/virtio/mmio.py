"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), register names verbatim.

Queue notifications arrive through an ioeventfd per queue (KVM signals it
on the guest's QueueNotify write without exiting to us); interrupts leave
through the device's irqfd.  Only configuration accesses exit to the vCPU
thread and land here.  Everything the driver writes is checked: a bad
queue set-up fails that queue (the device never activates), it never
raises out of the transport.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

from ember.devices.virtio.device import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    Interrupt,
    TransportDevice,
)
from ember.devices.virtio.queue import Queue
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

MMIO_SIZE = 0x1000
VIRT_MAGIC = 0x74726976  # "virt"
VIRT_VERSION = 2
VIRT_VENDOR = 0x52424D45  # "EMBR"

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

_QUEUE_ADDR_REGS = {
    VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc_table", 0),
    VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc_table", 32),
    VIRTIO_MMIO_QUEUE_AVAIL_LOW: ("avail_ring", 0),
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH: ("avail_ring", 32),
    VIRTIO_MMIO_QUEUE_USED_LOW: ("used_ring", 0),
    VIRTIO_MMIO_QUEUE_USED_HIGH: ("used_ring", 32),
}


class MmioTransport:
    """One virtio-mmio window (4 KiB) in front of one device."""

    def __init__(self, device: TransportDevice, memory: GuestMemory, interrupt: Interrupt) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        # The device's lock, shared with the event thread serving the queues and with the
        # device's own callbacks (vsock's host sockets, balloon control requests), so that
        # register accesses, kicks and those callbacks are serialised by one lock.
        self.lock: threading.RLock = device.lock
        self.bad_accesses = 0

    # --- bus interface (vCPU thread)
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                return self.device.read_config(offset - VIRTIO_MMIO_CONFIG, size).ljust(size, b"\0")
            if size != 4 or offset % 4:
                self.bad_accesses += 1
                return b"\0" * size
            return struct.pack("<I", self._read_reg(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG, data)
                return
            if len(data) != 4 or offset % 4:
                self.bad_accesses += 1
                return
            self._write_reg(offset, struct.unpack("<I", data)[0])

    # --- registers
    def _queue(self) -> Queue | None:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def _read_reg(self, offset: int) -> int:
        queue = self._queue()
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return VIRT_MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VIRT_VERSION
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VIRT_VENDOR
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device.device_features() >> (32 * self.device_features_sel)
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return int(queue.ready) if queue is not None else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == VIRTIO_MMIO_STATUS:
            return self.status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.device.needs_reset else 0)
        if offset in (
            VIRTIO_MMIO_SHM_LEN_LOW,
            VIRTIO_MMIO_SHM_LEN_HIGH,
            VIRTIO_MMIO_SHM_BASE_LOW,
            VIRTIO_MMIO_SHM_BASE_HIGH,
        ):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        self.bad_accesses += 1
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        queue = self._queue()
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.driver_features_sel > 1:
                self.bad_accesses += 1
                return
            shift = 32 * self.driver_features_sel
            self.driver_features &= ~(0xFFFFFFFF << shift)
            self.driver_features |= value << shift
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_NUM:
            if queue is not None and not queue.ready:
                queue.size = value
            else:
                self.bad_accesses += 1
        elif offset == VIRTIO_MMIO_QUEUE_READY:
            if queue is None:
                self.bad_accesses += 1
            elif value == 1 and not queue.ready and self.status & VIRTIO_CONFIG_S_DRIVER_OK:
                self._ready_after_driver_ok()
            else:
                queue.ready = value == 1
        elif offset in _QUEUE_ADDR_REGS:
            if queue is not None and not queue.ready:
                name, shift = _QUEUE_ADDR_REGS[offset]
                old = getattr(queue, name)
                setattr(queue, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
            else:
                self.bad_accesses += 1
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == VIRTIO_MMIO_STATUS:
            self._set_status(value)
        elif offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            # Only reached when no ioeventfd is registered (e.g. unit tests).
            self.notify(value)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            pass
        else:
            self.bad_accesses += 1

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        new_bits = value & ~self.status
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK:
            offered = self.device.device_features()
            if self.driver_features & ~offered or not self.driver_features & (
                1 << VIRTIO_F_VERSION_1
            ):
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK  # the driver reads it back and gives up
            else:
                self.device.acked_features = self.driver_features
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK and not value & VIRTIO_CONFIG_S_FAILED:
            if not self.status & VIRTIO_CONFIG_S_FEATURES_OK and not (
                value & VIRTIO_CONFIG_S_FEATURES_OK
            ):
                self.bad_accesses += 1
                return
            ready = [q for q in self.queues if q.ready]
            if not all(q.is_valid(self.memory) for q in ready):
                self.config_generation += 1
                self.device.fail("driver set DRIVER_OK with an invalid queue", self.interrupt)
            else:
                self.device.activate(self.memory, self.queues, self.interrupt)
        self.status = value

    def _ready_after_driver_ok(self) -> None:
        """QueueReady=1 on a stopped queue once DRIVER_OK is set: refused, the device failed.

        Queues are set up before DRIVER_OK (§3.1.1 step 7), and only a driver
        that negotiated VIRTIO_F_RING_RESET (§2.6.1), which we never offer, may
        bring one back afterwards.  Accepting it would hand the device a ring
        that was never checked (``is_valid`` runs at DRIVER_OK) and pull the
        ring out from under what the device holds (the balloon's stats buffer),
        so the device is failed: the driver must reset it.  Writing 0 (stopping
        the queue, as Linux's del_vqs does) stays allowed.
        """
        self.bad_accesses += 1
        if not self.device.needs_reset:
            self.config_generation += 1
            self.device.fail(
                f"QueueReady for queue {self.queue_sel} after DRIVER_OK", self.interrupt
            )

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.driver_features_sel = 0
        self.device_features_sel = 0
        self.queue_sel = 0
        for queue in self.queues:
            queue.reset()
        self.interrupt.ack(0xFFFFFFFF)
        self.device.reset()

    # --- snapshots (called with the vCPUs paused and the event thread not serving)
    def save_state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "device_id": self.device.device_id,
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "config_generation": self.config_generation,
                "interrupt_status": self.interrupt.status,
                "acked_features": self.device.acked_features,
                "needs_reset": self.device.needs_reset,
                "active": self.device.active,
                "queues": [q.save_state() for q in self.queues],
                "device": self.device.save_state(),
            }

    def load_state(self, state: dict[str, Any]) -> None:
        """Registers, queues and activation as saved; then the device's ``restored`` hook."""
        with self.lock:
            if state["device_id"] != self.device.device_id or len(state["queues"]) != len(
                self.queues
            ):
                raise ValueError(
                    f"snapshot device {state['device_id']} does not match {self.name} "
                    "in this slot: the VM's devices differ from the snapshot's"
                )
            for name in (
                "status", "device_features_sel", "driver_features_sel", "driver_features",
                "queue_sel", "config_generation",
            ):  # fmt: skip
                setattr(self, name, int(state[name]))
            for queue, queue_state in zip(self.queues, state["queues"], strict=True):
                queue.load_state(queue_state)
            self.interrupt.set_status(int(state["interrupt_status"]))
            self.device.acked_features = int(state["acked_features"])
            self.device.load_state(state.get("device", {}))
            if state["active"]:
                self.device.activate(self.memory, self.queues, self.interrupt)
                # activate() derives event_idx from the features; the rings keep theirs.
                for queue, queue_state in zip(self.queues, state["queues"], strict=True):
                    queue.event_idx = bool(queue_state["event_idx"])
            self.device.needs_reset = bool(state["needs_reset"])
            if self.device.active:
                self.device.restored()
                for index in range(len(self.queues)):
                    # A kick the guest gave just before the snapshot never reached the
                    # restored VM's ioeventfds: look at every ring once.
                    self.notify(index)

    @property
    def name(self) -> str:
        return type(self.device).__name__

    def notify(self, index: int) -> None:
        """A queue kick arrived through its ioeventfd (event thread)."""
        with self.lock:
            if self.device.active and index < len(self.queues) and not self.device.needs_reset:
                self.device.process_queue(index)
