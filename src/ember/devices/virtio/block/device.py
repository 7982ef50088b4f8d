"""virtio-blk over a host file: read, write, flush, get-id, discard and write-zeroes.

Requests are served synchronously in the event thread with ``preadv`` and
``pwritev`` straight between the file and guest memory (no copies), so a
request is completed only once the host I/O is done, and ``fdatasync`` makes
FLUSH durable.  Every sector and length comes from the guest and is checked
against the disk; a bad request gets ``VIRTIO_BLK_S_IOERR`` (or is dropped
with length 0 when it has nowhere to put a status byte), never an exception.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ember.devices.virtio.block.request import (
    BufferList,
    fallocate_punch_hole,
)
from ember.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
)
from ember.devices.virtio.queue import DescriptorChain
from ember.errors import ConfigError
from ember.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take one descriptor each
SIZE_MAX = 1 << 20  # largest single segment we accept
MAX_DISCARD_SECTORS = (1 << 32) - 1
MAX_DISCARD_SEG = 32
_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector
_DISCARD = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes


@dataclass
class BlockStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0
    unsupported: int = 0


class Block(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, path: Path, *, read_only: bool = False, serial: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            mode = "read-only" if read_only else "read-write"
            raise ConfigError(f"cannot open disk {path} {mode}: {exc.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size < SECTOR_SIZE:
            os.close(self.fd)
            raise ConfigError(f"disk {path} is smaller than one 512-byte sector")
        self.capacity = size >> SECTOR_SHIFT  # in sectors; a partial last sector is not exposed
        ident = (serial if serial is not None else path.name).encode()[:VIRTIO_BLK_ID_BYTES]
        self.serial = ident
        self.stats = BlockStats()
        self.discard_supported = not read_only

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self.stats)

    def device_features(self) -> int:
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
        )
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.discard_supported:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def read_config(self, offset: int, size: int) -> bytes:
        config = bytearray(60)  # struct virtio_blk_config up to write_zeroes_may_unmap
        struct.pack_into("<QII", config, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", config, 20, SECTOR_SIZE)  # blk_size
        struct.pack_into("<H", config, 34, 1)  # num_queues
        struct.pack_into("<III", config, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        struct.pack_into("<IIB", config, 48, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        return bytes(config[offset : offset + size])

    def process_queue(self, index: int) -> None:
        self.serve_queue(index, self._handle)

    # --- one request
    def _handle(self, chain: DescriptorChain) -> int:
        memory = self.memory
        assert memory is not None
        readable = BufferList(chain.readable)
        writable = BufferList(chain.writable)
        if writable.total == 0:
            self.stats.errors += 1
            return 0  # nowhere to put the status byte: drop the request
        status_at = writable.total - 1
        try:
            if readable.total < _OUTHDR.size:
                raise _RequestError("request header is short")
            rtype, _ioprio, sector = _OUTHDR.unpack(readable.read(memory, 0, _OUTHDR.size))
            written, status = self._dispatch(memory, rtype, sector, readable, writable)
        except _RequestError as exc:
            log.debug("virtio-blk %s: %s", self.path.name, exc)
            self.stats.errors += 1
            written, status = 0, VIRTIO_BLK_S_IOERR
        except GuestMemoryError as exc:
            log.debug("virtio-blk %s: %s", self.path.name, exc)
            self.stats.errors += 1
            written, status = 0, VIRTIO_BLK_S_IOERR
        try:
            writable.write(memory, status_at, bytes([status]))
        except GuestMemoryError:
            return 0
        return written + 1

    def _dispatch(
        self,
        memory: GuestMemory,
        rtype: int,
        sector: int,
        readable: BufferList,
        writable: BufferList,
    ) -> tuple[int, int]:
        """Returns (bytes written to the driver's buffers before the status, status)."""
        if rtype == VIRTIO_BLK_T_IN:
            length = writable.total - 1
            offset = self._check_range(sector, length)
            done = self._transfer(memory, writable, length, offset, write=False)
            self.stats.reads += 1
            self.stats.read_bytes += done
            return done, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise _RequestError("write to a read-only disk")
            length = readable.total - _OUTHDR.size
            offset = self._check_range(sector, length)
            done = self._transfer(memory, readable.skip(_OUTHDR.size), length, offset, write=True)
            self.stats.writes += 1
            self.stats.write_bytes += done
            return 0, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                os.fdatasync(self.fd)
            self.stats.flushes += 1
            return 0, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(VIRTIO_BLK_ID_BYTES, writable.total - 1)
            writable.write(memory, 0, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:n])
            return n, VIRTIO_BLK_S_OK
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self.discard_supported:
            return 0, self._discard(memory, readable, rtype)
        self.stats.unsupported += 1
        return 0, VIRTIO_BLK_S_UNSUPP

    def _check_range(self, sector: int, length: int) -> int:
        if length < 0 or length % SECTOR_SIZE:
            raise _RequestError(f"data length {length} is not a whole number of sectors")
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise _RequestError(f"sectors {sector}+{length >> SECTOR_SHIFT} beyond the disk")
        return sector << SECTOR_SHIFT

    def _transfer(
        self, memory: GuestMemory, buffers: BufferList, length: int, offset: int, *, write: bool
    ) -> int:
        views = buffers.views(memory, length)
        try:
            done = 0
            while done < length:
                remaining = _tail(views, done)
                try:
                    n = (os.pwritev if write else os.preadv)(self.fd, remaining, offset + done)
                finally:
                    for view in remaining:
                        view.release()
                if n <= 0:
                    raise _RequestError("short transfer: the disk file shrank")
                done += n
            return done
        except OSError as exc:
            raise _RequestError(f"host I/O error: {exc.strerror}") from None
        finally:
            for view in views:
                view.release()

    def _discard(self, memory: GuestMemory, readable: BufferList, rtype: int) -> int:
        payload = readable.total - _OUTHDR.size
        if payload <= 0 or payload % _DISCARD.size or payload // _DISCARD.size > MAX_DISCARD_SEG:
            raise _RequestError("malformed discard segment list")
        data = readable.read(memory, _OUTHDR.size, payload)
        # §5.2.6.2: DISCARD takes no flags; WRITE_ZEROES only "unmap" (we always unmap).
        allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
        segments = [
            _DISCARD.unpack_from(data, i * _DISCARD.size) for i in range(payload // _DISCARD.size)
        ]
        if any(flags & ~allowed for _, _, flags in segments):
            self.stats.unsupported += 1
            return VIRTIO_BLK_S_UNSUPP
        for sector, count, _flags in segments:
            offset = self._check_range(sector, count << SECTOR_SHIFT)
            try:
                fallocate_punch_hole(self.fd, offset, count << SECTOR_SHIFT)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self.discard_supported = False
                    return VIRTIO_BLK_S_UNSUPP
                raise _RequestError(f"discard failed: {exc.strerror}") from None
        return VIRTIO_BLK_S_OK

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _RequestError(Exception):
    """A request the device refuses (it completes with IOERR)."""


def _tail(views: list[memoryview], skip: int) -> list[memoryview]:
    """New views of ``views`` minus the first ``skip`` bytes (after a short transfer)."""
    out = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:])
        skip = 0
    return out
