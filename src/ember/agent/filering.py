"""File bytes through the shared region: ``file_ring_write`` and ``file_ring_read``.

The vsock file ops (:mod:`ember.agent.files`) move every byte through the emulated
guest kernel twice: once as vsock packets, once into the page cache. These move the
bytes through a slot of the VMM's shared region instead (:mod:`ember.ring`), which
this process has mapped, so only the page-cache copy is left: ``os.write`` straight
from the ring to the file, and ``readinto`` straight from the file into the ring.

The host leases the slot and lays it out as an empty ring before asking:

* ``file_ring_write {"path", "slot", "lease", "mode"?, "append"?}``: the host is the
  producer. The agent answers one empty ``DATA`` frame ("the ring is taken"), then
  consumes records (any kind; fragments need no joining in a byte stream) until a
  zero-length record, the end; then ``RESULT {"size"}``. As over vsock, a failing
  write is reported only after the end: the host sends everything first.
* ``file_ring_read {"path", "slot", "lease"}``: the agent is the producer, one
  record per ``readinto``, then ``RESULT {"size"}`` once every record is published.

Both keep their connection for the host's next request when asked (``"keepalive": true``;
``ember.protocol.KEPT_STREAM_OPS``), as a short exchange does.

``RingUnavailable`` (no region here, a slot or lease that does not match what this
agent sees) makes the host use vsock; an agent from before this module answers
``BadRequest`` (unknown op), which does the same. Wake-ups go the way the rings'
doorbells go elsewhere: the host writes any byte on the connection to a guest that
sleeps; the guest stores to the slot's doorbell (an ioeventfd) for a host that does.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from ember import ring
from ember.agent import shm
from ember.agent.channels import wait_for_wake
from ember.agent.common import BadRequest, ClientGone, kept_stream, opt_int, req_path
from ember.agent.files import Upload
from ember.protocol import Kind, write_frame, write_json

__all__ = ["FILE_RING_OPS", "RingUnavailable", "Slot", "leased_slot"]

SPIN_S = 0.002  # a consumer with nothing to read polls this long (user time) before it sleeps
MAP_READ_MIN = 256 << 10  # a file this big is read through a mapping (see _mapped)


class RingUnavailable(Exception):
    """This agent cannot use the slot the host named: the host falls back to vsock."""


class Slot:
    """The leased slot as this process maps it (checked against the host's request)."""

    def __init__(self, req: dict[str, Any]) -> None:
        region = shm.region()
        if region is None:
            raise RingUnavailable("this guest has no shared region mapped")
        index, lease = opt_int(req, "slot"), opt_int(req, "lease")
        if index is None or lease is None or not lease:
            raise RingUnavailable("the request names no slot and lease")
        if not 0 <= index < region.slot_count - ring.CODE_SLOTS:
            raise RingUnavailable(f"slot {index} is not a data slot of this region")
        whole = region.slot(index)
        self.ctl = whole[: ring.PAGE].cast("Q")
        self.data = whole[ring.PAGE :]
        if self.ctl[ring.LEASE] != lease or self.ctl[ring.CAPACITY] != len(self.data):
            raise RingUnavailable(f"slot {index} is not leased as the host says")
        self.bell = region.bell(index)


def leased_slot(req: dict[str, Any]) -> Slot | None:
    """The slot a request names, if it names one this agent can use (else None: vsock)."""
    if req.get("slot") is None:
        return None
    try:
        return Slot(req)
    except (RingUnavailable, BadRequest, OSError, ValueError):
        return None


def handle_file_ring_write(conn: socket.socket, req: dict[str, Any]) -> None:
    slot = Slot(req)
    reader = ring.RingReader(slot.ctl, slot.data, len(slot.data), len(slot.data))
    upload = Upload(req)
    write_frame(conn, Kind.DATA)  # the ring is taken: the host may start
    ended = False

    def use(view: memoryview) -> bool:
        nonlocal ended
        if not view.nbytes:  # the end
            ended = True
            return False
        upload.write(view)
        return True

    try:
        while not ended:
            if reader.take(use):
                if reader.producer_waiting():
                    slot.bell[0] = 1
                continue
            _await_producer(reader, conn)
        upload.finish()
    finally:
        upload.abort()
    write_json(conn, Kind.RESULT, {"size": upload.size, **_kept(req)})


def _kept(req: dict[str, Any]) -> dict[str, Any]:
    """The RESULT's promise that the connection carries the host's next request: asked for,
    and nothing of ours follows the RESULT. (Wake-up bytes the host sent and this side never
    read may; the host knows whether it sent any, and closes the connection if so.)"""
    return {"keepalive": True} if kept_stream(req) else {}


def _await_producer(reader: ring.RingReader, conn: socket.socket) -> None:
    """Nothing to consume: poll briefly (no syscall), then sleep until the host's byte."""
    deadline = time.perf_counter() + SPIN_S
    while time.perf_counter() < deadline:
        if reader.available():
            return
    reader.sleep(True)
    try:
        if not reader.available():
            wait_for_wake(conn, ClientGone)
    finally:
        reader.sleep(False)


def handle_file_ring_read(conn: socket.socket, req: dict[str, Any]) -> None:
    path = req_path(req)
    slot = Slot(req)
    with open(path, "rb", buffering=0) as f:
        writer = ring.RingWriter(slot.ctl, slot.data, slot.bell, lambda: wait_for_wake(conn))
        total = 0
        with _mapped(f) as source:
            if source is not None:
                while n := writer.fill(source.readinto, writer.max_record):
                    total += n
                f.seek(total)  # and on with readinto: what the file gained since its fstat
        while n := writer.fill(f.readinto, writer.max_record):
            total += n
    write_json(conn, Kind.RESULT, {"size": total, **_kept(req)})


class _MappedSource:
    """A file's bytes read through a mapping: user-space copies out of the page cache."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._offset = 0

    def readinto(self, buf: memoryview) -> int:
        n = min(buf.nbytes, self._view.nbytes - self._offset)
        buf[:n] = self._view[self._offset : self._offset + n]
        self._offset += n
        return n


@contextlib.contextmanager
def _mapped(f: BinaryIO) -> Iterator[_MappedSource | None]:
    """``f`` mapped read-only if it is a regular file of at least :data:`MAP_READ_MIN`
    bytes, else None (and None if it cannot be mapped: the caller reads it).

    ``readinto`` has the guest kernel copy every byte, which this host emulates (~3 MB/s:
    10 MiB in ~3 s); through a mapping the kernel only maps the page cache (one fault per
    huge page, or per 16 pages with fault-around) and the copy runs in user mode, natively
    (10 MiB in 0.09-0.16 s measured in a sandbox). A smaller file costs the mapping more
    than it saves. A file truncated under the mapping by a guest program would kill this
    process with SIGBUS: that program is root in its own guest and could as well.
    """
    try:
        info = os.fstat(f.fileno())
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size < MAP_READ_MIN:
        yield None
        return
    try:
        mapping = mmap.mmap(f.fileno(), info.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError):  # a file system that cannot map, a size that changed
        yield None
        return
    try:
        with memoryview(mapping) as view:
            yield _MappedSource(view)
    finally:
        mapping.close()


FILE_RING_OPS = {
    "file_ring_write": handle_file_ring_write,
    "file_ring_read": handle_file_ring_read,
}
