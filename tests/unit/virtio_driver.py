"""A fake virtio *driver* that lays out real split rings in a GuestMemory (virtio 1.2 §2.7).

Device tests use it the way a guest kernel would use a virtio device: it owns
the descriptor table, the available ring and the used ring, allocates data
buffers, offers chains and reaps completions — all through the same guest
memory the device reads, so the device code under test runs unmodified::

    mem = GuestMemory.anonymous(1 << 20)
    driver = VirtioDriver(mem, size=16)
    queue = Queue(256)
    driver.configure(queue)                      # what the transport would copy
    head = driver.add_chain([b"request"], [512])  # readable data, then writable space
    chain = queue.pop(mem)
    ...                                          # the device serves it
    queue.add_used(mem, chain.head, 3)
    assert driver.used_entries() == [UsedElem(head, 3)]
    assert driver.written(head, 3) == b"..."     # what the device wrote back

It also has raw writers (:meth:`write_desc`, :meth:`push_avail`,
:meth:`set_avail_idx`, the flag and event properties) for hostile cases the
polite helpers refuse to build.  Layout (defaults; every address can be chosen)::

    desc_table  at 0x1000
    avail_ring  right after the descriptor table
    used_ring   at the next 4 KiB boundary
    buffers     from the next 4 KiB boundary to the end of the first RAM region
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ember.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    Queue,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
)
from ember.memory import GuestMemory

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class UsedElem(NamedTuple):
    """One ``struct virtq_used_elem``: the head the device returned and the bytes it wrote."""

    id: int
    len: int


@dataclass
class _Offered:
    """What the driver remembers about a chain it offered, until the device returns it."""

    descriptors: list[int]
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class VirtioDriver:
    """The driver half of one split virtqueue, writing real rings into guest memory."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int = 16,
        *,
        desc_table: int = 0x1000,
        avail_ring: int | None = None,
        used_ring: int | None = None,
        data_start: int | None = None,
        data_end: int | None = None,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc_table = desc_table
        self.avail_ring = desc_table + desc_table_bytes(size) if avail_ring is None else avail_ring
        self.used_ring = (
            _align_up(self.avail_ring + avail_ring_bytes(size), 4096)
            if used_ring is None
            else used_ring
        )
        rings_end = max(
            self.desc_table + desc_table_bytes(size),
            self.avail_ring + avail_ring_bytes(size),
            self.used_ring + used_ring_bytes(size),
        )
        self.data_start = _align_up(rings_end, 4096) if data_start is None else data_start
        self.data_end = mem.regions[0].end if data_end is None else data_end
        if self.data_start >= self.data_end:
            raise ValueError("no room left for buffers after the rings")
        self._next_buffer = self.data_start
        self._free = list(range(size))
        self._offered: dict[int, _Offered] = {}
        self._returned: dict[int, _Offered] = {}  # reaped chains, kept for written()
        self.avail_idx = 0  # the driver's shadow of avail.idx (what it last published)
        self.last_used = 0  # the next used.idx entry the driver will reap
        self.mem.fill(self.desc_table, desc_table_bytes(size), 0)
        self.mem.fill(self.avail_ring, avail_ring_bytes(size), 0)
        self.mem.fill(self.used_ring, used_ring_bytes(size), 0)

    # -- set-up -----------------------------------------------------------------------------

    def configure(self, queue: Queue, *, event_idx: bool = False) -> None:
        """Do what the transport does on the driver's register writes, and mark the queue ready."""
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.event_idx = event_idx
        queue.ready = True

    def start_at(self, index: int, queue: Queue | None = None) -> None:
        """Move both rings' free-running indices to ``index`` (as if restored from a snapshot).

        Lets a test reach the 16-bit wraparound without offering 65536 chains;
        ``queue``'s own indices are moved along when given.
        """
        self.set_avail_idx(index)
        self.mem.write(self.used_ring + 2, _U16.pack(index & 0xFFFF))
        self.last_used = index & 0xFFFF
        if queue is not None:
            queue.next_avail = queue.next_used = queue.signalled_used = index & 0xFFFF

    # -- buffers ----------------------------------------------------------------------------

    def alloc(self, length: int, data: bytes = b"") -> int:
        """Reserve ``length`` bytes (8-aligned) of buffer space, optionally filled with ``data``.

        A bump allocator that wraps to ``data_start`` when the space runs out:
        fine for tests, which complete requests long before the space is reused.
        """
        if length > self.data_end - self.data_start:
            raise ValueError(f"a {length}-byte buffer does not fit the buffer area")
        if self._next_buffer + length > self.data_end:
            self._next_buffer = self.data_start
        addr = self._next_buffer
        self._next_buffer = _align_up(addr + length, 8)
        if data:
            self.mem.write(addr, data[:length])
        return addr

    # -- offering chains --------------------------------------------------------------------

    def add_chain(
        self, readable: list[bytes], writable_lens: list[int], indirect: bool = False
    ) -> int:
        """Offer a request: device-readable buffers holding ``readable``, then writable space.

        Each list item becomes one descriptor.  With ``indirect`` the buffers go
        in an indirect table (§2.7.5.3) referenced by a single descriptor.
        Returns the head index (what the device will hand back in the used ring).
        """
        buffers = [(self.alloc(len(d), d), len(d), 0) for d in readable]
        buffers += [(self.alloc(n), n, VIRTQ_DESC_F_WRITE) for n in writable_lens]
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.write_indirect_table(
                [
                    (addr, n, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0), i + 1)
                    for i, (addr, n, flags) in enumerate(buffers)
                ]
            )
            indices = self._take(1)
            self.write_desc(indices[0], table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            indices = self._take(len(buffers))
            for i, (addr, n, flags) in enumerate(buffers):
                if i + 1 < len(buffers):
                    self.write_desc(indices[i], addr, n, flags | VIRTQ_DESC_F_NEXT, indices[i + 1])
                else:
                    self.write_desc(indices[i], addr, n, flags, 0)
        head = indices[0]
        self._returned.pop(head, None)
        self._offered[head] = _Offered(
            indices,
            [(a, n) for a, n, f in buffers if not f & VIRTQ_DESC_F_WRITE],
            [(a, n) for a, n, f in buffers if f & VIRTQ_DESC_F_WRITE],
        )
        self.push_avail(head)
        return head

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(
                f"{count} descriptors wanted, {len(self._free)} free: reap used_entries() first"
            )
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def write_indirect_table(self, descs: list[tuple[int, int, int, int]]) -> int:
        """Write ``(addr, len, flags, next)`` tuples as an indirect table; return its address."""
        data = b"".join(Descriptor(*d).pack() for d in descs)
        return self.alloc(len(data), data)

    # -- raw ring writers (hostile cases) ---------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int) -> None:
        """Write descriptor ``index`` of the table verbatim (``index`` may be anything < size)."""
        self.mem.write(self.desc_table + 16 * index, Descriptor(addr, length, flags, next).pack())

    def push_avail(self, head: int, publish: bool = True) -> None:
        """Put ``head`` in the next avail ring slot; with ``publish`` also bump avail.idx."""
        slot = self.avail_ring + 4 + 2 * (self.avail_idx % self.size)
        self.mem.write(slot, _U16.pack(head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        """Store the shadow avail index into avail.idx (after the ring entries, as §2.7.13 says)."""
        self.mem.write(self.avail_ring + 2, _U16.pack(self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        """Write avail.idx (mod 2**16) without touching the ring, e.g. to jump far ahead."""
        self.avail_idx = value & 0xFFFF
        self.publish()

    @property
    def avail_flags(self) -> int:
        value: int = _U16.unpack(self.mem.read(self.avail_ring, 2))[0]
        return value

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self.mem.write(self.avail_ring, _U16.pack(value))

    @property
    def used_event(self) -> int:
        """The avail ring's trailing le16: interrupt me once used.idx passes this (§2.7.10)."""
        value: int = _U16.unpack(self.mem.read(self.avail_ring + 4 + 2 * self.size, 2))[0]
        return value

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.mem.write(self.avail_ring + 4 + 2 * self.size, _U16.pack(value & 0xFFFF))

    # -- reading what the device wrote ------------------------------------------------------

    @property
    def used_flags(self) -> int:
        value: int = _U16.unpack(self.mem.read(self.used_ring, 2))[0]
        return value

    @property
    def used_idx(self) -> int:
        value: int = _U16.unpack(self.mem.read(self.used_ring + 2, 2))[0]
        return value

    @property
    def avail_event(self) -> int:
        """The used ring's trailing le16: the device wants a kick once avail.idx passes this."""
        slot = self.used_ring + 4 + 8 * self.size
        value: int = _U16.unpack(self.mem.read(slot, 2))[0]
        return value

    def used_entries(self) -> list[UsedElem]:
        """The used elements published since the last call; their descriptors become free."""
        entries = []
        while self.last_used != self.used_idx:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            elem = UsedElem(*_USED_ELEM.unpack(self.mem.read(slot, 8)))
            entries.append(elem)
            offered = self._offered.pop(elem.id, None)
            if offered is not None:
                self._free.extend(offered.descriptors)
                self._returned[elem.id] = offered
            self.last_used = (self.last_used + 1) & 0xFFFF
        return entries

    def _record(self, head: int) -> _Offered:
        """The latest chain offered with this head, whether or not it was reaped yet."""
        record = self._offered.get(head) or self._returned.get(head)
        if record is None:
            raise KeyError(f"no chain with head {head} was offered through add_chain()")
        return record

    def readable(self, head: int) -> list[tuple[int, int]]:
        """The device-readable ``(addr, len)`` buffers of the chain offered at ``head``."""
        return list(self._record(head).readable)

    def writable(self, head: int) -> list[tuple[int, int]]:
        """The device-writable ``(addr, len)`` buffers of the chain offered at ``head``."""
        return list(self._record(head).writable)

    def written(self, head: int, length: int | None = None) -> bytes:
        """The first ``length`` bytes (default: all) of a chain's writable buffers, concatenated.

        Works before and after :meth:`used_entries`, until the head is reused.
        """
        data = b"".join(self.mem.read(a, n) for a, n in self._record(head).writable)
        return data if length is None else data[:length]
