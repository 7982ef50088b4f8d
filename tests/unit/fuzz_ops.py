"""What a fuzz program is made of: the guest memory it runs in, and the ops a hostile driver
(and the device's host side) performs.  Played by :mod:`tests.unit.fuzz_harness`, written by
:mod:`tests.unit.fuzz_strategies`."""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("blk", "net", "vsock", "balloon")
U32, U64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

# -- guest memory: 2 MiB at 0 and 256 KiB at 4 GiB, nothing in between ------------------------

LOW_SIZE = 2 << 20
HIGH_BASE = 1 << 32
HIGH_SIZE = 256 << 10
MEMORY = ((0, LOW_SIZE), (HIGH_BASE, HIGH_SIZE))
RING_SLOT = 0x10000  # queue q's rings live at RING_SLOT * (q + 1) when laid out properly
AVAIL_OFFSET, USED_OFFSET = 0x1000, 0x2000  # from the descriptor table (256 entries = 4 KiB)
DATA_START = 0x60000  # buffers and indirect tables, a bump allocator to the region's end
MAX_ALLOC = 128 << 10  # a buffer claiming more gets this much real space; the rest is a lie

# -- the devices' host sides --------------------------------------------------------------------

QUEUE_SIZES = {"blk": (256,), "net": (256, 256), "vsock": (256, 256, 16), "balloon": (256,) * 4}
DISK_SECTORS = 64
GUEST_CID = 3
LISTEN_PORTS = (52, 53)  # host services the guest may connect to (<uds>_52, <uds>_53)
GUEST_PORTS = (1000, 1001)  # the guest's own ports, also what host clients CONNECT to
HOST_PORT = 1 << 30  # the first port the device gives a host client's connection


@dataclass(frozen=True)
class QueueSetup:
    """One queue's registers as a boot sequence writes them.

    ``layout``: "good" (the queue's own slot, zeroed), "overlap" (rings on top of each
    other or of another queue's; ``desc`` picks how), "raw" (the addresses given).
    """

    index: int
    size: int
    layout: str = "good"
    desc: int = 0
    avail: int = 0
    used: int = 0
    ready: bool = True


@dataclass(frozen=True)
class Boot:
    """Reset, negotiate, set up queues, DRIVER_OK (§3.1.1), with an optional ``flaw``:
    "no_features_ok", "driver_ok_first", "features_late", "no_driver_ok", "failed",
    "late_queue" (a queue set up again after DRIVER_OK)."""

    feature_mask: int
    version_1: bool
    queues: tuple[QueueSetup, ...]
    flaw: str = "none"


def good_boot(device: str) -> Boot:
    """What Linux does: every feature, every queue at its largest size, nothing wrong."""
    sizes = QUEUE_SIZES[device]
    return Boot(U64, True, tuple(QueueSetup(i, size) for i, size in enumerate(sizes)))


@dataclass(frozen=True)
class RegWrite:
    offset: int
    value: int
    width: int = 4


@dataclass(frozen=True)
class RegRead:
    offset: int
    width: int = 4


@dataclass(frozen=True)
class Kick:
    queue: int


@dataclass(frozen=True)
class Reset:
    """Status 0 with requests in flight; with ``reboot`` the driver then starts over."""

    reboot: bool = True


@dataclass(frozen=True)
class Seg:
    """One buffer of a chain: ``data`` (readable buffers; else a pattern) at ``addr`` (else
    allocated; "high": in the region above 4 GiB)."""

    length: int
    write: bool
    data: bytes | None = None
    addr: int | str | None = None


@dataclass(frozen=True)
class Chain:
    """A request on ``queue``: ``segs`` (``repeat`` times over, the same buffers again), laid
    out straight or with a ``mutation`` (see ``fuzz_harness.write_chain``)."""

    queue: int
    segs: tuple[Seg, ...]
    mutation: str = "none"
    arg: int = 0
    kick: bool = True
    repeat: int = 1


@dataclass(frozen=True)
class AvailIdx:
    """Garbage in avail.idx: "bump" publishes ``value`` entries nobody wrote; "set" writes it."""

    queue: int
    mode: str
    value: int


@dataclass(frozen=True)
class Scribble:
    """Raw bytes over queue ``queue``'s ``target`` ("desc", "avail", "used", or the event idx
    fields "used_event" and "avail_event") plus ``offset``; "abs": at guest address ``offset``."""

    queue: int
    target: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class Snapshot:
    """Save the device, restore it into a fresh one; ``shift`` moves every ring index."""

    shift: int = 0


@dataclass(frozen=True)
class Host:
    """The device's host side does something (see the rigs' ``host`` methods)."""

    action: str
    arg: int = 0


Op = Boot | RegWrite | RegRead | Kick | Reset | Chain | AvailIdx | Scribble | Snapshot | Host


@dataclass(frozen=True)
class Program:
    device: str
    ops: tuple[Op, ...]
    read_only: bool = False  # blk
    timeouts: float = 3600.0  # vsock: connect, close and linger timeouts (0: always due)
