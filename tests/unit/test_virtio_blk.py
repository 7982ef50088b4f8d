"""virtio-blk over a host file (virtio 1.2 §5.2), driven through real rings by a fake driver.

Requests are laid out the way Linux's virtio_blk does (a 16-byte
``virtio_blk_outhdr`` descriptor, data descriptors, a 1-byte status
descriptor) and also in the odd-but-legal layouts the spec allows (header and
data in one descriptor, data and status sharing one, indirect tables).  Every
hostile request must complete cleanly (IOERR/UNSUPP, or used length 0 when it
has nowhere to put a status byte) and the next good request must still be
served; the disk file is never written where it should not be.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio.block.device import (
    MAX_DISCARD_SEG,
    QUEUE_SIZE,
    SECTOR_SIZE,
    SEG_MAX,
    SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
)
from ember.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Interrupt,
)
from ember.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
)
from ember.errors import ConfigError
from ember.memory import GuestMemory
from tests.unit.virtio_driver import UsedElem, VirtioDriver

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MEM_SIZE = 4 << 20
DISK_SECTORS = 2048
DISK_SIZE = DISK_SECTORS * SECTOR_SIZE  # 1 MiB
CONTENT = random.Random(2024).randbytes(DISK_SIZE)
POISON = 0xEE  # what writable buffers hold before the device writes them
OUTHDR = struct.Struct("<IIQ")
DISCARD = struct.Struct("<QII")
BASE_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC


def header(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return OUTHDR.pack(rtype, ioprio, sector)


def sectors(first: int, count: int = 1) -> bytes:
    """The disk's original content of ``count`` sectors from ``first``."""
    return CONTENT[first * SECTOR_SIZE : (first + count) * SECTOR_SIZE]


def pending_signals(interrupt: Interrupt) -> int:
    try:
        return os.eventfd_read(interrupt.eventfd)
    except BlockingIOError:
        return 0


class Rig:
    """A Block device on a disk file, activated on one queue driven by a :class:`VirtioDriver`."""

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool = False,
        serial: str | None = "ember-disk-0",
        mem_size: int = MEM_SIZE,
        size: int = 128,
        features: int = BASE_FEATURES,
    ) -> None:
        self.path = path
        self.mem = GuestMemory.anonymous(mem_size)
        self.driver = VirtioDriver(self.mem, size=size)
        self.queue = Queue(QUEUE_SIZE)
        self.driver.configure(self.queue)
        self.blk = Block(path, read_only=read_only, serial=serial)
        assert features & ~self.blk.device_features() == 0
        self.blk.acked_features = features
        self.interrupt = Interrupt()
        self.blk.activate(self.mem, [self.queue], self.interrupt)

    def close(self) -> None:
        self.blk.close()
        self.interrupt.close()
        self.mem.close()

    # -- requests ---------------------------------------------------------------------------

    def offer(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> int:
        head = self.driver.add_chain(readable, writable, indirect=indirect)
        for addr, n in self.driver.writable(head):
            self.mem.fill(addr, n, POISON)
        return head

    def serve(self) -> list[UsedElem]:
        self.blk.process_queue(0)
        return self.driver.used_entries()

    def one(
        self, readable: list[bytes], writable: list[int], indirect: bool = False
    ) -> tuple[int, bytes]:
        """Offer one request, kick, and return (used length, all its writable bytes)."""
        head = self.offer(readable, writable, indirect)
        used = self.serve()
        assert [e.id for e in used] == [head]
        return used[0].len, self.driver.written(head)

    def read(self, sector: int, count: int = 1, segments: int = 1) -> tuple[int, int, bytes]:
        """Linux's IN: header, ``segments`` data descriptors, status. (len, status, data)."""
        nbytes = count * SECTOR_SIZE
        split = [nbytes // segments] * segments
        split[-1] += nbytes - sum(split)
        length, out = self.one([header(VIRTIO_BLK_T_IN, sector)], [*split, 1])
        return length, out[-1], out[:-1]

    def write(self, sector: int, data: bytes, segments: int = 1) -> tuple[int, int]:
        """Linux's OUT: header, ``segments`` data descriptors, status. (len, status)."""
        step = -(-len(data) // segments) if data else 0
        chunks = [data[i : i + step] for i in range(0, len(data), step)] if data else []
        length, out = self.one([header(VIRTIO_BLK_T_OUT, sector), *chunks], [1])
        assert len(out) == 1
        return length, out[0]

    def command(self, rtype: int, payload: bytes = b"", sector: int = 0) -> tuple[int, int]:
        """FLUSH/DISCARD/WRITE_ZEROES/anything without data in: (len, status)."""
        readable = [header(rtype, sector)] + ([payload] if payload else [])
        length, out = self.one(readable, [1])
        return length, out[0]

    def assert_still_serves(self) -> None:
        """The next well-formed request after a hostile one is served normally."""
        length, status, data = self.read(7, 2)
        assert (length, status) == (2 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK)
        assert data == self.path.read_bytes()[7 * SECTOR_SIZE : 9 * SECTOR_SIZE]
        assert not self.blk.needs_reset and not self.queue.broken

    def raw(self, *descs: tuple[int, int, int, int], head: int = 100) -> int:
        """Write descriptors head, head+1, ... verbatim (outside add_chain's range) and offer."""
        for i, d in enumerate(descs):
            self.driver.write_desc(head + i, *d)
        self.driver.push_avail(head)
        return head


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(CONTENT)
    return path


@pytest.fixture
def rig(disk: Path) -> Iterator[Rig]:
    r = Rig(disk)
    yield r
    r.close()


@pytest.fixture
def ro_rig(disk: Path) -> Iterator[Rig]:
    r = Rig(disk, read_only=True)
    yield r
    r.close()


# -- the device's description -----------------------------------------------------------------


def test_abi_constants() -> None:
    assert (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID) == (
        0,
        1,
        4,
        8,
    )
    assert (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) == (11, 13)
    assert (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP) == (0, 1, 2)
    assert (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_BLK_SIZE) == (2, 5, 6)
    assert (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES) == (9, 13, 14)
    assert Block.device_id == VIRTIO_ID_BLOCK == 2 and OUTHDR.size == 16 and DISCARD.size == 16


def test_features(rig: Rig, ro_rig: Rig) -> None:
    rw, ro = rig.blk.device_features(), ro_rig.blk.device_features()
    for features in (rw, ro):
        assert features & 1 << VIRTIO_F_VERSION_1
        assert features & 1 << VIRTIO_RING_F_INDIRECT_DESC
        assert features & 1 << VIRTIO_RING_F_EVENT_IDX
        assert features & 1 << VIRTIO_BLK_F_FLUSH and features & 1 << VIRTIO_BLK_F_BLK_SIZE
        assert features & 1 << VIRTIO_BLK_F_SEG_MAX
    assert not rw & 1 << VIRTIO_BLK_F_RO and ro & 1 << VIRTIO_BLK_F_RO
    assert rw & 1 << VIRTIO_BLK_F_DISCARD and rw & 1 << VIRTIO_BLK_F_WRITE_ZEROES
    assert not ro & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)


def test_config_space(rig: Rig) -> None:
    blk = rig.blk
    config = blk.read_config(0, 60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
    assert capacity == DISK_SECTORS and blk.capacity == DISK_SECTORS
    assert size_max == SIZE_MAX and seg_max == SEG_MAX == QUEUE_SIZE - 2
    assert struct.unpack_from("<I", config, 20)[0] == SECTOR_SIZE  # blk_size
    max_discard_sectors, max_discard_seg = struct.unpack_from("<II", config, 36)
    assert max_discard_sectors > 0 and max_discard_seg == MAX_DISCARD_SEG
    assert struct.unpack_from("<II", config, 48)[1] == MAX_DISCARD_SEG  # write zeroes seg
    # Partial and field-by-field reads, as virtio_cread() does them.
    assert blk.read_config(0, 4) == struct.pack("<I", DISK_SECTORS)
    assert blk.read_config(4, 4) == b"\0" * 4
    assert blk.read_config(20, 4) == struct.pack("<I", SECTOR_SIZE)
    assert blk.read_config(60, 4) == b"" and blk.read_config(1000, 8) == b""
    blk.write_config(0, b"\xff" * 8)  # read-only
    assert blk.read_config(0, 8) == struct.pack("<Q", DISK_SECTORS)


def test_partial_last_sector_is_not_exposed(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(CONTENT[: 10 * SECTOR_SIZE + 100])
    r = Rig(path)
    try:
        assert r.blk.capacity == 10
        length, status, _ = r.read(10)
        assert (length, status) == (1, VIRTIO_BLK_S_IOERR)
        assert r.write(9, b"\x01" * SECTOR_SIZE) == (1, VIRTIO_BLK_S_OK)
        assert path.read_bytes()[10 * SECTOR_SIZE :] == CONTENT[10 * SECTOR_SIZE : 10 * 512 + 100]
    finally:
        r.close()


def test_disks_that_cannot_be_used(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"\0" * 511)
    with pytest.raises(ConfigError, match="smaller than one"):
        Block(tiny)
    with pytest.raises(ConfigError, match="cannot open"):
        Block(tmp_path / "missing.img")


# -- good paths -------------------------------------------------------------------------------


def test_read(rig: Rig) -> None:
    length, status, data = rig.read(0)
    assert (length, status, data) == (SECTOR_SIZE + 1, VIRTIO_BLK_S_OK, sectors(0))
    length, status, data = rig.read(DISK_SECTORS - 8, 8)  # the very end of the disk
    assert (length, status, data) == (8 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK, sectors(2040, 8))
    assert rig.blk.stats.reads == 2 and rig.blk.stats.read_bytes == 9 * SECTOR_SIZE


@pytest.mark.parametrize("segments", [1, 2, 3, 8, 64])
def test_multi_descriptor_read(rig: Rig, segments: int) -> None:
    length, status, data = rig.read(100, 64, segments=segments)
    assert (length, status) == (64 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK)
    assert data == sectors(100, 64)


@pytest.mark.parametrize("segments", [1, 2, 5, 16])
def test_write_then_read_back(rig: Rig, disk: Path, segments: int) -> None:
    data = random.Random(segments).randbytes(16 * SECTOR_SIZE)
    assert rig.write(300, data, segments=segments) == (1, VIRTIO_BLK_S_OK)
    length, status, back = rig.read(300, 16, segments=3)
    assert (length, status, back) == (16 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK, data)
    on_disk = disk.read_bytes()
    assert len(on_disk) == DISK_SIZE
    assert on_disk[300 * SECTOR_SIZE : 316 * SECTOR_SIZE] == data
    assert on_disk[: 300 * SECTOR_SIZE] == CONTENT[: 300 * SECTOR_SIZE]
    assert on_disk[316 * SECTOR_SIZE :] == CONTENT[316 * SECTOR_SIZE :]
    assert rig.blk.stats.writes == 1 and rig.blk.stats.write_bytes == len(data)


def test_write_of_the_last_sector(rig: Rig, disk: Path) -> None:
    assert rig.write(DISK_SECTORS - 1, b"\x5a" * SECTOR_SIZE) == (1, VIRTIO_BLK_S_OK)
    assert disk.read_bytes()[-SECTOR_SIZE:] == b"\x5a" * SECTOR_SIZE
    assert disk.stat().st_size == DISK_SIZE


def test_header_and_data_in_one_descriptor(rig: Rig, disk: Path) -> None:
    data = b"\x42" * (2 * SECTOR_SIZE)
    length, out = rig.one([header(VIRTIO_BLK_T_OUT, 20) + data], [1])
    assert (length, out) == (1, bytes([VIRTIO_BLK_S_OK]))
    assert disk.read_bytes()[20 * SECTOR_SIZE : 22 * SECTOR_SIZE] == data


def test_header_split_over_two_descriptors(rig: Rig) -> None:
    hdr = header(VIRTIO_BLK_T_IN, 9)
    length, out = rig.one([hdr[:5], hdr[5:]], [SECTOR_SIZE, 1])
    assert (length, out[-1], out[:-1]) == (SECTOR_SIZE + 1, VIRTIO_BLK_S_OK, sectors(9))


def test_status_sharing_a_descriptor_with_data(rig: Rig) -> None:
    length, out = rig.one([header(VIRTIO_BLK_T_IN, 4)], [2 * SECTOR_SIZE + 1])
    assert length == 2 * SECTOR_SIZE + 1
    assert out[:-1] == sectors(4, 2) and out[-1] == VIRTIO_BLK_S_OK
    # Data split unevenly, the status byte riding at the end of the second buffer.
    length, out = rig.one([header(VIRTIO_BLK_T_IN, 6)], [100, 2 * SECTOR_SIZE - 99])
    assert length == 2 * SECTOR_SIZE + 1
    assert out[:-1] == sectors(6, 2) and out[-1] == VIRTIO_BLK_S_OK


def test_indirect_requests(rig: Rig, disk: Path) -> None:
    data = b"\x17" * SECTOR_SIZE
    length, out = rig.one([header(VIRTIO_BLK_T_OUT, 50), data], [1], indirect=True)
    assert (length, out) == (1, bytes([VIRTIO_BLK_S_OK]))
    hdr = header(VIRTIO_BLK_T_IN, 49)
    length, out = rig.one([hdr], [SECTOR_SIZE, SECTOR_SIZE, 1], indirect=True)
    assert (length, out[-1]) == (2 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK)
    assert out[:-1] == sectors(49) + data
    assert disk.read_bytes()[50 * SECTOR_SIZE : 51 * SECTOR_SIZE] == data


def test_many_requests_in_one_kick(rig: Rig) -> None:
    heads = [rig.offer([header(VIRTIO_BLK_T_IN, 10 * i)], [SECTOR_SIZE, 1]) for i in range(20)]
    used = rig.serve()
    assert used == [UsedElem(h, SECTOR_SIZE + 1) for h in heads]
    for i, head in enumerate(heads):
        assert rig.driver.written(head) == sectors(10 * i) + bytes([VIRTIO_BLK_S_OK])
    assert pending_signals(rig.interrupt) == 1  # one interrupt for the batch


def test_flush(rig: Rig, ro_rig: Rig) -> None:
    assert rig.command(VIRTIO_BLK_T_FLUSH) == (1, VIRTIO_BLK_S_OK)
    assert ro_rig.command(VIRTIO_BLK_T_FLUSH) == (1, VIRTIO_BLK_S_OK)
    # The sector field of a flush means nothing (§5.2.6: it "MUST be zero" for the driver).
    assert rig.command(VIRTIO_BLK_T_FLUSH, sector=1 << 60) == (1, VIRTIO_BLK_S_OK)
    assert rig.blk.stats.flushes == 2


def test_get_id(disk: Path) -> None:
    for serial, expect in [
        ("ember-disk-0", b"ember-disk-0".ljust(20, b"\0")),
        ("x" * 30, b"x" * 20),  # truncated to 20 bytes, no terminating NUL
        (None, b"disk.img".ljust(20, b"\0")),  # defaults to the file name
    ]:
        r = Rig(disk, serial=serial)
        try:
            length, out = r.one([header(VIRTIO_BLK_T_GET_ID)], [VIRTIO_BLK_ID_BYTES, 1])
            assert length == VIRTIO_BLK_ID_BYTES + 1
            assert out[:-1] == expect and out[-1] == VIRTIO_BLK_S_OK
            # A shorter buffer gets what fits.
            length, out = r.one([header(VIRTIO_BLK_T_GET_ID)], [4, 1])
            assert (length, out) == (5, expect[:4] + bytes([VIRTIO_BLK_S_OK]))
        finally:
            r.close()


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_and_write_zeroes_read_back_zeros(rig: Rig, disk: Path, rtype: int) -> None:
    segments = DISCARD.pack(64, 16, 0) + DISCARD.pack(200, 3, 0) + DISCARD.pack(0, 0, 0)
    assert rig.command(rtype, segments) == (1, VIRTIO_BLK_S_OK)
    assert rig.read(64, 16)[1:] == (VIRTIO_BLK_S_OK, b"\0" * 16 * SECTOR_SIZE)
    assert rig.read(200, 3)[2] == b"\0" * 3 * SECTOR_SIZE
    on_disk = disk.read_bytes()
    assert len(on_disk) == DISK_SIZE == disk.stat().st_size
    assert on_disk[64 * SECTOR_SIZE : 80 * SECTOR_SIZE] == b"\0" * 16 * SECTOR_SIZE
    assert on_disk[: 64 * SECTOR_SIZE] == CONTENT[: 64 * SECTOR_SIZE]
    assert on_disk[80 * SECTOR_SIZE : 200 * SECTOR_SIZE] == CONTENT[80 * 512 : 200 * 512]
    assert on_disk[203 * SECTOR_SIZE :] == CONTENT[203 * SECTOR_SIZE :]


def test_discard_of_the_whole_disk(rig: Rig, disk: Path) -> None:
    assert rig.command(VIRTIO_BLK_T_DISCARD, DISCARD.pack(0, DISK_SECTORS, 0)) == (1, 0)
    assert disk.read_bytes() == b"\0" * DISK_SIZE


def test_read_only_disk_serves_reads(ro_rig: Rig, disk: Path) -> None:
    assert ro_rig.read(3, 2) == (2 * SECTOR_SIZE + 1, VIRTIO_BLK_S_OK, sectors(3, 2))


# -- interrupts -------------------------------------------------------------------------------


def test_interrupt_after_serving(rig: Rig) -> None:
    assert rig.interrupt.status == 0 and pending_signals(rig.interrupt) == 0
    rig.read(1)
    assert rig.interrupt.status & VIRTIO_MMIO_INT_VRING
    assert pending_signals(rig.interrupt) == 1
    rig.interrupt.ack(VIRTIO_MMIO_INT_VRING)
    rig.blk.process_queue(0)  # nothing new: no interrupt
    assert rig.interrupt.status == 0 and pending_signals(rig.interrupt) == 0


def test_no_interrupt_when_suppressed(rig: Rig) -> None:
    rig.driver.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    assert rig.read(1)[:2] == (SECTOR_SIZE + 1, VIRTIO_BLK_S_OK)
    assert rig.interrupt.status == 0 and pending_signals(rig.interrupt) == 0
    assert rig.interrupt.count == 0
    # While suppressed the device also asked not to be kicked while busy, then re-enabled kicks.
    assert rig.driver.used_flags == 0
    rig.driver.avail_flags = 0
    rig.read(2)
    assert pending_signals(rig.interrupt) == 1


def test_event_idx_interrupts(disk: Path) -> None:
    r = Rig(disk, features=BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX)
    try:
        assert r.queue.event_idx
        r.driver.used_event = 0  # interrupt me once used.idx passes 0
        r.read(1)
        assert pending_signals(r.interrupt) == 1
        r.driver.used_event = 5  # not before used.idx passes 5
        for sector in range(2, 6):
            r.read(sector)
        assert pending_signals(r.interrupt) == 0 and r.driver.used_idx == 5
        r.read(6)  # used.idx 5 -> 6 passes 5
        assert pending_signals(r.interrupt) == 1
        assert r.driver.avail_event == r.driver.avail_idx  # kick me for the next one
    finally:
        r.close()


# -- hostile requests: each fails cleanly, and the next request is served ---------------------


@pytest.mark.parametrize(
    ("sector", "count"),
    [
        (DISK_SECTORS, 1),  # just past the end
        (DISK_SECTORS - 1, 2),  # straddles the end
        (DISK_SECTORS + 1000, 0),  # even empty, a sector must be on the disk
        ((1 << 64) - 1, 1),  # sector + count overflows 64 bits
        (1 << 55, 1),  # sector * 512 overflows 64 bits
        ((1 << 64) - 8, 16),
    ],
)
def test_sectors_beyond_the_end(rig: Rig, disk: Path, sector: int, count: int) -> None:
    length, status, data = rig.read(sector, count)
    assert (length, status) == (1, VIRTIO_BLK_S_IOERR)
    assert data == bytes([POISON]) * count * SECTOR_SIZE  # nothing was read into the buffers
    assert rig.write(sector, b"\x99" * count * SECTOR_SIZE) == (1, VIRTIO_BLK_S_IOERR)
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        payload = DISCARD.pack(sector, count, 0)
        assert rig.command(rtype, payload) == (1, VIRTIO_BLK_S_IOERR)
    assert disk.read_bytes() == CONTENT
    assert rig.blk.stats.errors == 4
    rig.assert_still_serves()


@pytest.mark.parametrize("nbytes", [1, 100, 511, 513, SECTOR_SIZE * 3 - 1])
def test_length_not_a_multiple_of_512(rig: Rig, disk: Path, nbytes: int) -> None:
    length, out = rig.one([header(VIRTIO_BLK_T_IN, 0)], [nbytes, 1])
    assert (length, out[-1]) == (1, VIRTIO_BLK_S_IOERR)
    assert out[:-1] == bytes([POISON]) * nbytes
    length, out = rig.one([header(VIRTIO_BLK_T_OUT, 0), b"\x01" * nbytes], [1])
    assert (length, out) == (1, bytes([VIRTIO_BLK_S_IOERR]))
    assert disk.read_bytes() == CONTENT
    rig.assert_still_serves()


def test_write_to_a_read_only_disk(ro_rig: Rig, disk: Path) -> None:
    before = disk.stat()
    assert ro_rig.write(0, b"\xff" * SECTOR_SIZE) == (1, VIRTIO_BLK_S_IOERR)
    length, out = ro_rig.one([header(VIRTIO_BLK_T_OUT, 8) + b"\xff" * SECTOR_SIZE], [1])
    assert (length, out) == (1, bytes([VIRTIO_BLK_S_IOERR]))
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):  # not offered
        assert ro_rig.command(rtype, DISCARD.pack(0, 8, 0)) == (1, VIRTIO_BLK_S_UNSUPP)
    assert disk.read_bytes() == CONTENT
    assert disk.stat().st_mtime_ns == before.st_mtime_ns
    assert ro_rig.blk.stats.writes == 0
    ro_rig.assert_still_serves()


@pytest.mark.parametrize("hdr_len", [0, 1, 8, 15])
def test_header_shorter_than_16_bytes(rig: Rig, disk: Path, hdr_len: int) -> None:
    hdr = header(VIRTIO_BLK_T_OUT, 0)[:hdr_len]
    length, out = rig.one([hdr] if hdr_len else [], [SECTOR_SIZE, 1])
    assert (length, out[-1]) == (1, VIRTIO_BLK_S_IOERR)
    assert disk.read_bytes() == CONTENT
    rig.assert_still_serves()


def test_no_writable_descriptor(rig: Rig, disk: Path) -> None:
    """Nowhere to put a status byte: dropped with used length 0, nothing done."""
    for readable in (
        [header(VIRTIO_BLK_T_OUT, 0), b"\x01" * SECTOR_SIZE],
        [header(VIRTIO_BLK_T_IN, 0)],
        [header(VIRTIO_BLK_T_FLUSH)],
        [header(VIRTIO_BLK_T_DISCARD) + DISCARD.pack(0, 8, 0)],
    ):
        length, out = rig.one(readable, [])
        assert (length, out) == (0, b"")
    length, _ = rig.one([header(VIRTIO_BLK_T_IN)], [0, 0])  # zero-length writable buffers
    assert length == 0
    assert disk.read_bytes() == CONTENT and rig.blk.stats.writes == 0
    rig.assert_still_serves()


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (MEM_SIZE, SECTOR_SIZE),  # just past RAM
        (MEM_SIZE - 256, SECTOR_SIZE),  # straddles the end of RAM
        (0xC000_0000, SECTOR_SIZE),  # the MMIO gap
        (1 << 40, SECTOR_SIZE),
        (0xFFFF_FFFF_FFFF_FE00, SECTOR_SIZE),  # wraps 64 bits
    ],
)
def test_data_buffer_outside_guest_memory(
    rig: Rig, disk: Path, indirect: bool, addr: int, length: int
) -> None:
    drv = rig.driver
    hdr = drv.alloc(16, header(VIRTIO_BLK_T_IN, 0))
    status = drv.alloc(1, bytes([POISON]))
    descs = [(hdr, 16, NEXT, 1), (addr, length, WRITE | NEXT, 2), (status, 1, WRITE, 0)]
    if indirect:
        table = drv.write_indirect_table(descs)
        head = rig.raw((table, 16 * len(descs), INDIRECT, 0))
    else:
        head = rig.raw(*[(a, n, f, 100 + nxt) for a, n, f, nxt in descs])
    assert rig.serve() == [UsedElem(head, 0)]
    assert rig.mem.read(status, 1) == bytes([POISON])  # the chain was refused whole
    # The same for a write whose data would come from outside RAM.
    hdr = drv.alloc(16, header(VIRTIO_BLK_T_OUT, 0))
    head = rig.raw((hdr, 16, NEXT, 111), (addr, length, NEXT, 112), (status, 1, WRITE, 0), head=110)
    assert rig.serve() == [UsedElem(head, 0)]
    assert disk.read_bytes() == CONTENT
    assert rig.queue.invalid_chains == 2
    rig.assert_still_serves()


def test_header_outside_guest_memory(rig: Rig) -> None:
    status = rig.driver.alloc(1, bytes([POISON]))
    head = rig.raw((MEM_SIZE - 8, 16, NEXT, 101), (status, 1, WRITE, 0))
    assert rig.serve() == [UsedElem(head, 0)]
    rig.assert_still_serves()


def test_four_gib_of_buffers(disk: Path) -> None:
    """Lengths that add up to 4 GiB: refused by the chain walk, never turned into I/O."""
    r = Rig(disk, mem_size=1 << 30)  # untouched anonymous memory costs nothing
    try:
        drv = r.driver
        gib = 1 << 30
        big = drv.data_start  # 1 GiB - data_start bytes fit from here
        n = gib - big
        hdr = drv.alloc(16, header(VIRTIO_BLK_T_IN, 0))
        status = drv.alloc(1, bytes([POISON]))
        # Five overlapping writable buffers of ~1 GiB: more than 4 GiB - 1 in total.
        descs = [(hdr, 16, NEXT, 101)]
        descs += [(big, n, WRITE | NEXT, 102 + i) for i in range(5)]
        descs += [(status, 1, WRITE, 0)]
        head = r.raw(*descs)
        assert r.serve() == [UsedElem(head, 0)]
        assert r.mem.read(status, 1) == bytes([POISON])
        # A single descriptor of 0xFFFFFFFF bytes does not fit this RAM at all.
        head = r.raw((hdr, 16, NEXT, 111), (0, 0xFFFF_FFFF, WRITE, 0), head=110)
        assert r.serve() == [UsedElem(head, 0)]
        # Three of them (3 GiB) is a valid chain, but far beyond the disk: IOERR, no I/O.
        descs = [(hdr, 16, NEXT, 121)]
        descs += [(big, n, WRITE | NEXT, 122 + i) for i in range(3)]
        descs += [(status, 1, WRITE, 0)]
        head = r.raw(*descs, head=120)
        assert r.serve() == [UsedElem(head, 1)]
        assert r.mem.read(status, 1) == bytes([VIRTIO_BLK_S_IOERR])
        assert r.blk.stats.read_bytes == 0
        r.assert_still_serves()
    finally:
        r.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 7, 9, 10, 12, 14, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_request_type(rig: Rig, disk: Path, rtype: int) -> None:
    assert rig.command(rtype) == (1, VIRTIO_BLK_S_UNSUPP)
    length, out = rig.one([header(rtype, 0), b"\x01" * SECTOR_SIZE], [SECTOR_SIZE, 1])
    assert (length, out[-1]) == (1, VIRTIO_BLK_S_UNSUPP)
    assert disk.read_bytes() == CONTENT and rig.blk.stats.unsupported == 2
    rig.assert_still_serves()


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no segment at all
        DISCARD.pack(0, 8, 0)[:15],  # a partial segment
        DISCARD.pack(0, 8, 0) + b"\0" * 8,  # a segment and a half
        DISCARD.pack(0, 1, 0) * (MAX_DISCARD_SEG + 1),  # more segments than max_discard_seg
        DISCARD.pack(0, 8, 0) + DISCARD.pack(DISK_SECTORS, 1, 0),  # second segment off the end
        DISCARD.pack(DISK_SECTORS - 4, 0xFFFFFFFF, 0),
        DISCARD.pack((1 << 64) - 1, 0xFFFFFFFF, 0),
    ],
)
def test_malformed_discard_list(rig: Rig, disk: Path, rtype: int, payload: bytes) -> None:
    assert rig.command(rtype, payload) == (1, VIRTIO_BLK_S_IOERR)
    on_disk = disk.read_bytes()
    assert len(on_disk) == DISK_SIZE
    # A list whose first segment was valid may have been acted on up to the bad one;
    # nothing beyond the first 8 sectors may ever change.
    assert on_disk[8 * SECTOR_SIZE :] == CONTENT[8 * SECTOR_SIZE :]
    rig.assert_still_serves()


def test_descriptor_loops(rig: Rig, disk: Path) -> None:
    drv = rig.driver
    hdr = drv.alloc(16, header(VIRTIO_BLK_T_OUT, 0))
    data = drv.alloc(SECTOR_SIZE)
    status = drv.alloc(1, bytes([POISON]))
    # data -> status -> data -> ...: a loop of writable buffers behind a good header
    head = rig.raw(
        (hdr, 16, NEXT, 101), (data, SECTOR_SIZE, WRITE | NEXT, 102), (status, 1, WRITE | NEXT, 101)
    )
    assert rig.serve() == [UsedElem(head, 0)]
    head = rig.raw((hdr, 16, NEXT, 110), head=110)  # points at itself
    assert rig.serve() == [UsedElem(head, 0)]
    table = drv.write_indirect_table([(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, 1)])
    head = rig.raw((table, 32, INDIRECT, 0), head=120)  # a loop inside an indirect table
    assert rig.serve() == [UsedElem(head, 0)]
    assert rig.mem.read(status, 1) == bytes([POISON])
    assert disk.read_bytes() == CONTENT
    assert rig.queue.invalid_chains == 3
    rig.assert_still_serves()


def test_avail_idx_far_ahead_needs_reset(rig: Rig, disk: Path) -> None:
    rig.offer([header(VIRTIO_BLK_T_OUT, 0), b"\x01" * SECTOR_SIZE], [1])
    rig.driver.set_avail_idx(rig.driver.avail_idx + 70000)
    assert rig.serve() == []
    assert rig.blk.needs_reset and rig.queue.broken
    assert rig.interrupt.status == VIRTIO_MMIO_INT_CONFIG  # a config interrupt, no used one
    assert pending_signals(rig.interrupt) == 1
    # It stays quiet: the ring is not read or written again, whatever the driver does.
    rig.driver.set_avail_idx(1)
    rig.offer([header(VIRTIO_BLK_T_IN, 0)], [SECTOR_SIZE, 1])
    used_flags = rig.driver.used_flags
    for _ in range(3):
        assert rig.serve() == []
    assert rig.driver.used_idx == 0 and rig.driver.used_flags == used_flags
    assert pending_signals(rig.interrupt) == 0 and rig.interrupt.count == 1
    assert disk.read_bytes() == CONTENT
    # A device reset and a fresh set-up bring it back.
    rig.blk.reset()
    assert not rig.blk.needs_reset and not rig.blk.active
    rig.queue.reset()
    rig.driver = VirtioDriver(rig.mem, size=64, desc_table=0x200000)
    rig.driver.configure(rig.queue)
    rig.blk.acked_features = BASE_FEATURES
    rig.blk.activate(rig.mem, [rig.queue], rig.interrupt)
    rig.assert_still_serves()


# -- property tests: random rings never crash the device or write where they should not --------

PROP_MEM = 256 << 10
PROP_SECTORS = 64
PROP_TAIL = 100  # a partial last sector, never exposed, never written
PROP_CONTENT = random.Random(99).randbytes(PROP_SECTORS * SECTOR_SIZE + PROP_TAIL)
SIZES = st.sampled_from([1, 2, 4, 8, 16, 32, 64])
U16 = struct.Struct("<H")


def property_rig(tmp: str, read_only: bool, size: int) -> Rig:
    path = Path(tmp) / "disk.img"
    path.write_bytes(PROP_CONTENT)
    return Rig(path, read_only=read_only, mem_size=PROP_MEM, size=size)


def check_after(r: Rig, read_only: bool) -> None:
    assert r.path.stat().st_size == len(PROP_CONTENT)
    on_disk = r.path.read_bytes()
    if read_only:
        assert on_disk == PROP_CONTENT
    else:
        assert on_disk[PROP_SECTORS * SECTOR_SIZE :] == PROP_CONTENT[PROP_SECTORS * SECTOR_SIZE :]
    assert r.blk.needs_reset or r.queue.pending(r.mem) == 0
    # Whatever happened, a kick is still harmless.
    r.blk.process_queue(0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=SIZES,
    read_only=st.booleans(),
    data=st.data(),
    next_avail=st.integers(0, 0xFFFF),
)
def test_random_ring_bytes(
    size: int, read_only: bool, data: st.DataObject, next_avail: int
) -> None:
    """Random bytes over the descriptor table and the avail ring, and a random avail.idx."""
    with tempfile.TemporaryDirectory() as tmp:
        r = property_rig(tmp, read_only, size)
        try:
            drv = r.driver
            r.mem.write(
                drv.desc_table,
                data.draw(
                    st.binary(min_size=desc_table_bytes(size), max_size=desc_table_bytes(size))
                ),
            )
            n = avail_ring_bytes(size)
            r.mem.write(drv.avail_ring, data.draw(st.binary(min_size=n, max_size=n)))
            ahead = data.draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)))
            r.mem.write(drv.avail_ring + 2, U16.pack((next_avail + ahead) & 0xFFFF))
            r.queue.next_avail = r.queue.next_used = next_avail
            r.blk.process_queue(0)
            check_after(r, read_only)
        finally:
            r.close()


def mostly(plain: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """``plain`` seven times out of eight: hostile values often, but not in every field."""
    return st.integers(0, 7).flatmap(lambda k: wild if k == 0 else plain)


AREA = 128 << 10  # buffer space for the plausible requests: 16 header pages, then data
WILD_ADDR = st.integers(0, (1 << 64) - 1)
WILD_LEN = st.integers(0, 0xFFFF_FFFF)


@st.composite
def plausible_request(draw: st.DrawFn, area: int) -> tuple[bytes, list[tuple[int, int, int]], bool]:
    """A request the way a driver would build it, each field occasionally hostile.

    Returns (header page contents, [(addr, len, flags)] in chain order, indirect).
    """
    rtype = draw(mostly(st.sampled_from([0, 0, 1, 1, 4, 8, 11, 13]), st.integers(0, 0xFFFFFFFF)))
    sector = mostly(st.integers(0, PROP_SECTORS + 2), WILD_ADDR)
    page = draw(st.integers(0, 15))
    payload = OUTHDR.pack(rtype, 0, draw(sector))
    for _ in range(draw(st.integers(0, 3))):  # discard segments, harmless for other types
        payload += DISCARD.pack(draw(sector), draw(mostly(st.integers(0, 16), WILD_LEN)), 0)
    hdr_addr = draw(mostly(st.just(area + page * 4096), WILD_ADDR))
    hdr_len = draw(mostly(st.sampled_from([16, len(payload)]), st.integers(0, 4096)))
    descs = [(hdr_addr, hdr_len, 0)]
    data_flag = WRITE if rtype in (0, 8) else 0
    for _ in range(draw(st.integers(0, 3))):
        addr = draw(mostly(st.integers(0, 95).map(lambda k: area + 16 * 4096 + 512 * k), WILD_ADDR))
        length = draw(mostly(st.sampled_from([0, 1, 20, 100, 512, 1024, 4096]), WILD_LEN))
        flags = draw(mostly(st.just(data_flag), st.integers(0, 0xFFFF)))
        descs.append((addr, length, flags))
    status = draw(mostly(st.just(area + 0xFFF0), WILD_ADDR))
    descs.append((status, draw(mostly(st.just(1), st.integers(0, 600))), WRITE))
    return payload, descs, draw(st.integers(0, 3)) == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([8, 16, 32, 64]), read_only=st.booleans(), data=st.data())
def test_random_plausible_requests(size: int, read_only: bool, data: st.DataObject) -> None:
    """Chains laid out like a driver's, with hostile values sprinkled over every field.

    Random bytes alone rarely get past the chain walk; these reach the block
    code with every request type, sectors and lengths around the end of the
    disk, odd layouts, and bad addresses in any one descriptor.
    """
    with tempfile.TemporaryDirectory() as tmp:
        r = property_rig(tmp, read_only, size)
        try:
            drv = r.driver
            area = drv.alloc(AREA)
            r.mem.write(area, random.Random(data.draw(st.integers(0, 1 << 32))).randbytes(AREA))
            heads: list[int] = []
            free = list(range(size))
            rings = range(drv.desc_table, drv.used_ring + used_ring_bytes(size))
            clobbers_rings = False  # a device-writable buffer over the driver's own rings
            for _ in range(data.draw(st.integers(1, 8))):
                payload, descs, indirect = data.draw(plausible_request(area))
                clobbers_rings |= any(
                    f & WRITE and a < rings.stop and a + n > rings.start for a, n, f in descs
                )
                if descs[0][0] in range(area, area + 16 * 4096, 4096):
                    r.mem.write(descs[0][0], payload)
                chain = [
                    (a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1)
                    for i, (a, n, f) in enumerate(descs)
                ]
                if indirect:
                    table = drv.write_indirect_table(chain)
                    chain = [(table, 16 * len(chain), INDIRECT, 0)]
                if len(chain) > len(free):
                    break
                taken, free = free[: len(chain)], free[len(chain) :]
                for index, (a, n, f, nxt) in zip(taken, chain, strict=True):
                    drv.write_desc(index, a, n, f, taken[nxt] if nxt < len(taken) else 0)
                heads.append(taken[0])
                drv.push_avail(taken[0])
            r.blk.process_queue(0)
            if not clobbers_rings:
                used = drv.used_entries()
                assert [e.id for e in used] == heads
                assert not r.blk.needs_reset
                for elem in used:
                    assert elem.len <= PROP_SECTORS * SECTOR_SIZE + 1  # at most the disk, + status
            # Else disk data written over the rings (the descriptor table, say) may have turned
            # a later chain into garbage, which is refused and not returned, or broken the
            # rings, so the device needs a reset: either way the disk must still be intact and
            # a kick harmless.
            check_after(r, read_only)
        finally:
            r.close()
