"""Hypothesis strategies that write hostile driver programs (:mod:`tests.unit.fuzz_ops`).

Most of a program is plausible (a boot that mostly works, requests shaped like the
device's own, kicks after them, a host side that talks back), so that the device gets
deep enough to be hurt; then each piece goes wrong with some probability: a register
written in the wrong state, a queue at addresses outside RAM or on top of another ring, a
chain that aliases, loops, nests indirect tables or lies about a length, a field of a
request replaced by garbage, avail.idx far ahead, a reset while requests are in flight,
a snapshot whose ring indices are about to wrap.
"""

from __future__ import annotations

import itertools
import struct
from typing import TypeVar

from hypothesis import strategies as st

from ember.devices.virtio.balloon.device import (
    DEFLATE_QUEUE,
    INFLATE_QUEUE,
    REPORTING_QUEUE,
    STATS_QUEUE,
)
from ember.devices.virtio.block.device import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from ember.devices.virtio.mmio import (
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
)
from ember.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_HDR,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
)
from tests.unit.fuzz_ops import (
    DATA_START,
    DISK_SECTORS,
    GUEST_CID,
    GUEST_PORTS,
    HIGH_BASE,
    HIGH_SIZE,
    HOST_PORT,
    LISTEN_PORTS,
    LOW_SIZE,
    QUEUE_SIZES,
    U32,
    U64,
    AvailIdx,
    Boot,
    Chain,
    Host,
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
from tests.unit.fuzz_rigs import HOST_ACTIONS

T = TypeVar("T")
Segs = tuple[Seg, ...]


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, picked in proportion to its weight (``one_of`` flattens nested
    choices and weighs every leaf alike, which would drown the common cases)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(table))).flatmap(lambda i: table[i])


def usually(value: T, other: st.SearchStrategy[T], odds: int = 4) -> st.SearchStrategy[T]:
    return weighted((odds, st.just(value)), (1, other))


# -- numbers a hostile driver likes -------------------------------------------------------------

EDGE_ADDRS = (
    0, 1, 2, 0x1000, DATA_START, LOW_SIZE - 16, LOW_SIZE - 6, LOW_SIZE - 1, LOW_SIZE,
    0xC000_0000, HIGH_BASE - 8, HIGH_BASE, HIGH_BASE + HIGH_SIZE - 16, HIGH_BASE + HIGH_SIZE,
    U32, U64 - 15, U64,
)  # fmt: skip
EDGE_LENS = (0, 1, 2, 15, 16, 44, 511, 512, 4096, 65536, LOW_SIZE, 1 << 31, U32)

addrs = st.one_of(st.sampled_from(EDGE_ADDRS), st.integers(0, LOW_SIZE + 64), st.integers(0, U64))
u16s = st.one_of(st.sampled_from((0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)), st.integers(0, 0xFFFF))
u32s = st.one_of(st.sampled_from((0, 1, 0x8000_0000, U32 - 1, U32)), st.integers(0, U32))
mostly_true = usually(True, st.just(False), odds=7)


def lens(*typical: int) -> st.SearchStrategy[int]:
    return weighted((3, st.sampled_from(typical)), (1, st.sampled_from(EDGE_LENS)))


# -- register level -----------------------------------------------------------------------------


def queue_setups(device: str) -> st.SearchStrategy[QueueSetup]:
    count = len(QUEUE_SIZES[device])
    good_sizes = tuple(s for s in (1, 2, 4, 16, 256) if s <= QUEUE_SIZES[device][-1])
    return st.builds(
        QueueSetup,
        index=weighted((6, st.integers(0, count - 1)), (1, st.sampled_from((count, 7, U32)))),
        size=weighted(
            (3, st.sampled_from(good_sizes)),
            (1, st.sampled_from((0, 3, 255, 512, 1 << 15, 1 << 16, U32))),
        ),
        layout=st.sampled_from(("good", "good", "good", "good", "overlap", "raw")),
        desc=addrs,
        avail=addrs,
        used=addrs,
        ready=mostly_true,
    )


def boots(device: str) -> st.SearchStrategy[Boot]:
    count = len(QUEUE_SIZES[device])
    flaws = ("no_features_ok", "driver_ok_first", "features_late", "no_driver_ok", "failed")
    return st.builds(
        Boot,
        feature_mask=usually(U64, st.integers(0, U64), odds=3),
        version_1=mostly_true,
        queues=weighted(
            (2, st.just(good_boot(device).queues)),
            (1, st.lists(queue_setups(device), max_size=count + 1).map(tuple)),
            (2, st.tuples(*(queue_setups(device) for _ in range(count)))),
        ),
        flaw=usually("none", st.sampled_from((*flaws, "late_queue")), odds=6),
    )


REGISTERS = (
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG + 4,
)  # fmt: skip
offsets = st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x1000))
widths = st.sampled_from((4, 4, 4, 1, 2, 8))
reg_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(RegWrite, offset=offsets, value=st.one_of(u32s, st.integers(0, 8)), width=widths),
    st.builds(RegRead, offset=offsets, width=widths),
)


# -- chains -------------------------------------------------------------------------------------

MUTATIONS = (
    "alias", "len_lie", "loop", "next_oob", "head_oob", "no_publish", "indirect",
    "indirect_loop", "indirect_badlen", "indirect_next", "nested",
)  # fmt: skip
mutations = usually("none", st.sampled_from(MUTATIONS), odds=3)
where: st.SearchStrategy[int | str | None] = weighted(
    (16, st.none()), (2, st.just("high")), (1, addrs)
)
repeats = usually(1, st.sampled_from((2, 255, 256, 257, 600)), odds=12)


def chains(queue: st.SearchStrategy[int], segs: st.SearchStrategy[Segs]) -> st.SearchStrategy[Op]:
    return st.builds(
        Chain,
        queue=queue,
        segs=segs,
        mutation=mutations,
        arg=st.one_of(st.integers(0, 8), u16s),
        kick=mostly_true,
        repeat=repeats,
    )


def buffers(write: bool, *typical: int) -> st.SearchStrategy[Segs]:
    one = st.builds(Seg, length=lens(*typical), write=st.just(write), addr=where)
    return st.lists(one, min_size=1, max_size=3).map(tuple)


def random_segs() -> st.SearchStrategy[Segs]:
    """Buffers in any order and number, the device's format ignored."""
    one = st.builds(Seg, length=lens(64, 4096), write=st.booleans(), addr=where)
    return st.lists(one, max_size=6).map(tuple)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets, empty pieces dropped."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def corrupt(data: bytes, position: int, garbage: bytes) -> bytes:
    """``data`` with ``garbage`` written over it at ``position`` (modulo its length)."""
    at = position % max(1, len(data))
    return (data[:at] + garbage + data[at + len(garbage) :])[: len(data)]


corruption = usually(None, st.tuples(st.integers(0, 64), st.binary(min_size=1, max_size=8)), 5)

BLK_TYPES = (
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
)  # fmt: skip
EDGE_SECTORS = (DISK_SECTORS - 1, DISK_SECTORS, 1 << 32, 1 << 54, 1 << 63, U64)
sectors = weighted((4, st.integers(0, DISK_SECTORS - 1)), (1, st.sampled_from(EDGE_SECTORS)))


@st.composite
def blk_requests(draw: st.DrawFn) -> Segs:
    """Header, data, status, as Linux lays them out, or split and merged differently."""
    rtype = draw(weighted((6, st.sampled_from(BLK_TYPES)), (1, u32s)))
    header = struct.pack("<IIQ", rtype, 0, draw(sectors))
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        count = st.one_of(st.integers(0, DISK_SECTORS), u32s)
        entry = st.tuples(sectors, count, usually(0, st.one_of(st.just(1), u32s)))
        for s, n, f in draw(st.lists(entry, min_size=1, max_size=34)):
            header += struct.pack("<QII", s, n, f)
    fault = draw(corruption)
    if fault is not None:
        header = corrupt(header, *fault)
    cuts = draw(usually([], st.lists(st.integers(0, 1 << 10), max_size=2)))
    segs = [Seg(len(piece), False, piece, draw(where)) for piece in split(header, cuts)]
    write = rtype == VIRTIO_BLK_T_IN
    data_len = weighted((8, st.sampled_from((512, 1024, 4096))), (1, st.sampled_from(EDGE_LENS)))
    for n in draw(st.lists(data_len, min_size=int(rtype in (0, 1)), max_size=3)):
        segs.append(Seg(n, write, None, draw(where)))
    status = draw(usually(1, st.sampled_from((0, 2, 513))))
    if status:
        segs.append(Seg(status, True, None, draw(where)))
    return tuple(segs)


others = st.sampled_from((*LISTEN_PORTS[1:], HOST_PORT + 1, 7))
VSOCK_OPS = (
    VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
)  # fmt: skip


@st.composite
def vsock_packets(
    draw: st.DrawFn, op: int | None = None, ports: tuple[int, int] | None = None
) -> Segs:
    """A packet a guest could send (its header consistent), then maybe one field garbage."""
    if op is None:
        op = draw(weighted((12, st.sampled_from(VSOCK_OPS)), (1, st.sampled_from((0, 8, 0xFFFF)))))
    if ports is None:
        src = draw(usually(GUEST_PORTS[0], st.sampled_from(GUEST_PORTS[1:]), odds=3))
        dst = draw(weighted((3, st.just(LISTEN_PORTS[0])), (2, st.just(HOST_PORT)), (1, others)))
        ports = (src, dst)
    size = min(draw(lens(100, 4096, 65536)), 65537) if op == VIRTIO_VSOCK_OP_RW else 0
    header = VIRTIO_VSOCK_HDR.pack(
        GUEST_CID,
        2,
        *ports,
        size,
        1,  # VIRTIO_VSOCK_TYPE_STREAM
        op,
        draw(st.integers(0, 3)) if op == VIRTIO_VSOCK_OP_SHUTDOWN else 0,
        draw(st.sampled_from((65536, 262144, 4096, 0))),  # buf_alloc
        draw(usually(0, st.sampled_from((4096, 65536, U32)))),  # fwd_cnt
    )
    fault = draw(corruption)
    if fault is not None:
        header = corrupt(header, *fault)
    if size and draw(st.booleans()):  # newer kernels: header and payload in one buffer
        return (Seg(44 + size, False, header + bytes(size), draw(where)),)
    segs = [Seg(44, False, header, draw(where))]
    if size:
        segs.append(Seg(size, False, None, draw(where)))
    return tuple(segs)


RX_BUFFER = Chain(0, (Seg(44, True), Seg(4096, True)))  # as Linux 6.1 gives them


@st.composite
def vsock_sessions(draw: st.DrawFn) -> list[Op]:
    """A connection's life, from either side: open, data both ways, close (or not)."""
    guest_port = draw(st.sampled_from(GUEST_PORTS))
    ops: list[Op] = [RX_BUFFER] * draw(st.integers(0, 4))
    if draw(st.booleans()):  # the guest connects to a host service
        peer = draw(st.sampled_from(LISTEN_PORTS))
        ops += [packet(draw, VIRTIO_VSOCK_OP_REQUEST, (guest_port, peer)), Host("accept")]
    else:  # a host client connects to the guest: CONNECT <guest_port>, then the guest answers
        peer = HOST_PORT + draw(usually(0, st.integers(1, 3)))
        ops += [Host("connect", GUEST_PORTS.index(guest_port)), RX_BUFFER]
        ops.append(packet(draw, VIRTIO_VSOCK_OP_RESPONSE, (guest_port, peer)))
    steps = st.sampled_from(
        ("guest_rw", "guest_rw", "host_send", "host_send", "host_recv", "rx", "rx", "credit")
    )
    for step in draw(st.lists(steps, max_size=10)):
        if step == "guest_rw":
            ops.append(packet(draw, VIRTIO_VSOCK_OP_RW, (guest_port, peer)))
        elif step == "credit":
            ops.append(packet(draw, VIRTIO_VSOCK_OP_CREDIT_UPDATE, (guest_port, peer)))
        elif step == "rx":
            ops.append(RX_BUFFER)
        else:
            ops.append(Host(step[5:], draw(st.integers(0, 63))))
    end = draw(st.sampled_from((None, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RST)))
    if end is not None:
        ops.append(packet(draw, end, (guest_port, peer)))
    return ops


def packet(draw: st.DrawFn, op: int, ports: tuple[int, int]) -> Chain:
    segs = draw(vsock_packets(op, ports))
    return Chain(1, segs, draw(usually("none", st.sampled_from(MUTATIONS), odds=8)))


def pfn_arrays() -> st.SearchStrategy[Segs]:
    data_pages = st.integers(DATA_START // 4096, LOW_SIZE // 4096 - 1)
    pfn = weighted(
        (6, data_pages), (1, st.integers(0, LOW_SIZE // 4096 + 1)), (1, st.just(HIGH_BASE // 4096))
    )
    arrays = weighted(
        (4, st.lists(pfn, max_size=16)),
        (1, st.builds(lambda p, n: [p] * n, pfn, st.sampled_from((256, 1024, 1025, 4096)))),
    )
    return st.builds(
        lambda pfns, cuts: tuple(
            Seg(len(piece), False, piece)
            for piece in split(struct.pack(f"<{len(pfns)}I", *pfns), cuts)
        ),
        arrays,
        usually([], st.lists(st.integers(0, 1 << 14), max_size=2)),
    )


def stats_buffer(entries: list[tuple[int, int]]) -> Segs:
    data = b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)
    return (Seg(len(data), False, data),)


def balloon_stats() -> st.SearchStrategy[Segs]:
    """Tags the spec defines, mostly; long buffers come from the chain's ``repeat``."""
    tag = usually(4, st.one_of(st.integers(0, 10), st.just(0xFFFF)), odds=1)
    return st.lists(st.tuples(tag, u32s), max_size=40).map(stats_buffer)


def reported_ranges() -> st.SearchStrategy[Segs]:
    page = st.integers(DATA_START // 4096, LOW_SIZE // 4096 - 1).map(lambda p: p * 4096)
    ranges = st.builds(
        Seg,
        length=lens(4096, 8192, 2 << 20),
        write=st.booleans(),
        addr=weighted((4, page), (1, addrs)),
    )
    return st.lists(ranges, min_size=1, max_size=4).map(tuple)


def device_chains(device: str) -> st.SearchStrategy[Op]:
    """Requests in the device's own format on the queue that takes them, or anything."""
    count = len(QUEUE_SIZES[device])
    generic = (1, chains(st.integers(0, count), random_segs()))
    if device == "blk":
        return weighted((5, chains(st.just(0), blk_requests())), generic)
    if device == "net":
        return weighted(
            (3, chains(st.just(1), buffers(False, 12, 74, 1526, 65550))),
            (3, chains(st.just(0), buffers(True, 1526, 12, 65562))),
            generic,
        )
    if device == "vsock":
        return weighted(
            (5, chains(st.just(1), vsock_packets())),
            (4, chains(st.just(0), usually((Seg(44, True), Seg(4096, True)), buffers(True, 4140)))),
            (1, chains(st.just(2), buffers(True, 4, 1))),
            generic,
        )
    return weighted(
        (3, chains(st.sampled_from((INFLATE_QUEUE, DEFLATE_QUEUE)), pfn_arrays())),
        (2, chains(st.just(STATS_QUEUE), balloon_stats())),
        (2, chains(st.just(REPORTING_QUEUE), reported_ranges())),
        generic,
    )


def ring_ops(device: str) -> st.SearchStrategy[Op]:
    queue = st.integers(0, len(QUEUE_SIZES[device]))
    return st.one_of(
        st.builds(
            AvailIdx,
            queue=queue,
            mode=st.sampled_from(("bump", "set")),
            value=st.one_of(st.integers(0, 8), u16s),
        ),
        st.builds(
            Scribble,
            queue=queue,
            target=st.sampled_from(("desc", "avail", "used", "used_event", "avail_event", "abs")),
            offset=weighted((4, st.integers(0, 8)), (1, st.integers(0, LOW_SIZE))),
            data=st.binary(min_size=1, max_size=16),
        ),
        st.builds(Kick, queue=st.one_of(queue, u32s)),
    )


def ops(device: str) -> st.SearchStrategy[Op]:
    return weighted(
        (12, device_chains(device)),
        (2, st.builds(Kick, queue=st.integers(0, len(QUEUE_SIZES[device]) - 1))),
        (4, st.builds(Host, action=st.sampled_from(HOST_ACTIONS[device]), arg=st.integers(0, 63))),
        (2, ring_ops(device)),
        (1, reg_ops),
        (1, st.builds(Reset, reboot=mostly_true)),
        (1, boots(device)),
        (1, st.builds(Snapshot, shift=usually(0, st.integers(0xFFF0, 0xFFFF), odds=1))),
    )


def programs(device: str) -> st.SearchStrategy[Program]:
    """A boot (usually Linux's), then about 8 to 60 ops: one hypothesis example."""
    single = ops(device).map(lambda op: [op])
    chunks = weighted((6, single), (1, vsock_sessions())) if device == "vsock" else single
    return st.builds(
        lambda first, rest, read_only, timeouts: Program(
            device,
            (first, *(op for chunk in rest for op in chunk)),
            read_only=read_only,
            timeouts=timeouts,
        ),
        weighted((3, st.just(good_boot(device))), (1, boots(device))),
        st.lists(chunks, min_size=8, max_size=60),
        st.booleans() if device == "blk" else st.just(False),
        st.sampled_from((3600.0, 0.0)) if device == "vsock" else st.just(3600.0),
    )
