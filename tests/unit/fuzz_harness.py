"""A hostile virtio driver that plays fuzz programs against every device through virtio-mmio.

Shared by ``tests/unit/test_device_fuzz.py`` (a short, derandomized run in CI) and
``bench/fuzz.py`` (a long one).  A program (:class:`~tests.unit.fuzz_ops.Program`, written
by :mod:`tests.unit.fuzz_strategies`) is a list of ops: register accesses (whole boot
sequences, right or wrong, and single reads and writes), descriptor chains written into
real split rings in guest memory (well formed, or aliasing, looping, nesting indirect
tables, lying about lengths, with heads outside the table), scribbles over the rings and
their indices, kicks, resets with requests in flight, snapshots restored into a fresh
device, and the device's host side (frames on the TAP stand-in, vsock clients and
services, balloon targets).  :func:`run_program` plays one against a fresh device
(:mod:`tests.unit.fuzz_rigs`) and checks, after every op:

- nothing raises: what the guest does is absorbed or fails the device (``fail()``), and a
  device whose ring broke has been failed, not left silently stopped;
- the op's work is bounded: chains taken off rings, bytes of guest memory read, written
  or mapped, and madvise calls stay within what the chains it consumed can justify,
  never in proportion to the lengths the guest claims;
- host memory is bounded: tracemalloc's peak during the op, and what stays allocated;
- a failed device stays quiet: until a reset, it touches no guest memory;
- the event loop goes idle: no fd stays ready that the device cannot act on;
- once the device is closed, no fd is left open.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ember.devices.virtio.chain import VIRTQ_DESC
from ember.devices.virtio.mmio import (
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    MmioTransport,
)
from ember.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from ember.memory import GuestMemory, GuestMemoryError, Region
from tests.fds import open_fds
from tests.unit.fuzz_ops import (
    AVAIL_OFFSET,
    DATA_START,
    DISK_SECTORS,
    HIGH_BASE,
    HIGH_SIZE,
    LOW_SIZE,
    MAX_ALLOC,
    MEMORY,
    RING_SLOT,
    U32,
    U64,
    USED_OFFSET,
    AvailIdx,
    Boot,
    Chain,
    Kick,
    Op,
    Program,
    QueueSetup,
    RegRead,
    RegWrite,
    Reset,
    Scribble,
    Seg,
    Snapshot,
    good_boot,
)
from tests.unit.fuzz_rigs import RIGS, CountingMemory, Rig, Work, pattern

# -- bounds, per op (a register access, a kick, one host-side event, a reset, a restore) ------

#: Guest-memory bytes one chain may justify: reading its descriptors (at most 2 x 256 of
#: them, and one indirect table copied whole) and what the device moves for one request.
DESC_BYTES = 3 * 256 * 16
PAYLOAD_BYTES = {
    "blk": DISK_SECTORS * 512 + 1024,  # a whole-disk transfer, a discard list, the id, status
    "net": 65550,  # one packet in (tx) or out (rx), vnet header included
    "vsock": 2 * 65536 + 44,  # a header, a 64 KiB payload sent straight or read into tx_buf
    "balloon": 4096 + 320,  # a page of PFNs, or the stats the device reads
}
RING_BYTES = 64 << 10  # ring indices, flags and event fields an op may read or write
MAX_DISCARDS_PER_CHAIN = 1024  # one madvise per PFN run, or per reported range
MAX_OP_PEAK = 8 << 20  # tracemalloc: what one op may allocate at its peak
MAX_HELD = 8 << 20  # tracemalloc: what may stay allocated since the device was made


def max_pops(queue_sizes: tuple[int, ...]) -> int:
    """Chains one op may take off the rings: each consumed chain needs an avail entry, a
    ring offers at most its size before the device calls it broken, and one op (a kick,
    host events served until the loop is idle, a restore looking at every ring) may go
    over the rings twice (net puts back chains a frame did not fit, then takes them again)."""
    return 2 * sum(queue_sizes) + 64


class FuzzFailure(AssertionError):
    """A property the fuzz checks did not hold (the message says which, after which op)."""


# -- the driver's side of the rings -----------------------------------------------------------


def pack_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return VIRTQ_DESC.pack(addr & U64, length & U32, flags & 0xFFFF, nxt & 0xFFFF)


@dataclass
class DriverQueue:
    """What the driver believes about one queue (its registers may have been refused)."""

    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    cursor: int = 0

    @property
    def slots(self) -> int:
        """Ring slots for index arithmetic: a nonsense size still indexes somewhere."""
        return max(1, min(self.size, 1 << 16))


@dataclass
class Driver:
    mem: GuestMemory  # uncounted: the driver's own accesses are not the device's work
    queues: dict[int, DriverQueue] = field(default_factory=dict)
    next_low: int = DATA_START
    next_high: int = HIGH_BASE

    def poke(self, addr: int, data: bytes) -> None:
        """A driver store; one outside RAM is simply lost (the device sees what it sees)."""
        try:
            self.mem.write(addr, data)
        except GuestMemoryError:
            pass

    def alloc(self, length: int, high: bool = False) -> int:
        n = (min(max(length, 1), MAX_ALLOC) + 15) // 16 * 16
        if high:
            if self.next_high + n > HIGH_BASE + HIGH_SIZE:
                self.next_high = HIGH_BASE
            addr, self.next_high = self.next_high, self.next_high + n
        else:
            if self.next_low + n > LOW_SIZE:
                self.next_low = DATA_START
            addr, self.next_low = self.next_low, self.next_low + n
        return addr

    def place(self, seg: Seg) -> int:
        if isinstance(seg.addr, int):
            addr = seg.addr
        else:
            addr = self.alloc(seg.length, high=seg.addr == "high")
        if not seg.write:
            data = seg.data if seg.data is not None else pattern(seg.length)
            self.poke(addr, data[:MAX_ALLOC])
        return addr


def good_rings(index: int) -> tuple[int, int, int]:
    desc = RING_SLOT * (index % 4 + 1)
    return desc, desc + AVAIL_OFFSET, desc + USED_OFFSET


def write_chain(driver: Driver, op: Chain) -> None:
    """Lay ``op`` out in the descriptor table (or an indirect table) and publish its head.

    Mutations: "alias" (every buffer at the first one's address), "len_lie" (one length
    grows by ``arg``, or to 4 GiB - 1), "loop" / "next_oob" (the last descriptor goes on,
    back into the chain or past the table), "head_oob" (the avail entry names a head past
    the table), "no_publish" (the entry is written, avail.idx not moved), "indirect" (the
    buffers in an indirect table), "indirect_loop", "indirect_badlen" (a table length that
    is not whole descriptors, 0, or longer than the ring), "indirect_next" (INDIRECT with
    NEXT), "nested" (an indirect descriptor inside the table).
    """
    dq = driver.queues.get(op.queue)
    if dq is None:
        return
    m, arg, size = op.mutation, op.arg, dq.slots
    placed = [(driver.place(seg), seg) for seg in op.segs] * max(1, op.repeat)
    descs = [
        [addr, seg.length & U32, VIRTQ_DESC_F_WRITE if seg.write else 0, 0] for addr, seg in placed
    ]
    if m == "alias" and descs:
        for d in descs:
            d[0] = descs[0][0]
    if m == "len_lie" and descs:
        descs[arg % len(descs)][1] = (descs[arg % len(descs)][1] + (arg or U32)) & U32
    head = dq.cursor % size
    if m.startswith("indirect") or m == "nested":
        for i, d in enumerate(descs[:-1]):
            d[2] |= VIRTQ_DESC_F_NEXT
            d[3] = i + 1
        if m == "indirect_loop" and descs:
            descs[-1][2] |= VIRTQ_DESC_F_NEXT
            descs[-1][3] = arg % len(descs)
        if m == "nested" and descs:
            inner = driver.alloc(16)
            driver.poke(inner, pack_desc(*descs[0]))
            descs[arg % len(descs)][:3] = [inner, 16, VIRTQ_DESC_F_INDIRECT]
        table = b"".join(pack_desc(*d) for d in descs)
        where = driver.alloc(len(table))
        driver.poke(where, table)
        length = len(table)
        if m == "indirect_badlen":
            length = (length + 8, 0, 16 * (size + 1), U32 & ~15)[arg % 4]
        flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_NEXT if m == "indirect_next" else 0)
        driver.poke(dq.desc + 16 * head, pack_desc(where, length, flags, (head + 1) % size))
        dq.cursor += 1
    else:
        indices = [(dq.cursor + i) % size for i in range(len(descs))]
        dq.cursor += len(descs)
        for i, d in enumerate(descs[:-1]):
            d[2] |= VIRTQ_DESC_F_NEXT
            d[3] = indices[i + 1]
        if descs and m in ("loop", "next_oob"):
            descs[-1][2] |= VIRTQ_DESC_F_NEXT
            descs[-1][3] = indices[arg % len(indices)] if m == "loop" else dq.size + arg
        for index, d in zip(indices, descs, strict=True):
            driver.poke(dq.desc + 16 * index, pack_desc(*d))
    if m == "head_oob":
        head = dq.size + arg
    driver.poke(dq.avail + 4 + 2 * (dq.avail_idx % size), struct.pack("<H", head & 0xFFFF))
    if m != "no_publish":
        dq.avail_idx = (dq.avail_idx + 1) & 0xFFFF
        driver.poke(dq.avail + 2, struct.pack("<H", dq.avail_idx))


# -- registers ------------------------------------------------------------------------------------

ACK, DRIVER, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 0x80


def _reg(transport: MmioTransport, offset: int, value: int) -> None:
    transport.write(offset, struct.pack("<I", value & U32))


def _read_reg(transport: MmioTransport, offset: int) -> int:
    value: int = struct.unpack("<I", transport.read(offset, 4))[0]
    return value


def _setup_queue(transport: MmioTransport, driver: Driver, qs: QueueSetup) -> None:
    _reg(transport, VIRTIO_MMIO_QUEUE_SEL, qs.index)
    _read_reg(transport, VIRTIO_MMIO_QUEUE_NUM_MAX)
    _reg(transport, VIRTIO_MMIO_QUEUE_NUM, qs.size)
    desc, avail, used = good_rings(qs.index)
    if qs.layout == "overlap":
        desc, avail, used = (
            (desc, desc, desc),
            (desc, avail, avail),
            (desc, desc + 2, used),
            (desc, avail, used + RING_SLOT),  # the next queue's used ring
            (desc, used, avail),
        )[qs.desc % 5]
    elif qs.layout == "raw":
        desc, avail, used = qs.desc, qs.avail, qs.used
    else:  # fresh, zeroed rings, as a driver allocates them
        slots = max(1, min(qs.size, 256))
        driver.poke(desc, bytes(16 * slots))
        driver.poke(avail, bytes(6 + 2 * slots))
        driver.poke(used, bytes(6 + 8 * slots))
    for low, high, addr in (
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used),
    ):
        _reg(transport, low, addr)
        _reg(transport, high, addr >> 32)
    _reg(transport, VIRTIO_MMIO_QUEUE_READY, int(qs.ready))
    driver.queues[qs.index] = DriverQueue(qs.size, desc, avail, used)


def boot(transport: MmioTransport, driver: Driver, op: Boot) -> None:
    """§3.1.1 step by step, with one flaw: a step skipped, repeated late or out of order."""
    _reg(transport, VIRTIO_MMIO_STATUS, 0)
    _reg(transport, VIRTIO_MMIO_STATUS, ACK)
    _reg(transport, VIRTIO_MMIO_STATUS, ACK | DRIVER)
    offered = 0
    for sel in (0, 1):
        _reg(transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
        offered |= _read_reg(transport, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
    features = offered & op.feature_mask
    features = features | 1 << 32 if op.version_1 else features & ~(1 << 32)
    for sel in (0, 1):
        _reg(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        _reg(transport, VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel))
    status = ACK | DRIVER
    if op.flaw != "no_features_ok":
        _reg(transport, VIRTIO_MMIO_STATUS, status | FEATURES_OK)
        status = _read_reg(transport, VIRTIO_MMIO_STATUS) & (ACK | DRIVER | FEATURES_OK)
    driver.queues.clear()
    if op.flaw == "driver_ok_first":
        _reg(transport, VIRTIO_MMIO_STATUS, status | DRIVER_OK)
    for qs in op.queues:
        _setup_queue(transport, driver, qs)
    if op.flaw == "features_late":
        _reg(transport, VIRTIO_MMIO_DRIVER_FEATURES, U32)
    if op.flaw != "no_driver_ok":
        failed = FAILED if op.flaw == "failed" else 0
        _reg(transport, VIRTIO_MMIO_STATUS, status | DRIVER_OK | failed)
    if op.flaw == "late_queue" and op.queues:
        _reg(transport, VIRTIO_MMIO_QUEUE_SEL, op.queues[0].index)
        _reg(transport, VIRTIO_MMIO_QUEUE_READY, 0)
        _setup_queue(transport, driver, op.queues[0])


# -- playing a program --------------------------------------------------------------------------


def play(rig: Rig, driver: Driver, op: Op) -> None:
    transport = rig.transport
    if isinstance(op, Boot):
        boot(transport, driver, op)
    elif isinstance(op, Chain):
        write_chain(driver, op)
        if op.kick:
            _reg(transport, VIRTIO_MMIO_QUEUE_NOTIFY, op.queue)
    elif isinstance(op, Kick):
        _reg(transport, VIRTIO_MMIO_QUEUE_NOTIFY, op.queue)
    elif isinstance(op, Reset):
        _reg(transport, VIRTIO_MMIO_STATUS, 0)
        if op.reboot:
            boot(transport, driver, good_boot(rig.kind))
    elif isinstance(op, RegWrite):
        width = op.width if op.width in (1, 2, 4, 8) else 4
        transport.write(op.offset, (op.value % (1 << (8 * width))).to_bytes(width, "little"))
    elif isinstance(op, RegRead):
        transport.read(op.offset, op.width)
    elif isinstance(op, AvailIdx):
        dq = driver.queues.get(op.queue)
        if dq is not None:
            dq.avail_idx = ((dq.avail_idx if op.mode == "bump" else 0) + op.value) & 0xFFFF
            driver.poke(dq.avail + 2, struct.pack("<H", dq.avail_idx))
            _reg(transport, VIRTIO_MMIO_QUEUE_NOTIFY, op.queue)
    elif isinstance(op, Scribble):
        dq = driver.queues.get(op.queue)
        bases = {} if dq is None else {
            "desc": dq.desc, "avail": dq.avail, "used": dq.used,
            "used_event": dq.avail + 4 + 2 * dq.slots,  # the event idx trailers (§2.7.10)
            "avail_event": dq.used + 4 + 8 * dq.slots,
        }  # fmt: skip
        driver.poke(bases.get(op.target, 0) + op.offset, op.data)
    elif isinstance(op, Snapshot):
        for index, next_used in rig.restore(op.shift).items():
            dq = driver.queues.get(index)
            if dq is not None and op.shift:  # the driver's indices move along with the device's
                dq.avail_idx = (dq.avail_idx + op.shift) & 0xFFFF
                driver.poke(dq.avail + 2, struct.pack("<H", dq.avail_idx))
                driver.poke(dq.used + 2, struct.pack("<H", next_used))
    else:
        rig.host(op.action, op.arg)


@dataclass
class RunResult:
    ops: int = 0
    work: Work = field(default_factory=Work)
    failed_device: bool = False  # the device ended up in DEVICE_NEEDS_RESET (allowed)
    worst_op: Work = field(default_factory=Work)  # the op that touched the most guest bytes
    device_stats: dict[str, int] = field(default_factory=dict)  # the device's own counters


def run_program(program: Program) -> RunResult:
    """Play ``program`` against a fresh device; raise :class:`FuzzFailure` if a check fails."""
    result = RunResult()
    gc.collect()  # an earlier test's garbage closing its fds mid-run is not this device's doing
    fds = open_fds()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        with _quiet_logs(), _tmpdir() as tmp:
            _run(program, Path(tmp), result)
    finally:
        if started:
            tracemalloc.stop()
    leaked = open_fds() - fds
    if leaked:
        raise FuzzFailure(f"fds {sorted(leaked)} left open after the device was closed")
    return result


def _run(program: Program, tmp: Path, result: RunResult) -> None:
    work = result.work
    regions = [
        Region(base, size, mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        for base, size in MEMORY
    ]
    mem = CountingMemory(regions, work)
    driver = Driver(GuestMemory(regions))
    rig = RIGS[program.device](program, tmp, mem)
    try:
        held_at_start = tracemalloc.get_traced_memory()[0]
        for index, op in enumerate(program.ops):
            before = work.copy()
            quiet = rig.device.needs_reset and not _may_revive(op)
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            try:
                play(rig, driver, op)
            except Exception as exc:
                raise FuzzFailure(f"op {index} {op!r} raised {exc!r}") from exc
            current, peak = tracemalloc.get_traced_memory()
            done = work.since(before)
            what = f"op {index} {op!r}"
            if quiet and done.accesses:
                raise FuzzFailure(f"{what}: a failed device touched guest memory {done}")
            _check_op(rig, done, peak - start, current - held_at_start, what)
            result.ops += 1
            if done.bytes > result.worst_op.bytes:
                result.worst_op = done
        result.failed_device = rig.device.needs_reset
        result.device_stats = rig.device_stats()
    finally:
        try:
            rig.close()
        finally:
            mem.close()


def _may_revive(op: Op) -> bool:
    """Whether ``op`` may bring a failed device back (a reset, a new boot, a restore)."""
    status = isinstance(op, RegWrite) and op.offset == VIRTIO_MMIO_STATUS
    return status or isinstance(op, Boot | Reset | Snapshot)


def _check_op(rig: Rig, done: Work, peak: int, held: int, what: str) -> None:
    bound = max_pops(rig.device.queue_max_sizes)
    if done.pops > bound:
        raise FuzzFailure(f"{what}: {done.pops} chains taken in one op (bound {bound})")
    per_chain = DESC_BYTES + PAYLOAD_BYTES[rig.kind]
    if done.bytes > done.pops * per_chain + RING_BYTES:
        raise FuzzFailure(f"{what}: {done.bytes} bytes of guest memory for {done.pops} chains")
    if done.discards > done.pops * MAX_DISCARDS_PER_CHAIN:
        raise FuzzFailure(f"{what}: {done.discards} madvise calls for {done.pops} chains")
    if peak > MAX_OP_PEAK:
        raise FuzzFailure(f"{what}: allocated {peak} bytes at its peak")
    if held > MAX_HELD:
        raise FuzzFailure(f"{what}: {held} bytes allocated and kept since the device was made")
    broken = [i for i, q in enumerate(rig.transport.queues) if q.broken]
    if broken and not rig.device.needs_reset:
        raise FuzzFailure(f"{what}: queues {broken} are broken but the device was not failed")
    why = rig.check()
    if why is not None:
        raise FuzzFailure(f"{what}: {why}")


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The devices log every bad chain; a fuzz run makes millions of them."""
    logger = logging.getLogger("ember")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tmpdir() -> tempfile.TemporaryDirectory[str]:
    shm = "/dev/shm"  # tmpfs: fdatasync and hole punching cost nothing there
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="ember-fuzz-", dir=where)
