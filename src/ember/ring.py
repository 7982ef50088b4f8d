"""Memory channels: the shared region's layout and the rings on it (both ends).

Guest programs and the host exchange bulk data through a region of guest-physical
memory that the VMM backs with a host memfd (``ember.vmm.shm``), the SDK maps
too, and guest processes map through ``/dev/mem`` (``ember.agent.shm``). Bytes
then cross at memory speed; only the slow, emulated guest kernel is avoided.
This module is shipped into the guest beside ``protocol.py``, so it imports
nothing but the standard library (and little of it: guest imports cost page faults).

Layout, version 1 (all words u64, little-endian, naturally aligned)::

    region offset 0           header page, written by the VMM before any vCPU runs:
                              magic "EMBERSHM", version, generation (random per VMM
                              start, restore or fork), slot_count, slot_size, doorbell_gpa,
                              then a clock pair: the guest's TSC, the host's CLOCK_REALTIME
                              (ns) at that TSC, the guest's TSC frequency (kHz); all three
                              zero when the VMM has none (another architecture, an older VMM)
    SLOT_BASE + i*slot_size   slot i: a control page, then slot_size - PAGE bytes of data

    control page of a slot (one single-producer/single-consumer ring, guest -> host):
      offset   0  head            bytes the producer has published (free-running)
      offset   8  producer_flags  PRODUCER_WAITING: the producer sleeps until the
                                  consumer frees space (then it is woken over vsock)
      offset  64  tail            bytes the consumer has consumed (free-running)
      offset  72  consumer_flags  CONSUMER_SLEEPING: ring the slot's doorbell
      offset 128  capacity        data bytes (written by the host when leasing)
      offset 136  lease           the host's token for this use of the slot

The last :data:`CODE_SLOTS` slots are not leased to channels: they carry ``run_code``
(``ember.agent.codering``). Slot ``slot_count - 2`` holds requests (host -> guest: the
host produces, the run_code worker consumes), slot ``slot_count - 1`` replies (guest ->
host). The worker, not the host, lays both rings out (capacity, lease) whenever it sees a
region it has not announced itself in; a code ring's capacity is the slot's data area or
less (a multiple of 8, at least :data:`CODE_MIN_CAPACITY`: a worker that maps only part of
its slots), and the host reads it once, at that layout. Then the worker stores, in the
request slot's control page::

      offset 192  code_ready      non-zero: a worker serves these rings (stored last)
      offset 256  code_epoch      written by the agent: how many workers have died
      offset 384  code_not_yet    written by the host: a request that is not a
                                  ``run_code`` is on its way, so the worker stops its poll
                                  (after a restore or a call; it competes with the agent
                                  for the vCPU) and clears the word
      offset 512  code_generation the header's generation the worker laid the rings out
                                  for (stored before code_ready): a worker snapshotted
                                  while laying them out finishes that layout in the
                                  restored copy's region, and lays them out again for its
                                  generation next; the host attaches only to a layout for
                                  its region's generation (0: a worker from before this word)
      offset 576  code_cells      written by the worker, read by the agent (the host ignores
                                  it): ring requests it began plus those it finished, so
                                  odd while one runs. The agent sees no other sign of them,
                                  and holds its pool's refills off while they come

Head and tail sit on separate cache lines, so producer and consumer never write
the same line. A record is an 8-byte header (``length | kind << 32``) and its
payload, padded to 8 bytes; records never wrap: when one would pass the end of the
data area, the producer writes a ``RECORD_PAD`` header there and starts again at 0.

Ordering (x86-TSO, which both ends run on): stores are not reordered with other
stores, nor loads with loads. So the producer writes a record, then stores head;
the consumer loads head, then reads the record (and consumes it, then stores
tail). The one reordering x86 allows, a store passing a later load, matters for
sleeping: "I sleep" must be visible before re-checking the other side's index,
so both ends put :func:`fence` (a locked instruction) between the two.

The host trusts nothing here: every head, length and kind is checked by
:class:`RingReader` against the capacity *it* chose, never the guest's copy, a
message assembled from fragments is bounded, and a violation fails that ring.
"""

from __future__ import annotations

import _thread
from time import monotonic as _monotonic

TYPE_CHECKING = False  # typing would drag `re` into every guest program that sends
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, Protocol

    class Doorbell(Protocol):
        """A u32 doorbell in guest memory, or anything that rings when a word is stored."""

        def __setitem__(self, index: int, value: int, /) -> None: ...


MAGIC = int.from_bytes(b"EMBERSHM", "little")
VERSION = 1
PAGE = 4096
SLOT_BASE = PAGE

# Header words (index into the region's first page viewed as u64).
H_MAGIC, H_VERSION, H_GENERATION, H_SLOT_COUNT, H_SLOT_SIZE, H_DOORBELL = range(6)
H_TSC, H_TSC_REALTIME, H_TSC_KHZ = range(6, 9)  # the clock pair (ember.agent.tscclock)

# Control words (index into a slot's control page viewed as u64).
HEAD = 0
PRODUCER_FLAGS = 1
TAIL = 8
CONSUMER_FLAGS = 9
CAPACITY = 16
LEASE = 17

CODE_READY = 24  # request slot only (see the module docstring)
CODE_EPOCH = 32
CODE_NOT_YET = 48
CODE_BELL = 56  # nonzero: a sleeping worker also wakes on the guest bell (ember.vmm.shm)
CODE_GENERATION = 64  # the region generation the rings were laid out for (see above)
CODE_CELLS = 72  # ring requests begun + finished by the worker (see above)
CODE_SLOTS = 2
CODE_MIN_CAPACITY = 4096  # a code ring the worker lays out smaller than its slot: at least this

PRODUCER_WAITING = 1
CONSUMER_SLEEPING = 1

RECORD_HEADER = 8
RECORD_DATA = 1  # a whole message, or the last fragment of one
RECORD_MORE = 2  # a fragment: the message continues in the next record
RECORD_PAD = 3  # nothing more before the end of the data area: continue at 0

# Default geometry (the VMM's; readers take it from the header they validate).
SLOT_COUNT = 8
SLOT_SIZE = 8 << 20
DOORBELL_STRIDE = 4  # slot i's doorbell is the u32 at doorbell_gpa + 4 * i
SPIN_S = 0.002  # a producer with no room spins this long before it sleeps (user time only)

_fence_lock = _thread.allocate_lock()


def fence() -> None:
    """A full memory barrier: taking and dropping an uncontended lock is two locked
    instructions (glibc's semaphore fast path), no system call."""
    _fence_lock.acquire()
    _fence_lock.release()


def region_size(slot_count: int = SLOT_COUNT, slot_size: int = SLOT_SIZE) -> int:
    return SLOT_BASE + slot_count * slot_size


def code_slots(slot_count: int) -> tuple[int, int]:
    """The request and reply slots of ``run_code`` in a region of ``slot_count`` slots."""
    return slot_count - 2, slot_count - 1


def lay_out(ctl: memoryview, capacity: int, lease: int) -> None:
    """Make a slot an empty ring of ``capacity`` bytes for ``lease`` (lease stored last)."""
    ctl[HEAD] = ctl[TAIL] = ctl[PRODUCER_FLAGS] = ctl[CONSUMER_FLAGS] = 0
    ctl[CAPACITY] = capacity
    ctl[LEASE] = lease


def align8(n: int) -> int:
    return (n + 7) & ~7


class RingError(Exception):
    """The other end broke the ring's rules; the ring cannot be used any more."""


class RingWriter:
    """The producer end (guest). ``ctl`` is the slot's control page as u64 words,
    ``data`` its data area; ``doorbell`` the slot's u32 doorbell (or None), and
    ``wait`` blocks briefly until the consumer may have freed space. Sending after
    the host took the slot back (its lease word changed) raises BrokenPipeError."""

    def __init__(
        self,
        ctl: memoryview,
        data: memoryview,
        doorbell: Doorbell | None,
        wait: Callable[[], None],
    ) -> None:
        self._ctl = ctl
        self._data = data
        self._cap = len(data)
        self._doorbell = doorbell
        self._wait = wait
        self._head = ctl[HEAD]
        self._lease = ctl[LEASE]
        self.max_record = max(8, (self._cap // 4) & ~7)

    def send(self, payload: memoryview) -> None:
        """Publish one message, cut into fragments of at most ``max_record`` bytes."""
        total = payload.nbytes
        start = 0
        while True:
            piece = payload[start : start + self.max_record]
            start += piece.nbytes
            self._put(piece, RECORD_DATA if start >= total else RECORD_MORE)
            if start >= total:
                return

    def fill(self, readinto: Callable[[memoryview], int], limit: int) -> int:
        """Publish one record of up to ``limit`` bytes that ``readinto`` writes straight
        into the ring (a file's ``readinto``: no copy through a buffer of our own, so no
        fresh pages); returns its length. 0 publishes nothing (the source's end)."""
        limit = min(limit, self.max_record)
        pos = self._claim(RECORD_HEADER + align8(limit))
        n = readinto(self._data[pos + RECORD_HEADER : pos + RECORD_HEADER + limit])
        if not 0 <= n <= limit:
            raise ValueError(f"readinto said {n} bytes of at most {limit}")
        if n:
            self._publish(pos, n, RECORD_DATA)
        return n

    def _put(self, piece: memoryview, kind: int) -> None:
        pos = self._claim(RECORD_HEADER + align8(piece.nbytes))
        self._data[pos + RECORD_HEADER : pos + RECORD_HEADER + piece.nbytes] = piece
        self._publish(pos, piece.nbytes, kind)

    def _claim(self, size: int) -> int:
        """Room for a record of ``size`` bytes (a pad record first if it would pass the
        end); returns the record's offset. Nothing is published yet."""
        if self._ctl[LEASE] != self._lease:
            raise BrokenPipeError("the host ended this channel")
        pos = self._head % self._cap
        pad = self._cap - pos if pos + size > self._cap else 0
        self._reserve(size + pad)
        if pad:
            self._write_header(pos, 0, RECORD_PAD)
            self._head += pad  # published with the record that follows it
            pos = 0
        return pos

    def _publish(self, pos: int, length: int, kind: int) -> None:
        self._write_header(pos, length, kind)
        self._head += RECORD_HEADER + align8(length)
        self._ctl[HEAD] = self._head  # after the record: stores stay in order
        fence()
        if self._ctl[CONSUMER_FLAGS] & CONSUMER_SLEEPING and self._doorbell is not None:
            self._doorbell[0] = 1

    def _write_header(self, pos: int, length: int, kind: int) -> None:
        self._data[pos : pos + RECORD_HEADER] = (length | kind << 32).to_bytes(8, "little")

    def _reserve(self, size: int) -> None:
        deadline = 0.0
        while self._cap - (self._head - self._ctl[TAIL]) < size:
            now = _monotonic()
            if not deadline:
                deadline = now + SPIN_S
            if now < deadline:
                continue  # the consumer frees room record by record: worth a short spin
            deadline = 0.0
            self._ctl[PRODUCER_FLAGS] = PRODUCER_WAITING
            fence()
            if self._cap - (self._head - self._ctl[TAIL]) < size:
                if self._doorbell is not None and self._ctl[CONSUMER_FLAGS] & CONSUMER_SLEEPING:
                    self._doorbell[0] = 1
                self._wait()
            self._ctl[PRODUCER_FLAGS] = 0
            if self._ctl[LEASE] != self._lease:
                raise BrokenPipeError("the host ended this channel")


class RingReader:
    """The consumer end (host), safe against a hostile producer.

    ``capacity`` is the reader's own (the guest's copy is never read back); ``data``
    must be exactly that long. :meth:`read` returns complete messages; any broken
    rule raises :class:`RingError` and the ring is dead from then on.
    """

    def __init__(self, ctl: memoryview, data: memoryview, capacity: int, max_message: int) -> None:
        if len(data) != capacity or capacity % 8 or capacity < 64:
            raise ValueError("bad ring geometry")
        self._ctl = ctl
        self._data = data
        self._cap = capacity
        self._max_message = max_message
        self._tail = 0
        self._partial: list[bytes] = []
        self._partial_size = 0
        self.dead: str | None = None

    def reset(self, lease: int) -> None:
        """Make the slot a fresh, empty ring for a new lease (before the guest learns it)."""
        lay_out(self._ctl, self._cap, lease)
        self._tail = 0

    def attach(self) -> None:
        """Take over a ring the producer laid out: consume from its current tail on."""
        tail = self._ctl[TAIL]
        if tail % 8:
            self._fail(f"tail {tail} is not aligned")
        self._tail = tail
        self.available()  # the head must be within a ring of it

    def available(self) -> int:
        """Bytes published and not consumed; RingError if the head is impossible."""
        head = self._ctl[HEAD]
        used = head - self._tail
        if used < 0 or used > self._cap or head % 8:
            self._fail(f"head {head} is not within {self._cap} bytes past tail {self._tail}")
        return used

    def read(self, max_bytes: int | None = None) -> list[bytes]:
        """Consume what is published (at most one ring's worth per call); complete messages."""
        self._check()
        used = self.available()
        budget = min(used, self._cap if max_bytes is None else max_bytes)
        done: list[bytes] = []
        consumed = 0
        while consumed < budget:
            pos = self._tail % self._cap
            size, length, kind = self._record(pos, used - consumed)
            if kind != RECORD_PAD:
                if self._partial_size + length > self._max_message:
                    self._fail(f"a message over {self._max_message} bytes")
                payload = bytes(self._data[pos + RECORD_HEADER : pos + RECORD_HEADER + length])
                if kind == RECORD_MORE:
                    self._partial.append(payload)
                    self._partial_size += length
                else:
                    if self._partial:
                        self._partial.append(payload)
                        payload = b"".join(self._partial)
                        self._partial.clear()
                        self._partial_size = 0
                    done.append(payload)
            consumed += size
            self._tail += size
            self._ctl[TAIL] = self._tail  # room for the producer at once, record by record
        return done

    def take(self, use: Callable[[memoryview], bool]) -> int:
        """Hand each published record's payload to ``use`` in place (no copy), consuming
        it once ``use`` returns; stop after a record for which it returns False.

        Fragments are not joined (a byte stream, such as a file, needs no message
        boundaries), and the views are valid only inside ``use``. Returns the bytes
        consumed; RingError, as :meth:`read`, for anything a producer may not do.
        """
        self._check()
        used = self.available()
        consumed = 0
        while consumed < used:
            pos = self._tail % self._cap
            size, length, kind = self._record(pos, used - consumed)
            more = True
            if kind != RECORD_PAD:
                view = self._data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
                try:
                    more = use(view)
                finally:
                    view.release()
            consumed += size
            self._tail += size
            self._ctl[TAIL] = self._tail
            if not more:
                break
        return consumed

    def _record(self, pos: int, published: int) -> tuple[int, int, int]:
        """The record at ``pos``: its size in the ring, payload length and kind, checked
        against the ring's end and the ``published`` bytes left before the head."""
        header = int.from_bytes(self._data[pos : pos + RECORD_HEADER], "little")
        length, kind = header & 0xFFFF_FFFF, header >> 32
        if kind == RECORD_PAD:
            size = self._cap - pos
        elif kind in (RECORD_DATA, RECORD_MORE):
            size = RECORD_HEADER + align8(length)
            if pos + size > self._cap:
                self._fail(f"a {length}-byte record at {pos} passes the ring's end")
        else:
            self._fail(f"unknown record kind {kind} at {pos}")
        if size > published:
            self._fail(f"a {size}-byte record at {pos} passes the head")
        return size, length, kind

    @property
    def mid_message(self) -> bool:
        return bool(self._partial)

    def producer_waiting(self) -> bool:
        fence()
        return bool(self._ctl[PRODUCER_FLAGS] & PRODUCER_WAITING)

    def sleep(self, sleeping: bool) -> None:
        """Say whether the producer must ring the doorbell (fenced before the re-check)."""
        self._ctl[CONSUMER_FLAGS] = CONSUMER_SLEEPING if sleeping else 0
        if sleeping:
            fence()

    def _check(self) -> None:
        if self.dead is not None:
            raise RingError(self.dead)

    def _fail(self, why: str) -> NoReturn:
        self.dead = why
        raise RingError(why)
