"""The SDK's ring channels without KVM: a host memfd stands in for the VMM's region.

A "guest" thread here speaks the channel protocol over a Unix socket, asks for a
ring, maps the same memfd and produces with ``ember.ring.RingWriter``; the
ChannelServer leases it a slot and pumps the ring into ``channel(name)``. So the
lease handshake, the doorbell, the end of stream, a crash and a hostile ring are
all checked against the real server code.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember import protocol, ring
from ember.client import ChannelServer, HostRegion
from ember.errors import ProtocolError

SLOT_COUNT = 2
SLOT_SIZE = 64 << 10
LEASE = struct.Struct("<QQ")


class Region:
    """A memfd laid out like the VMM's region, with eventfds for doorbells."""

    def __init__(self) -> None:
        self.size = ring.region_size(SLOT_COUNT, SLOT_SIZE)
        self.memfd = os.memfd_create("test-shm", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.size)
        self.bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(SLOT_COUNT)]
        self.guest = mmap.mmap(self.memfd, self.size)

    def host(self) -> HostRegion:
        return HostRegion(os.dup(self.memfd), [os.dup(b) for b in self.bells], self.size, SLOT_SIZE)

    def close(self) -> None:
        for fd in [self.memfd, *self.bells]:
            os.close(fd)


class Bell:
    """A doorbell the producer writes: here an eventfd write, as the ioeventfd would do."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __setitem__(self, index: int, value: int) -> None:
        os.write(self.fd, (1).to_bytes(8, "little"))


def wait(sock: socket.socket) -> None:
    sock.recv(100)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Region, ChannelServer, str]]:
    region = Region()
    path = str(tmp_path / "ch.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    server = ChannelServer(listener, shm=region.host)
    yield region, server, path
    server.close()
    region.close()


Body = Callable[[ring.RingWriter | None, socket.socket], None]


def guest(region: Region, path: str, name: str, body: Body) -> threading.Thread:
    def run() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        protocol.write_frame(
            sock, protocol.Kind.REQUEST, b'{"op":"channel","name":"%s","ring":1}' % name.encode()
        )
        frame = protocol.read_frame(sock)
        assert frame is not None
        writer = None
        if frame[0] is protocol.Kind.DATA:
            slot, lease = LEASE.unpack(frame[1])
            offset = ring.SLOT_BASE + slot * SLOT_SIZE
            view = memoryview(region.guest)[offset : offset + SLOT_SIZE]
            ctl = view[: ring.PAGE].cast("Q")
            assert ctl[ring.LEASE] == lease
            bell = Bell(region.bells[slot])
            writer = ring.RingWriter(ctl, view[ring.PAGE :], bell, lambda: wait(sock))  # type: ignore[arg-type]
        body(writer, sock)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_messages_come_through_the_ring_and_end_with_the_stream(
    setup: tuple[Region, ChannelServer, str],
) -> None:
    region, server, path = setup
    sent = [bytes([i % 256]) * (i * 997 % 40000) for i in range(300)]  # ~6 MiB via 64 KiB

    def body(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        assert writer is not None
        for message in sent:
            writer.send(memoryview(message))
        protocol.write_frame(sock, protocol.Kind.DATA_EOF)
        sock.close()

    thread = guest(region, path, "a", body)
    assert list(server.channel("a", timeout=30)) == sent
    thread.join()
    assert server.ring_leases == 1


def test_all_slots_leased_means_vsock_and_a_slot_is_reused_after_its_end(
    setup: tuple[Region, ChannelServer, str],
) -> None:
    region, server, path = setup
    hold = threading.Event()
    writers: list[ring.RingWriter | None] = []

    def holder(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        writers.append(writer)
        hold.wait(30)
        protocol.write_frame(sock, protocol.Kind.DATA_EOF)
        sock.close()

    def fallback(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        writers.append(writer)
        protocol.write_frame(sock, protocol.Kind.DATA, b"over the socket")
        protocol.write_frame(sock, protocol.Kind.DATA_EOF)
        sock.close()

    holders = [guest(region, path, f"h{i}", holder) for i in range(SLOT_COUNT)]
    streams = [server.channel(f"h{i}", timeout=30) for i in range(SLOT_COUNT)]
    third = guest(region, path, "third", fallback)
    assert list(server.channel("third", timeout=30)) == [b"over the socket"]
    third.join()
    assert writers.count(None) == 1  # the third got no ring
    hold.set()
    for stream, thread in zip(streams, holders, strict=True):
        assert list(stream) == []
        thread.join()
    old = next(w for w in writers if w is not None)
    deadline = time.monotonic() + 30
    while old._ctl[ring.LEASE] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the receiving thread releases the slot just after the stream's end
    with pytest.raises(BrokenPipeError):  # its lease ended with the stream
        old.send(memoryview(b"late"))


def test_a_guest_gone_without_eof_raises_after_what_it_published(
    setup: tuple[Region, ChannelServer, str],
) -> None:
    region, server, path = setup

    def body(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        assert writer is not None
        for i in range(10):
            writer.send(memoryview(bytes([i]) * 100))
        sock.close()  # a crash: no DATA_EOF

    thread = guest(region, path, "crash", body)
    got: list[bytes] = []
    with pytest.raises(ProtocolError, match="without DATA_EOF"):
        for message in server.channel("crash", timeout=30):
            got.append(message)
    thread.join()
    assert got == [bytes([i]) * 100 for i in range(10)]


def test_a_hostile_ring_fails_its_stream_only(setup: tuple[Region, ChannelServer, str]) -> None:
    region, server, path = setup

    def body(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        assert writer is not None
        writer.send(memoryview(b"fine"))
        while writer._ctl[ring.TAIL] == 0:  # the host took it
            pass
        writer._ctl[ring.HEAD] = 1 << 40  # a head no ring can have
        Bell(region.bells[0])[0] = 1
        sock.recv(1)  # until the host hangs up

    thread = guest(region, path, "evil", body)
    got: list[bytes] = []
    with pytest.raises(ProtocolError, match="broke its ring"):
        for message in server.channel("evil", timeout=30):
            got.append(message)
    thread.join(10)
    assert got == [b"fine"]

    # The server still serves other channels, through the freed slot.
    def good(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        assert writer is not None
        writer.send(memoryview(b"next"))
        protocol.write_frame(sock, protocol.Kind.DATA_EOF)
        sock.close()

    guest(region, path, "good", good).join(0)
    assert list(server.channel("good", timeout=30)) == [b"next"]


def test_ring_requests_racing_the_first_region_answer_all_get_a_ring(tmp_path: Path) -> None:
    """The region is asked for on the first ring request; requests that arrive while that
    answer is on its way must wait for it, not fall back to vsock with slots free."""
    region = Region()
    asked = threading.Event()

    def slow_region() -> HostRegion:
        asked.set()
        time.sleep(0.3)  # the VMM's answer over its control socket takes a while
        return region.host()

    path = str(tmp_path / "ch.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    server = ChannelServer(listener, shm=slow_region)
    writers: list[ring.RingWriter | None] = []

    def body(writer: ring.RingWriter | None, sock: socket.socket) -> None:
        writers.append(writer)
        protocol.write_frame(sock, protocol.Kind.DATA_EOF)
        sock.close()

    try:
        first = guest(region, path, "a", body)
        assert asked.wait(10)
        second = guest(region, path, "b", body)
        assert list(server.channel("a", timeout=30)) == []
        assert list(server.channel("b", timeout=30)) == []
        first.join(10)
        second.join(10)
        assert len(writers) == 2 and None not in writers
        assert server.ring_leases == 2
    finally:
        server.close()
        region.close()
