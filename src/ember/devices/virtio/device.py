"""What every virtio device shares: feature bits, status, interrupts, the device contract.

A device sees only guest memory, its queues and an :class:`Interrupt`; the
transport (``mmio.py``) owns the register interface.  Names follow the
virtio 1.2 specification at the ABI.

:class:`TransportDevice` is the contract: everything the transport and the
VMM (slots, machine, control) may use of a device, declared once so that
mypy checks it at every call site instead of ``getattr`` probing.
:class:`VirtioDevice` is the base every device derives from; it satisfies
the contract with defaults (its own lock, nothing to close, no counters, no
host connections) that a device overrides when it has more.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ember.devices.virtio.queue import DescriptorChain, Queue, QueueError
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

# §2.1 Device status field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# §6 Reserved feature bits
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# §4.2.2 InterruptStatus bits
VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

# §5 Device IDs
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19


class Interrupt:
    """A device's interrupt line: a status word plus an eventfd wired to KVM with irqfd.

    Writing the eventfd injects the interrupt inside KVM, without a trip
    through the vCPU thread.  The status word is what the driver reads in
    InterruptStatus and clears with InterruptACK.
    """

    def __init__(self) -> None:
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._status = 0
        self.count = 0

    @property
    def status(self) -> int:
        with self._lock:
            return self._status

    def trigger(self, bit: int = VIRTIO_MMIO_INT_VRING) -> None:
        with self._lock:
            self._status |= bit
            self.count += 1
        try:
            os.eventfd_write(self.eventfd, 1)
        except BlockingIOError:  # counter saturated: an interrupt is pending anyway
            pass

    def set_status(self, status: int) -> None:
        """Restore InterruptStatus from a snapshot (the line itself is in the irqchip state)."""
        with self._lock:
            self._status = status

    def ack(self, bits: int) -> None:
        with self._lock:
            self._status &= ~bits

    def close(self) -> None:
        if self.eventfd >= 0:
            os.close(self.eventfd)
            self.eventfd = -1


class FdWatcher(Protocol):
    """The part of the VMM's event loop a device with a host-side fd uses.

    A Protocol so that devices sit below the VMM that drives them
    (:class:`ember.vmm.event_loop.EventLoop` satisfies it): vsock watches its
    host socket, virtio-net its TAP.  Callbacks run on the event thread.
    """

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


@runtime_checkable
class TransportDevice(Protocol):
    """What a virtio device offers the transport and the VMM.

    The transport (vCPU thread for registers, event thread for kicks) holds
    ``lock`` around every call it makes; a device whose own callbacks run
    elsewhere (host sockets on the event thread, control requests) takes the
    same lock, so one lock serialises them all.  ``close`` releases host
    resources (fds, sockets) and is called once when the VM is torn down.
    ``counters`` and ``host_connections`` feed ``status`` and templating.
    """

    acked_features: int  # written by the transport on FEATURES_OK and on restore
    needs_reset: bool  # DEVICE_NEEDS_RESET, read through Status; restored by the transport

    @property
    def device_id(self) -> int:
        """§5 Device ID, read through DeviceID."""

    @property
    def queue_max_sizes(self) -> tuple[int, ...]:
        """QueueNumMax of each queue; their number is fixed for the device's lifetime."""

    @property
    def lock(self) -> threading.RLock:
        """Held by the transport around every call it makes into the device."""

    @property
    def active(self) -> bool: ...

    @property
    def host_connections(self) -> int: ...

    def device_features(self) -> int: ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None: ...

    def process_queue(self, index: int) -> None: ...

    def reset(self) -> None: ...

    def fail(self, why: str, interrupt: Interrupt | None = None) -> None: ...

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def restored(self) -> None: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class VirtioDevice(abc.ABC):
    """The device half of a virtio device; subclasses implement one device type.

    Satisfies :class:`TransportDevice` (checked by mypy wherever a device is
    attached, and by a unit test for every device class).
    """

    device_id: int
    queue_max_sizes: tuple[int, ...]

    def __init__(self) -> None:
        # Shared with the transport: register accesses (vCPU thread), kicks (event thread)
        # and the device's own callbacks all hold it.  Re-entrant, so a device method may
        # be called with it already held.
        self.lock = threading.RLock()
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.interrupt: Interrupt | None = None
        self.needs_reset = False

    @abc.abstractmethod
    def device_features(self) -> int:
        """Feature bits offered to the driver (VERSION_1 must be among them)."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device-specific configuration space (§4.2.2 offset 0x100 on)."""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 (a default no-op)
        """Most configuration spaces are read-only; writes are ignored."""

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None:
        """DRIVER_OK: the queues are set up and the device may start serving them."""
        self.memory = memory
        self.queues = queues
        self.interrupt = interrupt
        for queue in queues:
            queue.event_idx = bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX))

    @abc.abstractmethod
    def process_queue(self, index: int) -> None:
        """Serve what the driver made available on queue ``index`` (called on a kick)."""

    def reset(self) -> None:
        """The driver wrote 0 to Status: forget everything negotiated."""
        self.acked_features = 0
        self.memory = None
        self.queues = []
        self.needs_reset = False

    def save_state(self) -> dict[str, Any]:
        """Device-specific state for a snapshot (the transport saves queues and features)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (a default no-op)
        """Take back what :meth:`save_state` returned, before re-activation."""

    def restored(self) -> None:  # noqa: B027 (a default no-op)
        """Called once after a snapshot restore re-activated the device.

        Host-side resources (sockets, connections) are new: a device whose
        driver holds state about them tells it here (vsock: transport reset).
        """

    @property
    def active(self) -> bool:
        return self.memory is not None

    @property
    def host_connections(self) -> int:
        """Open host-side connections (vsock has some; a snapshot waits for zero)."""
        return 0

    def counters(self) -> dict[str, int]:
        """The device's own counters by name (``status`` shows them); none by default."""
        return {}

    def close(self) -> None:  # noqa: B027 (a default no-op)
        """Release host resources (fds, sockets); called once, at teardown."""

    def serve_queue(
        self,
        index: int,
        handler: Callable[[DescriptorChain], int],
        *,
        max_chains: int | None = None,
    ) -> None:
        """Pop every available chain, hand it to ``handler``, complete it with its result.

        ``handler`` returns how many bytes it wrote into the chain's writable
        buffers.  A malformed chain is completed with length 0 and counted by
        the queue; a broken ring puts the device in DEVICE_NEEDS_RESET.
        Notifications are suppressed while we drain, then re-enabled and the
        ring re-checked, so a buffer added meanwhile is never missed.

        ``max_chains`` bounds the chains one call takes (good and malformed
        alike): a driver on another vCPU can keep the ring topped up for as
        long as we drain it, so without a bound one kick could hold the device
        (and its lock) forever.  Chains left over wait, notifications on, for
        the driver's next kick: only a device whose drivers keep few chains in
        flight (the balloon's keep one) may set it, or a busy driver that
        added chains without kicking (notifications were off) could wait forever.
        """
        memory = self.memory
        if memory is None or index >= len(self.queues):
            return
        queue = self.queues[index]
        limit = max_chains if max_chains is not None else float("inf")
        taken = 0
        try:
            while True:
                queue.set_notification(memory, False)
                while taken < limit:
                    try:
                        chain = queue.pop(memory)
                    except QueueError as exc:
                        taken += 1
                        if exc.head is not None:
                            queue.add_used(memory, exc.head, 0)
                        if queue.broken:
                            self.fail(f"queue {index}: {exc}")
                            return
                        log.debug("%s: queue %d: bad chain: %s", type(self).__name__, index, exc)
                        continue
                    if chain is None:
                        break
                    taken += 1
                    queue.add_used(memory, chain.head, handler(chain))
                queue.set_notification(memory, True)
                if taken >= limit or not queue.pending(memory):
                    break
            self.signal_used(queue)
        except QueueError as exc:
            # The used or available ring became unusable (e.g. the driver re-readied the
            # queue at addresses outside RAM after DRIVER_OK): the queue is broken.
            self.fail(f"queue {index}: {exc}")

    def fail(self, why: str, interrupt: Interrupt | None = None) -> None:
        """The driver broke the device: stop serving until it resets it (§2.1.2).

        ``interrupt`` is for the transport, which may fail a device that was
        never activated (and so has no interrupt of its own yet).
        """
        log.warning("%s: needs reset: %s", type(self).__name__, why)
        self.needs_reset = True
        interrupt = interrupt or self.interrupt
        if interrupt is not None:
            interrupt.trigger(VIRTIO_MMIO_INT_CONFIG)

    def signal_used(self, queue: Queue) -> None:
        """Interrupt the driver if the queue's suppression rules ask for it."""
        memory, interrupt = self.memory, self.interrupt
        if memory is not None and interrupt is not None and queue.needs_notification(memory):
            interrupt.trigger(VIRTIO_MMIO_INT_VRING)
