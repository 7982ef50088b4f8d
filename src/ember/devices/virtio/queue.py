"""The device side of a split virtqueue (virtio 1.2 §2.7).

The driver owns three areas of guest memory, whose addresses the transport
copies into a :class:`Queue` from register writes::

    descriptor table  struct virtq_desc[size]                    16-byte aligned (§2.7.5)
    available ring    le16 flags, idx, ring[size], used_event     2-byte aligned (§2.7.6)
    used ring         le16 flags, idx, {le32 id, len}[size],
                      le16 avail_event                            4-byte aligned (§2.7.8)

A device loop looks like this (the re-check after re-enabling notifications
closes the race with a driver that added a buffer just before)::

    while True:
        queue.set_notification(mem, False)
        while True:
            try:
                chain = queue.pop(mem)
            except QueueError as exc:
                if exc.head is not None:
                    queue.add_used(mem, exc.head, 0)
                if queue.broken:
                    ...  # set DEVICE_NEEDS_RESET in the device status
                    break
                continue
            if chain is None:
                break
            queue.add_used(mem, chain.head, serve(chain))
        queue.set_notification(mem, True)
        if not queue.pending(mem):
            break
    if queue.needs_notification(mem):
        ...  # raise the interrupt

The 16-bit ring indices run free and wrap; all index arithmetic is mod 2**16.
All guest memory access goes through :class:`GuestMemory`, whose errors are
turned into :class:`QueueError`: nothing the guest writes can make this module
raise anything else.
"""

from __future__ import annotations

import logging
import struct
import threading

from ember.devices.virtio.chain import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    Descriptor,
    DescriptorChain,
    QueueError,
    read_chain,
)
from ember.memory import GuestMemory, GuestMemoryError

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Descriptor",
    "DescriptorChain",
    "Queue",
    "QueueError",
    "avail_ring_bytes",
    "desc_table_bytes",
    "full_fence",
    "used_ring_bytes",
    "vring_need_event",
]

log = logging.getLogger(__name__)

# Feature bits (§6): reserved transport features that change the ring layout's meaning.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

# struct virtq_avail.flags (§2.7.6): the driver asks for no used-buffer notifications.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# struct virtq_used.flags (§2.7.8): the device asks for no available-buffer notifications.
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # §2.7: Queue Size is a power of 2, at most 32768

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem { le32 id; le32 len; }
_USED_ELEM_SIZE = _USED_ELEM.size


def desc_table_bytes(size: int) -> int:
    return VIRTQ_DESC_SIZE * size


def avail_ring_bytes(size: int) -> int:
    """flags + idx + ring[size] + used_event: the trailer exists whether or not event idx is on."""
    return 6 + 2 * size


def used_ring_bytes(size: int) -> int:
    """flags + idx + ring[size] of virtq_used_elem + avail_event."""
    return 6 + _USED_ELEM_SIZE * size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10: did moving an index from ``old_idx`` to ``new_idx`` step past ``event_idx``?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """Order this thread's earlier stores before its later loads (a store-load barrier).

    The guest's vCPU reads and writes the rings concurrently.  After publishing
    ``used.idx`` the device reads ``used_event`` while the driver writes
    ``used_event`` and then reads ``used.idx``; without a full barrier on both
    sides each can miss the other's store and the interrupt is lost (the guest
    hangs).  Python has no fence primitive, but taking and dropping an
    uncontended ``threading.Lock`` performs locked read-modify-writes (``lock
    cmpxchg`` on x86), which are full barriers.  Stores are not reordered with
    each other on x86, so writing the used element before ``used.idx`` needs
    nothing more than doing it in that order.
    """
    with _FENCE_LOCK:
        pass


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Queue:
    """One split virtqueue as the device sees it.

    The transport fills ``size``, ``desc_table``, ``avail_ring``,
    ``used_ring``, ``event_idx`` and ``ready`` from the driver's register
    writes and checks :meth:`is_valid` before activating the device.
    ``next_avail`` / ``next_used`` are the device's own free-running indices
    (saved and restored by snapshots along with ``signalled_used`` and
    ``num_added``).  ``broken`` is set when the driver corrupted the ring
    itself; ``invalid_chains`` counts every QueueError raised for the guest's
    doing.  A queue is not thread-safe: one thread (the device's) owns it.
    """

    def __init__(self, max_size: int) -> None:
        if not _is_power_of_two(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        # A metric for the device's lifetime, so reset() leaves it alone.
        self.invalid_chains = 0
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.4); the driver sets everything up again."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.broken = False
        self.next_avail = 0
        self.next_used = 0
        # used.idx when the driver was last interrupted, and used entries added since then
        # (unbounded, so that more than 2**16 of them cannot alias to "few").
        self.signalled_used = 0
        self.num_added = 0

    # -- snapshots ---------------------------------------------------------------------------

    _STATE = (
        "size", "ready", "desc_table", "avail_ring", "used_ring", "event_idx", "broken",
        "next_avail", "next_used", "signalled_used", "num_added",
    )  # fmt: skip

    def save_state(self) -> dict[str, int | bool]:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state(self, state: dict[str, int | bool]) -> None:
        """Put back what :meth:`save_state` returned; a size QueueNum cannot hold is refused.

        Any 32-bit size is taken back, not just those a ring may have: the driver can
        leave one in the register (QueueNum on a queue that never worked, §4.2.2), and
        its snapshot must restore.  Every use checks the size (``is_valid``, ``pop``,
        ``add_used``), so a restored nonsense size fails the device as it did before.
        """
        size = int(state["size"])
        if not 0 <= size <= 0xFFFF_FFFF:
            raise ValueError(f"queue size {size} in a snapshot does not fit QueueNum (32 bits)")
        for name in self._STATE:
            current = getattr(self, name)
            setattr(self, name, type(current)(state[name]))

    # -- set-up -----------------------------------------------------------------------------

    def is_valid(self, mem: GuestMemory) -> bool:
        """Whether the driver's configuration can be used at all (checked at activation).

        Alignment follows §2.7 (desc 16, avail 2, used 4); each area must lie
        inside one guest RAM region because the device accesses it by offset.
        """
        size = self.size
        if not self.ready or not _is_power_of_two(size) or size > self.max_size:
            return False
        if self.desc_table % 16 or self.avail_ring % 2 or self.used_ring % 4:
            return False
        return (
            mem.contains(self.desc_table, desc_table_bytes(size))
            and mem.contains(self.avail_ring, avail_ring_bytes(size))
            and mem.contains(self.used_ring, used_ring_bytes(size))
        )

    def _break(self, why: str) -> QueueError:
        """Mark the ring unusable until reset and return the error to raise.

        From then on pop and pending see nothing, and add_used,
        needs_notification and set_notification do nothing: the ring is not
        touched again until the driver resets the device (DEVICE_NEEDS_RESET).
        """
        self.broken = True
        self.invalid_chains += 1
        log.warning("virtqueue broken, the device needs a reset: %s", why)
        return QueueError(f"virtqueue broken: {why}")

    # -- the available ring -----------------------------------------------------------------

    def _avail_idx(self, mem: GuestMemory) -> int:
        # One 2-byte read, so the driver's concurrent store is seen whole, never torn.
        value: int = _U16.unpack(mem.read(self.avail_ring + 2, 2))[0]
        return value

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that pop has not taken yet.

        0 for a queue that is not ready or is broken.  Raises QueueError (and
        breaks the ring) only if the available ring is outside guest memory.
        """
        if not self.ready or self.broken:
            return 0
        try:
            return (self._avail_idx(mem) - self.next_avail) & 0xFFFF
        except GuestMemoryError as exc:
            raise self._break(f"available ring unreadable: {exc}") from None

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, validated; None when the driver offered nothing new.

        A malformed chain raises QueueError(head) after its avail entry is
        consumed (so the next call serves the next request).  A ring the driver
        corrupted (avail.idx more than ``size`` ahead of us, or rings outside
        RAM) sets ``broken`` and raises QueueError(head=None); pop then returns
        None until :meth:`reset`.
        """
        if not self.ready or self.broken:
            return None
        size = self.size
        if not _is_power_of_two(size) or size > self.max_size:
            raise self._break(f"queue size {size} is not a power of 2 <= {self.max_size}")
        try:
            avail_idx = self._avail_idx(mem)
            waiting = (avail_idx - self.next_avail) & 0xFFFF
            if waiting == 0:
                return None
            if waiting > size:
                raise self._break(f"avail.idx {avail_idx} is {waiting} ahead of a ring of {size}")
            # Reading ring[] after idx is ordered: x86 does not reorder loads with loads.
            slot = self.avail_ring + 4 + 2 * (self.next_avail % size)
            head: int = _U16.unpack(mem.read(slot, 2))[0]
        except GuestMemoryError as exc:
            raise self._break(f"available ring unreadable: {exc}") from None
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        try:
            if head >= size:
                raise QueueError(f"avail entry names head {head} outside a table of {size}")
            return read_chain(mem, self.desc_table, size, head)
        except QueueError as exc:
            self.invalid_chains += 1
            level = logging.WARNING if self.invalid_chains == 1 else logging.DEBUG
            log.log(level, "bad virtqueue request (%d so far): %s", self.invalid_chains, exc)
            raise

    # -- the used ring ----------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written into it.

        The element is stored before ``used.idx`` (§2.7.8.2): the driver may
        consume the element as soon as it sees the new index.  Does nothing on
        a broken ring, which the driver must reset anyway.
        """
        if not 0 <= length <= 0xFFFF_FFFF:
            raise ValueError(f"used length {length} does not fit le32")
        if self.broken:
            return
        size = self.size
        if not 0 <= head < size or not _is_power_of_two(size):
            raise QueueError(f"add_used of head {head} outside a table of {size}")
        try:
            elem = self.used_ring + 4 + _USED_ELEM_SIZE * (self.next_used % size)
            mem.write(elem, _USED_ELEM.pack(head, length))
            next_used = (self.next_used + 1) & 0xFFFF
            # A single 2-byte store, so the driver never sees a torn index.
            mem.write(self.used_ring + 2, _U16.pack(next_used))
        except GuestMemoryError as exc:
            raise self._break(f"used ring unwritable: {exc}") from None
        self.next_used = next_used
        self.num_added += 1

    def needs_notification(self, mem: GuestMemory) -> bool:
        """After add_used: should the device interrupt the driver now?

        Without event idx the driver may set VIRTQ_AVAIL_F_NO_INTERRUPT
        (§2.7.7); with it, the driver names in ``used_event`` the used index
        whose passing deserves an interrupt, and we test whether the used
        entries added since the last interrupt stepped past it (§2.7.10).
        Returns False when nothing was added since the last interrupt, or the
        ring is broken.
        """
        if self.num_added == 0 or self.broken:
            return False
        full_fence()  # publish used.idx before reading the driver's wishes
        try:
            if self.event_idx:
                slot = self.avail_ring + 4 + 2 * self.size
                used_event: int = _U16.unpack(mem.read(slot, 2))[0]
                notify = self.num_added >= 0x10000 or vring_need_event(
                    used_event, self.next_used, self.signalled_used
                )
            else:
                flags: int = _U16.unpack(mem.read(self.avail_ring, 2))[0]
                notify = not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as exc:
            raise self._break(f"available ring unreadable: {exc}") from None
        if notify:
            self.signalled_used = self.next_used
            self.num_added = 0
        return notify

    def set_notification(self, mem: GuestMemory, enable: bool) -> None:
        """Ask the driver to kick (enable) or not to kick (disable) on new buffers.

        Without event idx this is VIRTQ_USED_F_NO_NOTIFY in ``used.flags``;
        with it, enabling writes ``avail_event`` = our next avail index (kick
        me for anything after what I have taken), and disabling writes nothing:
        the driver only kicks again once it passes ``avail_event``, which we do
        not move while busy.  After enabling, the caller must re-check
        :meth:`pending`: the driver may have added a buffer just before it saw
        the new setting.  Does nothing on a broken ring.
        """
        if self.broken:
            return
        try:
            if self.event_idx:
                if enable:
                    slot = self.used_ring + 4 + _USED_ELEM_SIZE * self.size
                    mem.write(slot, _U16.pack(self.next_avail))
            else:
                mem.write(self.used_ring, _U16.pack(0 if enable else VIRTQ_USED_F_NO_NOTIFY))
        except GuestMemoryError as exc:
            raise self._break(f"used ring unwritable: {exc}") from None
        full_fence()  # the setting is visible before the caller re-reads avail.idx
