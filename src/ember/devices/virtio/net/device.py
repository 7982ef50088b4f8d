"""virtio-net (virtio 1.2 §5.1) over a TAP-like packet fd.

The backend is any fd that carries one frame per read/write with a 12-byte
``virtio_net_hdr_v1`` in front: a TAP opened with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR`` and ``TUNSETVNETHDRSZ`` 12 (so checksum and segmentation
offloads pass through untouched), or a SOCK_SEQPACKET socket in tests.

- tx: each chain the guest offers is one header + frame, written whole; a
  backend that is full (EAGAIN) drops the frame and counts it, so a guest
  flooding tx can never make the VMM buffer without bound.
- rx: the event thread reads one frame when the fd is readable and spreads
  it over as many rx chains as it needs (``VIRTIO_NET_F_MRG_RXBUF``:
  ``num_buffers`` in the first header).  With no rx buffers left the fd is
  no longer watched (the frame waits in the kernel) until the driver adds
  buffers: no busy loop, no host memory growth.

Every length comes from the guest or the network and is checked.  A
malformed rx chain is returned to the driver empty and counted, like a
malformed tx chain: it costs that buffer, not the device.  Only a ring the
driver corrupted fails the device (``fail()``), and nothing the guest
writes raises out of a kick or an fd callback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.chain import DescriptorChain
from ember.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
    FdWatcher,
    Interrupt,
    VirtioDevice,
)
from ember.devices.virtio.queue import Queue, QueueError
from ember.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# §5.1.3 feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (num_buffers included with VERSION_1)
MAX_FRAME = 65535 + 14 + 4  # a 64 KiB GSO packet, Ethernet header, VLAN tag
MAX_PACKET = VNET_HDR_SIZE + MAX_FRAME
_NUM_BUFFERS = struct.Struct("<H")
_NUM_BUFFERS_AT = 10


@dataclass
class NetStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # the backend was full or failed
    tx_bad: int = 0  # chains too short or too long to be a frame
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0  # frames too big for every buffer the driver could give
    rx_bad_chains: int = 0  # malformed rx chains, returned to the driver empty


class Net(VirtioDevice):
    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        fd: int,
        events: FdWatcher,
        mac: bytes,
        *,
        offloads: bool = True,
        set_offload: Callable[[int, int], None] | None = None,
    ) -> None:
        """``set_offload(fd, TUN_F_*)`` tells a TAP what the guest accepted (None: no TAP)."""
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.fd = fd
        self.events = events
        self.mac = mac
        self.offloads = offloads
        self.set_offload = set_offload
        self.on_host_activity: Callable[[], None] | None = None  # wakes a parked VM
        self.stats = NetStats()
        self._pending: bytes | None = None  # a frame read but not yet placed
        self._watching = False
        os.set_blocking(fd, False)

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self.stats)

    def device_features(self) -> int:
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
        )
        if self.offloads:
            for bit in (
                VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
            ):  # fmt: skip
                features |= 1 << bit
        return features

    def read_config(self, offset: int, size: int) -> bytes:
        # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu
        config = self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, 1500)
        return config[offset : offset + size]

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None:
        with self.lock:
            super().activate(memory, queues, interrupt)
            if self.set_offload is not None:
                try:
                    self.set_offload(self.fd, tun_offload_flags(self.acked_features))
                except OSError as exc:  # the host kernel will then checksum everything itself
                    log.warning("net: TUNSETOFFLOAD failed: %s", exc.strerror)
            self._watch(True)

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self._watch(False)
            self._pending = None

    def close(self) -> None:
        with self.lock:
            self._watch(False)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def process_queue(self, index: int) -> None:
        with self.lock:
            if index == TX_QUEUE:
                self.serve_queue(TX_QUEUE, self._transmit)
            elif index == RX_QUEUE:
                self._receive()  # new buffers: place what waits, watch the fd again

    # --- tx
    def _transmit(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        total = chain.total_readable()
        if not VNET_HDR_SIZE < total <= MAX_PACKET:
            self.stats.tx_bad += 1
            return 0
        packet = BufferList(chain.readable).read(memory, 0, total)
        try:
            os.write(self.fd, packet)
        except OSError:  # full (EAGAIN) or gone: drop, never queue in the VMM
            self.stats.tx_dropped += 1
            return 0
        self.stats.tx_frames += 1
        self.stats.tx_bytes += total - VNET_HDR_SIZE
        return 0

    # --- rx
    def _on_readable(self) -> None:
        if self.on_host_activity is not None:
            self.on_host_activity()
        with self.lock:
            self._receive()

    def _receive(self) -> None:
        memory = self.memory
        if memory is None or self.needs_reset or self.fd < 0 or len(self.queues) <= RX_QUEUE:
            # Nothing can be placed until the driver resets us: stop watching, or a readable
            # fd would call us again and again (level-triggered). Frames wait in the kernel;
            # activate() watches again.
            self._watch(False)
            return
        queue = self.queues[RX_QUEUE]
        try:
            while True:
                if self._pending is None:
                    try:
                        self._pending = os.read(self.fd, MAX_PACKET)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        log.warning("net: the backend failed: %s", exc.strerror)
                        self._watch(False)
                        break
                    if len(self._pending) <= VNET_HDR_SIZE:
                        self._pending = None
                        continue
                if not self._place(queue, memory, self._pending):
                    self._watch(False)  # out of buffers: the kernel keeps the frames for now
                    break
                self._pending = None
                self._watch(True)
            # Inside the try: reading the driver's used_event may find a ring it broke.
            # A no-op when nothing was added (the queue counts what it added since).
            self.signal_used(queue)
        except QueueError as exc:
            self.fail(f"rx queue: {exc}")

    def _place(self, queue: Queue, memory: GuestMemory, packet: bytes) -> bool:
        """Spread one packet over rx chains; False if there are too few (the packet waits).

        Good chains taken for a packet that then does not fit are given back
        by moving ``next_avail`` back over them, so the next try pops them
        again.  A malformed chain is returned at once, empty (the driver sees a
        zero-length buffer, drops it and refills), and counted; once one has
        been returned the avail ring cannot be rewound past it, so the good
        chains taken around it are returned empty too.  Raises QueueError only
        for a ring the driver broke.
        """
        chains: list[DescriptorChain] = []
        room = 0
        returned_bad = False
        mergeable = bool(self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF))
        # Each pass takes an avail entry, and the ring holds at most QUEUE_SIZE: this bounds
        # the work even if the driver keeps adding malformed chains while we read them.
        for _ in range(2 * QUEUE_SIZE):
            if room >= len(packet) or (chains and not mergeable):
                break  # enough room; without mergeable buffers a frame must fit in one chain
            try:
                chain = queue.pop(memory) if queue.pending(memory) else None
            except QueueError as exc:
                if queue.broken:
                    raise
                self.stats.rx_bad_chains += 1
                if exc.head is not None:
                    queue.add_used(memory, exc.head, 0)
                returned_bad = True
                continue
            if chain is None:
                if not returned_bad:
                    queue.next_avail = (queue.next_avail - len(chains)) & 0xFFFF  # give back
                    return False
                break  # cannot give them back past a returned chain: returned empty below
            chains.append(chain)
            room += chain.total_writable()
        if room < len(packet):  # too few buffers with room for it (or a broken driver)
            for chain in chains:
                queue.add_used(memory, chain.head, 0)
            if returned_bad and not queue.pending(memory):
                return False  # out of buffers: the packet waits for the driver's next ones
            self.stats.rx_dropped += 1
            return True
        data = bytearray(packet)
        _NUM_BUFFERS.pack_into(data, _NUM_BUFFERS_AT, len(chains))
        pieces: list[int] = []
        offset = 0
        try:
            for chain in chains:
                piece = data[offset : offset + chain.total_writable()]
                BufferList(chain.writable).write(memory, 0, bytes(piece))
                pieces.append(len(piece))
                offset += len(piece)
        except GuestMemoryError:  # not expected (the queue checked every buffer): drop it
            for chain in chains:  # every chain goes back, written or not
                queue.add_used(memory, chain.head, 0)
            self.stats.rx_dropped += 1
            return True
        for chain, written in zip(chains, pieces, strict=True):
            queue.add_used(memory, chain.head, written)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(packet) - VNET_HDR_SIZE
        return True

    def _watch(self, on: bool) -> None:
        if on and not self._watching and self.fd >= 0:
            self.events.add_reader(self.fd, self._on_readable)
            self._watching = True
        elif not on and self._watching:
            self.events.remove(self.fd)
            self._watching = False


def tun_offload_flags(acked_features: int) -> int:
    """The ``TUN_F_*`` flags matching what the driver accepted (``VIRTIO_NET_F_GUEST_*``)."""
    from ember.network.if_tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6

    flags = 0
    if acked_features & (1 << VIRTIO_NET_F_GUEST_CSUM):
        flags |= TUN_F_CSUM
        if acked_features & (1 << VIRTIO_NET_F_GUEST_TSO4):
            flags |= TUN_F_TSO4
        if acked_features & (1 << VIRTIO_NET_F_GUEST_TSO6):
            flags |= TUN_F_TSO6
    return flags
