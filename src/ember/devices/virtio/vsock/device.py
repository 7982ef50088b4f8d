"""virtio-vsock (virtio 1.2 §5.10) bridged to host Unix sockets, Firecracker-style.

Queues (§5.10.2): 0 rx (device -> driver packets), 1 tx (driver -> device
packets), 2 event.  Configuration (§5.10.4): ``le64 guest_cid``.  Only stream
sockets are offered.  The host side is a Unix listener at ``uds_path`` that
speaks Firecracker's ``CONNECT <port>\\n`` / ``OK <host_port>\\n`` handshake;
guest connections to CID 2 port P reach ``<uds_path>_P`` (see ``muxer.py``).

Threading: the event thread runs host socket callbacks (through the muxer's
one epoll fd) and queue kicks; a vCPU thread may also kick (QueueNotify
without an ioeventfd) and runs activate/reset.  Every entry point takes
``self.lock``, an RLock, so it is safe to call them under an outer lock too;
the mmio transport takes the device's ``lock`` (every device has one, see
``TransportDevice``) as its own, so register accesses and socket events are
serialised by one lock.

Memory: what the guest sends faster than a host socket reads is held within
credit windows drawn from one budget of ``tx_budget`` bytes per device
(``budget.py``); host -> guest data is never buffered here.

The rx queue is filled when (a) a host socket is readable and its guest end
has credit, or (b) control packets are owed.  When the driver has no rx
buffer left, host sockets stop being polled until it kicks the rx queue.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_VSOCK,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    FdWatcher,
    Interrupt,
    VirtioDevice,
)
from ember.devices.virtio.queue import DescriptorChain, Queue, QueueError
from ember.devices.virtio.vsock.budget import TX_BUDGET
from ember.devices.virtio.vsock.muxer import MAX_CONNECTIONS, VsockMuxer
from ember.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_CONFIG,
    VIRTIO_VSOCK_EVENT,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_F_STREAM,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
)
from ember.devices.virtio.vsock.state import (
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    LINGER_TIMEOUT,
    VsockStats,
)
from ember.errors import ConfigError
from ember.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZES = (256, 256, 16)
DEFAULT_GUEST_CID = 3  # the first CID that is not reserved


class Vsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    queue_max_sizes = QUEUE_SIZES

    def __init__(
        self,
        guest_cid: int,
        uds_path: Path,
        events: FdWatcher,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        linger_timeout: float = LINGER_TIMEOUT,
        tx_budget: int = TX_BUDGET,
    ) -> None:
        if not VMADDR_CID_HOST < guest_cid < VMADDR_CID_ANY:
            raise ConfigError(
                f"guest CID {guest_cid} is reserved or too large: use 3 to {VMADDR_CID_ANY - 1}"
            )
        super().__init__()
        self.guest_cid = guest_cid
        self.uds_path = Path(uds_path)
        self.events = events
        self.stats = VsockStats()
        self.muxer = VsockMuxer(
            guest_cid,
            self.uds_path,
            self.stats,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            linger_timeout=linger_timeout,
            tx_budget=tx_budget,
        )
        self._rx_spare: DescriptorChain | None = None  # popped, then found nothing to carry
        self._event_pending = False
        self._closed = False
        self.on_host_activity: Callable[[], None] | None = None
        self._next_port: object = None
        self._restored_keys: list[tuple[int, int]] = []
        self._resumable: list[dict[str, Any]] = []
        self._host_fd = self.muxer.fileno()
        events.add_reader(self._host_fd, self._on_host_ready)

    # -- the VirtioDevice contract ----------------------------------------------------------

    def counters(self) -> dict[str, int]:
        found = dataclasses.asdict(self.stats)
        found["rx_buffers"] = self.rx_buffers()
        found["rx_queue_size"] = self.queues[RX_QUEUE].size if len(self.queues) > RX_QUEUE else 0
        return found

    def rx_buffers(self) -> int:
        """How many receive buffers the driver has posted that no packet has used yet.

        Linux's driver tops its rx queue up only when fewer than half of its buffers are left
        (``virtio_vsock_rx_fill``), ~128 buffers at once: ~150,000 instructions of emulated
        guest kernel here, paid by whichever request crosses the mark. A template snapshot
        taken just after a top-up puts that ~128 packets past a restored sandbox's first
        requests (:func:`ember.template_warm.top_up_rx`)."""
        with self.lock:
            memory = self.memory
            if memory is None or len(self.queues) <= RX_QUEUE:
                return 0
            queue = self.queues[RX_QUEUE]
            if not queue.ready:
                return 0
            try:
                pending = queue.pending(memory)
            except QueueError:
                return 0
            return pending + (self._rx_spare is not None)

    def device_features(self) -> int:
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_VSOCK_F_STREAM
        )

    def read_config(self, offset: int, size: int) -> bytes:
        config = VIRTIO_VSOCK_CONFIG.pack(self.guest_cid)  # struct virtio_vsock_config
        return config[offset : offset + size]

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None:
        with self.lock:
            super().activate(memory, queues, interrupt)
            self._rx_spare = None
            self.muxer.set_rx_starved(False)
            self._pump_rx()
            self._deliver_event()

    def process_queue(self, index: int) -> None:
        with self.lock:
            if self._closed or not self.active or self.needs_reset:
                return
            if index == RX_QUEUE:
                self.muxer.set_rx_starved(False)
            elif index == TX_QUEUE:
                self.serve_queue(TX_QUEUE, self._handle_tx)
            elif index == EVENT_QUEUE:
                self._deliver_event()
                return
            self._pump_rx()

    def reset(self) -> None:
        """The driver reset the device: every connection is gone (the guest forgot them)."""
        with self.lock:
            self.muxer.reset_connections()
            self._rx_spare = None
            self._event_pending = False
            super().reset()

    # -- public -----------------------------------------------------------------------------

    def transport_reset(self) -> None:
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).

        Used after a snapshot restore: the host sockets the guest's
        connections were bridged to do not exist any more.  The event is
        delivered as soon as the driver has an event buffer.
        """
        with self.lock:
            if self._closed:
                return
            self.muxer.reset_connections()
            self._event_pending = True
            self._deliver_event()

    def save_state(self) -> dict[str, Any]:
        with self.lock:
            resumable = self.muxer.resumable_state()
            keep = {(s["local_port"], s["peer_port"]) for s in resumable}
            return {
                "connections": [list(k) for k in self.muxer.connection_keys() if k not in keep],
                "resumable": resumable,
                "next_port": self.muxer.next_port,
            }

    def load_state(self, state: dict[str, Any]) -> None:
        self._restored_keys = [(int(a), int(b)) for a, b in state.get("connections", [])]
        self._resumable = [dict(s) for s in state.get("resumable", [])]
        self._next_port = state.get("next_port")

    def restored(self) -> None:
        """The host ends of the snapshot's connections do not exist here: reset the guest ends,
        except the quiet ones kept for a host client's ``RESUME``."""
        with self.lock:
            # Ports the snapshot's guest has seen may still name a socket there (its owner has
            # not closed it yet, even after our RST); a new connection on one would be ignored.
            used = [k[0] for k in self._restored_keys] + [
                int(s["local_port"]) for s in self._resumable
            ]
            saved = self._next_port if isinstance(self._next_port, int) else 0
            self.muxer.continue_ports_after(max([saved - 1, *used], default=0))
            self.muxer.reset_guest_ends(self._restored_keys)
            self.muxer.add_resumable(self._resumable)
            self._restored_keys = []
            self._resumable = []
            if self.active and not self.needs_reset:
                self._pump_rx()

    def close(self) -> None:
        """Stop serving: close every host fd and remove the listening socket file."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self.events.remove(self._host_fd)
            self.muxer.close()

    # -- internals --------------------------------------------------------------------------

    @property
    def host_connections(self) -> int:
        """Open or half-open connections with the host side (a sandbox in use has some)."""
        with self.lock:
            return self.muxer.open_connections()

    def _on_host_ready(self) -> None:
        """Event thread: one of the muxer's fds is ready."""
        if self.on_host_activity is not None:
            self.on_host_activity()  # e.g. wake parked vCPUs: the guest must answer
        with self.lock:
            if self._closed:
                return
            self.muxer.handle_events()
            if self.active and not self.needs_reset:
                self._pump_rx()

    def _handle_tx(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        try:
            self.muxer.handle_tx(memory, chain)
        except GuestMemoryError as exc:  # the chain was checked, so this is not expected
            self.stats.bad_packets += 1
            log.debug("vsock: tx packet unreadable: %s", exc)
        return 0

    def _pump_rx(self) -> None:
        """Move what the muxer owes the guest into rx buffers, then interrupt once."""
        memory = self.memory
        if memory is None or self.needs_reset or len(self.queues) <= RX_QUEUE:
            return
        queue = self.queues[RX_QUEUE]
        try:
            while self.muxer.has_rx_work():
                chain = self._rx_chain(queue, memory)
                if chain is None:
                    self.muxer.set_rx_starved(True)
                    break
                try:
                    written = self.muxer.fill_rx(memory, chain)
                except GuestMemoryError as exc:
                    log.debug("vsock: rx buffer unwritable: %s", exc)
                    self.stats.bad_rx_buffers += 1
                    written = 0
                if written is None:
                    self._rx_spare = chain
                    break
                queue.add_used(memory, chain.head, written)
            self.signal_used(queue)
        except QueueError as exc:
            self.fail(f"rx queue: {exc}")

    def _rx_chain(self, queue: Queue, memory: GuestMemory) -> DescriptorChain | None:
        """The next rx buffer: the one kept from last time, or a new one from the ring.

        When the ring is empty, kicks are re-enabled and the ring re-checked, so a
        buffer added meanwhile is seen now or kicked later, never missed.
        """
        if self._rx_spare is not None:
            chain, self._rx_spare = self._rx_spare, None
            return chain
        return self._pop_or_arm(queue, memory)

    @staticmethod
    def _pop_or_arm(queue: Queue, memory: GuestMemory) -> DescriptorChain | None:
        """Pop a well-formed chain; when there is none, ask the driver to kick when it adds one.

        Malformed chains are returned with length 0 (and counted by the queue).
        Raises QueueError only when the ring itself is broken.
        """
        for _ in range(queue.size + 1):
            try:
                chain = queue.pop(memory)
                if chain is None:
                    queue.set_notification(memory, True)
                    chain = queue.pop(memory)
            except QueueError as exc:
                if exc.head is not None:
                    queue.add_used(memory, exc.head, 0)
                if queue.broken:
                    raise
                continue
            return chain
        queue.set_notification(memory, True)  # a run of bad chains: the driver kicks again
        return None

    def _deliver_event(self) -> None:
        if not self._event_pending or self.memory is None or len(self.queues) <= EVENT_QUEUE:
            return
        memory, queue = self.memory, self.queues[EVENT_QUEUE]
        event = VIRTIO_VSOCK_EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        try:
            for _ in range(queue.size + 1):
                chain = self._pop_or_arm(queue, memory)
                if chain is None:
                    return  # delivered when the driver kicks the event queue
                writable = BufferList(chain.writable)
                if writable.total < len(event):
                    queue.add_used(memory, chain.head, 0)
                    continue
                writable.write(memory, 0, event)
                queue.add_used(memory, chain.head, len(event))
                self._event_pending = False
                break
            self.signal_used(queue)
        except QueueError as exc:
            self.fail(f"event queue: {exc}")
