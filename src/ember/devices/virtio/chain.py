"""Descriptors and descriptor chains of a split virtqueue (virtio 1.2 §2.7.5).

A chain is read from guest memory exactly once: every descriptor is unpacked
into local values and the result is a plain :class:`DescriptorChain`, so a
guest rewriting its descriptor table while the device works on a request
cannot change what was validated (no time-of-check/time-of-use gap).

Every field the guest wrote is hostile until checked:

* each buffer must lie inside one guest RAM region (:meth:`GuestMemory.contains`);
* a ``next`` index must be below the table's size, and a walk longer than the
  table must contain a loop, so it stops there instead of spinning forever;
* an indirect table (§2.7.5.3) must be a whole number of descriptors, hold at
  most ``size`` of them, sit inside guest RAM, not be nested, and not be
  combined with ``VIRTQ_DESC_F_NEXT``;
* device-readable buffers must all come before device-writable ones (§2.7.4.2);
* the total length must fit the 32-bit ``len`` of ``struct virtq_used_elem``.

Any violation raises :class:`QueueError` naming the head, so the device can
complete that request with a zero length and carry on with the next one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ember.errors import EmberError
from ember.memory import GuestMemory, GuestMemoryError

# struct virtq_desc flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1  # the buffer continues via the next field
VIRTQ_DESC_F_WRITE = 2  # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer holds a table of struct virtq_desc (§2.7.5.3)

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
VIRTQ_DESC = struct.Struct("<QIHH")
VIRTQ_DESC_SIZE = VIRTQ_DESC.size  # 16

MAX_CHAIN_BYTES = 0xFFFF_FFFF  # struct virtq_used_elem.len is le32


class QueueError(EmberError):
    """A guest-caused problem with a descriptor chain or a ring.

    ``head`` is the head descriptor index of the offending chain when there is
    one to hand back: the device should then ``add_used(head, 0)`` so the driver
    gets its descriptors back, and go on popping.  ``head`` is ``None`` when
    nothing can be returned: the ring itself is unusable (see ``Queue.broken``)
    or the avail entry named a head outside the descriptor table.
    """

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message)
        self.head = head


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One ``struct virtq_desc`` (§2.7.5), as the driver laid it out."""

    addr: int
    len: int
    flags: int
    next: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)

    def pack(self) -> bytes:
        return VIRTQ_DESC.pack(self.addr, self.len, self.flags, self.next)

    @classmethod
    def unpack_from(cls, buffer: bytes | memoryview, offset: int = 0) -> Descriptor:
        return cls(*VIRTQ_DESC.unpack_from(buffer, offset))


@dataclass
class DescriptorChain:
    """A validated request: where to read it from and where to write the reply.

    Buffers are ``(guest address, length)`` pairs in chain order, already
    checked to lie inside guest RAM; the device reads and writes them with
    :class:`GuestMemory` and finally calls ``Queue.add_used(head, written)``.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    def total_readable(self) -> int:
        return sum(length for _, length in self.readable)

    def total_writable(self) -> int:
        return sum(length for _, length in self.writable)


class _Walk:
    """The running state of one chain walk, shared by the direct and indirect parts."""

    __slots__ = ("chain", "mem", "total")

    def __init__(self, mem: GuestMemory, head: int) -> None:
        self.mem = mem
        self.chain = DescriptorChain(head)
        self.total = 0

    def fail(self, why: str) -> QueueError:
        return QueueError(f"descriptor chain at head {self.chain.head}: {why}", self.chain.head)

    def add(self, addr: int, length: int, flags: int) -> None:
        """Check one buffer descriptor and append it to the readable or writable list."""
        if not self.mem.contains(addr, length):
            raise self.fail(f"buffer {addr:#x}+{length:#x} is outside guest RAM")
        self.total += length
        if self.total > MAX_CHAIN_BYTES:
            raise self.fail("total length exceeds 4 GiB - 1")
        if flags & VIRTQ_DESC_F_WRITE:
            self.chain.writable.append((addr, length))
        elif self.chain.writable:
            raise self.fail("a device-readable buffer follows a device-writable one")
        else:
            self.chain.readable.append((addr, length))


def read_chain(mem: GuestMemory, desc_table: int, size: int, head: int) -> DescriptorChain:
    """Walk and validate the chain starting at ``head`` (already known to be < ``size``).

    Raises :class:`QueueError` (with ``head``) on any malformed descriptor;
    :class:`GuestMemoryError` never escapes.  The walk is bounded by ``size``
    steps in the descriptor table plus ``size`` in one indirect table, so a
    hostile chain costs at most that much work.
    """
    walk = _Walk(mem, head)
    unpack = VIRTQ_DESC.unpack
    index = head
    try:
        for _ in range(size):
            addr, length, flags, nxt = unpack(mem.read(desc_table + index * VIRTQ_DESC_SIZE, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if flags & VIRTQ_DESC_F_NEXT:
                    raise walk.fail("VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT")
                _read_indirect(walk, addr, length, size)
                return walk.chain
            walk.add(addr, length, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                return walk.chain
            if nxt >= size:
                raise walk.fail(f"next index {nxt} is outside a table of {size}")
            index = nxt
    except GuestMemoryError as exc:
        raise walk.fail(f"descriptor table is unreadable ({exc})") from None
    raise walk.fail(f"longer than the queue size {size} (a loop?)")


def _read_indirect(walk: _Walk, addr: int, length: int, size: int) -> None:
    """Append the buffers of an indirect table; its own WRITE flag is ignored (§2.7.5.3.2)."""
    if length == 0 or length % VIRTQ_DESC_SIZE:
        raise walk.fail(f"indirect table length {length} is not a positive multiple of 16")
    count = length // VIRTQ_DESC_SIZE
    if count > size:
        raise walk.fail(f"indirect table of {count} descriptors exceeds the queue size {size}")
    try:
        # One copy: the table cannot change under us while it is walked.
        table = walk.mem.read(addr, length)
    except GuestMemoryError:
        raise walk.fail(f"indirect table {addr:#x}+{length:#x} is outside guest RAM") from None
    unpack_from = VIRTQ_DESC.unpack_from
    index = 0
    for _ in range(count):
        buf_addr, buf_len, flags, nxt = unpack_from(table, index * VIRTQ_DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            raise walk.fail("nested indirect table")
        walk.add(buf_addr, buf_len, flags)
        if not flags & VIRTQ_DESC_F_NEXT:
            return
        if nxt >= count:
            raise walk.fail(f"indirect next index {nxt} is outside a table of {count}")
        index = nxt
    raise walk.fail(f"indirect chain longer than its table of {count} (a loop?)")
