"""virtio-vsock (virtio 1.2 §5.10) bridged to Unix sockets, with a fake driver playing the guest.

The guest side is three real split rings (rx, tx, event) in a GuestMemory,
written by :class:`VirtioDriver`; the host side is real Unix sockets in
``tmp_path`` and a real :class:`EventLoop` thread serving them.  Rx buffers are
laid out like Linux 6.1 does (a 44-byte header descriptor, then a 4 KiB
payload descriptor) unless a test says otherwise.  Nothing sleeps longer than
a few milliseconds at a time: every wait polls with a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ember.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK, Interrupt
from ember.devices.virtio.mmio import MmioTransport
from ember.devices.virtio.queue import Queue
from ember.devices.virtio.vsock import Vsock
from ember.devices.virtio.vsock.device import EVENT_QUEUE, QUEUE_SIZES, RX_QUEUE, TX_QUEUE
from ember.devices.virtio.vsock.host import HandshakeError, parse_connect
from ember.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_SEQPACKET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    VsockHeader,
)
from ember.devices.virtio.vsock.state import CONN_TX_BUF_SIZE
from ember.devices.virtio.vsock.table import LOCAL_PORT_MIN, MAX_PENDING_RESETS
from ember.errors import ConfigError
from ember.memory import GuestMemory
from ember.vmm.event_loop import EventLoop
from tests.fds import open_fds
from tests.unit.virtio_driver import VirtioDriver

GUEST_CID = 3
GUEST_BUF = 64 * 1024  # the buf_alloc the fake guest advertises
MEM_SIZE = 16 << 20
TIMEOUT = 5.0


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.002)


@dataclass
class Packet:
    hdr: VsockHeader
    payload: bytes

    @property
    def op(self) -> int:
        return self.hdr.op


class FakeGuest:
    """The guest's vsock driver: owns the three rings, gives rx buffers, sends tx packets."""

    def __init__(self, dev: Vsock, *, event_idx: bool = False) -> None:
        self.dev = dev
        self.mem = GuestMemory.anonymous(MEM_SIZE)
        # Each ring at its own 64 KiB slot, each driver with its own buffer area.
        mem = self.mem
        self.rx = VirtioDriver(mem, 256, desc_table=0x10000, data_start=1 << 20, data_end=7 << 20)
        self.tx = VirtioDriver(mem, 256, desc_table=0x20000, data_start=7 << 20, data_end=13 << 20)
        self.ev = VirtioDriver(mem, 16, desc_table=0x30000, data_start=13 << 20)
        self.queues = [Queue(size) for size in QUEUE_SIZES]
        for driver, queue in zip((self.rx, self.tx, self.ev), self.queues, strict=True):
            driver.configure(queue, event_idx=event_idx)
        self.interrupt = Interrupt()
        dev.acked_features = dev.device_features()
        dev.activate(self.mem, self.queues, self.interrupt)
        self.inbox: list[Packet] = []
        self.outstanding = 0

    def close(self) -> None:
        self.dev.close()
        self.interrupt.close()

    # -- rx ---------------------------------------------------------------------------------

    def give_rx(self, count: int, size: int = 4096, *, one_descriptor: bool = False) -> None:
        with self.dev.lock:
            for _ in range(count):
                if one_descriptor:  # newer kernels: header and payload in one buffer
                    self.rx.add_chain([], [HDR_SIZE + size])
                else:
                    self.rx.add_chain([], [HDR_SIZE, size])
                self.outstanding += 1
            self.dev.process_queue(RX_QUEUE)

    def poll(self) -> list[Packet]:
        with self.dev.lock:
            new = []
            for elem in self.rx.used_entries():
                self.outstanding -= 1
                data = self.rx.written(elem.id, elem.len)
                assert len(data) >= HDR_SIZE, "the device returned an rx buffer without a packet"
                hdr = VsockHeader.unpack(data[:HDR_SIZE])
                assert hdr.len == len(data) - HDR_SIZE
                new.append(Packet(hdr, data[HDR_SIZE:]))
        self.inbox.extend(new)
        return new

    def wait_packet(self, predicate: Callable[[Packet], bool], timeout: float = TIMEOUT) -> Packet:
        found: list[Packet] = []

        def check() -> bool:
            self.poll()
            for i, packet in enumerate(self.inbox):
                if predicate(packet):
                    found.append(self.inbox.pop(i))
                    return True
            return False

        wait_until(check, timeout)
        return found[0]

    def take(self, op: int) -> list[Packet]:
        """Remove and return every received packet with ``op``."""
        self.poll()
        taken = [p for p in self.inbox if p.op == op]
        self.inbox = [p for p in self.inbox if p.op != op]
        return taken

    # -- tx ---------------------------------------------------------------------------------

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = GUEST_BUF,
        fwd_cnt: int = 0,
        type: int = VIRTIO_VSOCK_TYPE_STREAM,
        src_cid: int = GUEST_CID,
        dst_cid: int = VMADDR_CID_HOST,
        length: int | None = None,
    ) -> None:
        size = len(payload) if length is None else length
        hdr = VsockHeader(
            src_cid, dst_cid, src_port, dst_port, size, type, op, flags, buf_alloc, fwd_cnt
        )
        self.send_raw([hdr.pack(), payload] if payload else [hdr.pack()])

    def send_raw(self, readable: list[bytes]) -> None:
        with self.dev.lock:
            self.tx.add_chain(readable, [])
            self.dev.process_queue(TX_QUEUE)
            assert len(self.tx.used_entries()) == 1


@pytest.fixture
def events() -> Iterator[EventLoop]:
    loop = EventLoop()
    loop.start()
    yield loop
    loop.close()
    assert loop.callback_errors == 0, "a device callback raised on the event thread"


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def dev(uds: Path, events: EventLoop) -> Iterator[Vsock]:
    device = Vsock(GUEST_CID, uds, events)
    yield device
    device.close()


@pytest.fixture
def guest(dev: Vsock) -> Iterator[FakeGuest]:
    g = FakeGuest(dev)
    yield g
    g.close()


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def host_connect(
    guest: FakeGuest, uds: Path, port: int, *, buf_alloc: int = GUEST_BUF, first: bytes = b""
) -> tuple[socket.socket, int]:
    """A host client's CONNECT, accepted by the guest; returns the client and its host port."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(str(uds))
    client.sendall(f"CONNECT {port}\n".encode() + first)
    request = guest.wait_packet(
        lambda p: p.op == VIRTIO_VSOCK_OP_REQUEST and p.hdr.dst_port == port
    )
    local_port = request.hdr.src_port
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, port, local_port, buf_alloc=buf_alloc)
    assert read_line(client) == f"OK {local_port}\n".encode()
    return client, local_port


def guest_data(guest: FakeGuest, local: int, peer: int, n: int) -> bytes:
    """Collect ``n`` bytes of RW payload sent to guest port ``peer`` from host port ``local``."""
    data = b""
    while len(data) < n:
        packet = guest.wait_packet(
            lambda p: (
                p.op == VIRTIO_VSOCK_OP_RW and (p.hdr.src_port, p.hdr.dst_port) == (local, peer)
            )
        )
        data += packet.payload
    return data


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- device basics ---------------------------------------------------------------------------


def test_identity_config_and_socket_file(dev: Vsock, uds: Path, events: EventLoop) -> None:
    assert dev.device_id == VIRTIO_ID_VSOCK == 19
    assert dev.queue_max_sizes == (256, 256, 16)
    assert dev.device_features() & (1 << VIRTIO_F_VERSION_1)
    assert dev.read_config(0, 8) == struct.pack("<Q", GUEST_CID)
    assert dev.read_config(4, 4) == b"\0\0\0\0"
    assert uds.is_socket()
    for cid in (0, 1, 2, 0xFFFF_FFFF):
        with pytest.raises(ConfigError):
            Vsock(cid, uds.with_name("x.sock"), events)
    with pytest.raises(ConfigError, match="longer"):
        Vsock(GUEST_CID, uds.with_name("x" * 120), events)


def test_transport_adopts_the_device_lock(dev: Vsock) -> None:
    mem = GuestMemory.anonymous(1 << 20)
    transport = MmioTransport(dev, mem, Interrupt())
    assert transport.lock is dev.lock


def test_stale_socket_file_is_replaced(uds: Path, events: EventLoop) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(uds))
    stale.close()  # the file stays behind, as after a crash
    device = Vsock(GUEST_CID, uds, events)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(uds))
        probe.close()
    finally:
        device.close()
    assert not uds.exists()


def test_parse_connect() -> None:
    assert parse_connect(b"CONNECT 52\n") == 52
    assert parse_connect(b"connect 4294967295\n") == 0xFFFF_FFFF
    bad_lines = [b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 4294967296\n", b"HELLO 5\n"]
    bad_lines += [b"CONNECT 5 6\n", b"CONNECT \xff\n", b"CONNECT 0x10\n"]
    for bad in bad_lines:
        with pytest.raises(HandshakeError):
            parse_connect(bad)


# -- host-initiated ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_host_connect_handshake_and_data_both_ways(dev: Vsock, uds: Path, event_idx: bool) -> None:
    guest = FakeGuest(dev, event_idx=event_idx)
    try:
        guest.give_rx(8)
        client, local = host_connect(guest, uds, 52)
        assert local >= LOCAL_PORT_MIN
        assert (local, 52) in dev.muxer.connections

        client.sendall(b"hello")
        assert guest_data(guest, local, 52, 5) == b"hello"
        guest.send(VIRTIO_VSOCK_OP_RW, 52, local, b"world")
        assert recv_exactly(client, 5) == b"world"

        # Every header carries our credit: buf_alloc and what we forwarded so far.
        guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 52, local)
        update = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        assert (update.hdr.buf_alloc, update.hdr.fwd_cnt) == (CONN_TX_BUF_SIZE, 5)
        assert (update.hdr.src_cid, update.hdr.dst_cid) == (VMADDR_CID_HOST, GUEST_CID)

        # The host half-closes: the guest hears SHUTDOWN(SEND) and may still answer.
        client.shutdown(socket.SHUT_WR)
        shutdown = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_SHUTDOWN)
        assert shutdown.hdr.flags == VIRTIO_VSOCK_SHUTDOWN_SEND
        guest.send(VIRTIO_VSOCK_OP_RW, 52, local, b"late reply")
        assert recv_exactly(client, 10) == b"late reply"

        # The guest closes (SHUTDOWN both): we answer RST and close the host socket.
        guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 52, local, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH)
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST and p.hdr.src_port == local)
        assert is_closed(client)
        wait_until(lambda: not dev.muxer.connections)
        assert dev.stats.bad_packets == 0
        client.close()
    finally:
        guest.close()


def test_data_pipelined_behind_the_connect_line(guest: FakeGuest, uds: Path) -> None:
    guest.give_rx(8, one_descriptor=True)
    client, local = host_connect(guest, uds, 9, first=b"early bytes")
    assert guest_data(guest, local, 9, 11) == b"early bytes"
    client.close()


def test_guest_refuses_host_connect(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(4)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(str(uds))
    client.sendall(b"CONNECT 77\n")
    request = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_REQUEST)
    guest.send(VIRTIO_VSOCK_OP_RST, 77, request.hdr.src_port)
    assert is_closed(client)
    wait_until(lambda: not dev.muxer.connections)
    assert not guest.take(VIRTIO_VSOCK_OP_RST)  # an RST is never answered
    client.close()


def test_host_connect_times_out_without_an_answer(uds: Path, events: EventLoop) -> None:
    device = Vsock(GUEST_CID, uds, events, connect_timeout=0.05)
    guest = FakeGuest(device)
    try:
        guest.give_rx(4)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        client.connect(str(uds))
        client.sendall(b"CONNECT 5\n")
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_REQUEST)
        assert is_closed(client)
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
        wait_until(lambda: not device.muxer.connections)
        client.close()
    finally:
        guest.close()


@pytest.mark.parametrize(
    "line",
    [b"HELLO\n", b"CONNECT\n", b"CONNECT 99999999999\n", b"CONNECT " + b"1" * 100, b"\xff\xfe\n"],
)
def test_bad_connect_lines_are_closed(guest: FakeGuest, uds: Path, dev: Vsock, line: bytes) -> None:
    guest.give_rx(4)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(str(uds))
    client.sendall(line)
    assert is_closed(client)
    assert dev.stats.handshake_errors == 1
    assert not guest.poll() and not dev.muxer.connections
    client.close()


# -- guest-initiated --------------------------------------------------------------------------


def listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(TIMEOUT)
    return listener


def test_guest_connects_to_a_host_listener(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    listener = listen(f"{uds}_1234")
    guest.give_rx(8)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5000, 1234)
    response = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
    assert (response.hdr.src_port, response.hdr.dst_port) == (1234, 5000)
    assert response.hdr.dst_cid == GUEST_CID and response.hdr.type == VIRTIO_VSOCK_TYPE_STREAM
    host, _ = listener.accept()
    host.settimeout(TIMEOUT)

    guest.send(VIRTIO_VSOCK_OP_RW, 5000, 1234, b"request")
    assert recv_exactly(host, 7) == b"request"
    # Guest half-close: the host reads EOF, and can still answer.
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 5000, 1234, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert host.recv(1) == b""
    host.sendall(b"answer")
    assert guest_data(guest, 1234, 5000, 6) == b"answer"
    host.close()
    # Both directions over: we send SHUTDOWN(both) and the guest answers RST.
    shutdown = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_SHUTDOWN)
    assert shutdown.hdr.flags == VIRTIO_VSOCK_SHUTDOWN_BOTH
    guest.send(VIRTIO_VSOCK_OP_RST, 5000, 1234)
    wait_until(lambda: not dev.muxer.connections)
    listener.close()


def test_guest_connect_to_nothing_gets_rst(guest: FakeGuest, dev: Vsock) -> None:
    guest.give_rx(4)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5001, 4321)
    rst = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
    assert (rst.hdr.src_port, rst.hdr.dst_port, rst.hdr.dst_cid) == (4321, 5001, GUEST_CID)
    assert dev.stats.refused == 1 and not dev.muxer.connections


def test_close_times_out_when_the_guest_never_resets(uds: Path, events: EventLoop) -> None:
    device = Vsock(GUEST_CID, uds, events, close_timeout=0.05)
    guest = FakeGuest(device)
    listener = listen(f"{uds}_80")
    try:
        guest.give_rx(8)
        guest.send(VIRTIO_VSOCK_OP_REQUEST, 6000, 80)
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
        host, _ = listener.accept()
        host.close()
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_SHUTDOWN)
        guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 6000, 80, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)  # no RST from the guest
        wait_until(lambda: not device.muxer.connections)
    finally:
        listener.close()
        guest.close()


# -- credit -----------------------------------------------------------------------------------


def test_credit_limits_what_the_host_sends(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(32)
    client, local = host_connect(guest, uds, 52, buf_alloc=GUEST_BUF)
    data = os.urandom(1 << 20)
    sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
    sender.start()

    got = guest_data(guest, local, 52, GUEST_BUF)
    assert len(got) == GUEST_BUF
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    time.sleep(0.1)
    assert not guest.take(VIRTIO_VSOCK_OP_RW), "data beyond the guest's credit"
    assert dev.muxer.connections[(local, 52)].peer_credit() == 0

    while len(got) < len(data):  # the guest consumes and says so; more flows each time
        guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, local, fwd_cnt=len(got))
        want = min(len(got) + GUEST_BUF, len(data))
        while len(got) < want:
            if guest.outstanding < 16:
                guest.give_rx(32)
            got += guest_data(guest, local, 52, 1)
        assert len(got) == want
    assert got == data
    sender.join(TIMEOUT)
    client.close()


def test_no_credit_and_a_closed_host_does_not_spin(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(16)
    client, local = host_connect(guest, uds, 52, buf_alloc=4096)
    client.sendall(b"x" * 10000)
    client.close()  # EOF (and HUP) pending behind data the guest has no room for
    assert len(guest_data(guest, local, 52, 4096)) == 4096
    calls = count_host_wakeups(dev, 0.15)
    assert calls <= 3, f"{calls} wakeups while nothing could be done"
    guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, local, buf_alloc=1 << 20, fwd_cnt=4096)
    assert len(guest_data(guest, local, 52, 10000 - 4096)) == 10000 - 4096
    shutdown = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_SHUTDOWN)
    assert shutdown.hdr.flags & VIRTIO_VSOCK_SHUTDOWN_SEND


def count_host_wakeups(dev: Vsock, seconds: float) -> int:
    """How often the event thread served the device's host fds during ``seconds``."""
    calls = 0
    original = dev.muxer.handle_events

    def counting() -> None:
        nonlocal calls
        calls += 1
        original()

    dev.muxer.handle_events = counting  # type: ignore[method-assign]
    try:
        time.sleep(seconds)
    finally:
        dev.muxer.handle_events = original  # type: ignore[method-assign]
    return calls


def test_no_rx_buffers_stops_polling_until_the_rx_kick(
    guest: FakeGuest, uds: Path, dev: Vsock
) -> None:
    guest.give_rx(2)
    client, local = host_connect(guest, uds, 52, buf_alloc=1 << 20)
    data = os.urandom(256 * 1024)
    sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
    sender.start()
    got = guest_data(guest, local, 52, 1)
    wait_until(lambda: dev.muxer.rx_starved)
    calls = count_host_wakeups(dev, 0.15)
    assert calls <= 3, f"{calls} wakeups with no rx buffer to fill"
    while len(got) < len(data):
        if guest.outstanding < 8:
            guest.give_rx(16)
        got += guest_data(guest, local, 52, 1)
    assert got == data
    sender.join(TIMEOUT)
    client.close()


def test_guest_ignoring_credit_is_reset_and_memory_stays_bounded(
    guest: FakeGuest, uds: Path, dev: Vsock
) -> None:
    listener = listen(f"{uds}_700")
    guest.give_rx(8)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 1000, 700)
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
    host, _ = listener.accept()  # and never read: the host socket fills up
    chunk = os.urandom(MAX_PKT_BUF_SIZE)
    sent = 0
    for _ in range(64):  # 4 MiB against a 256 KiB window, never waiting for credit
        guest.send(VIRTIO_VSOCK_OP_RW, 1000, 700, chunk)
        sent += len(chunk)
        conn = dev.muxer.connections.get((700, 1000))
        if conn is not None:
            assert len(conn.tx_buf) <= CONN_TX_BUF_SIZE
    assert dev.stats.credit_violations == 1
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST and p.hdr.dst_port == 1000)
    assert (700, 1000) not in dev.muxer.connections
    received = 0
    host.settimeout(TIMEOUT)
    while chunk_in := host.recv(1 << 16):
        received += len(chunk_in)
    assert 0 < received < sent  # what the host kernel took; then EOF
    host.close()
    listener.close()


@pytest.mark.parametrize("flags", [VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_SHUTDOWN_BOTH])
def test_shutdown_waits_for_buffered_data_and_credit_updates_flow(
    guest: FakeGuest, uds: Path, dev: Vsock, flags: int
) -> None:
    listener = listen(f"{uds}_90")
    guest.give_rx(16)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 2000, 90)
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
    host, _ = listener.accept()
    host.settimeout(TIMEOUT)
    data = os.urandom(CONN_TX_BUF_SIZE)  # exactly our window: more than the host socket holds
    for offset in range(0, len(data), MAX_PKT_BUF_SIZE):
        guest.send(VIRTIO_VSOCK_OP_RW, 2000, 90, data[offset : offset + MAX_PKT_BUF_SIZE])
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 2000, 90, flags=flags)
    conn = dev.muxer.connections[(90, 2000)]
    assert conn.tx_buf, "the host socket took everything: the test proves nothing"
    assert dev.stats.credit_violations == 0
    received = b""
    while chunk := host.recv(1 << 16):  # EOF only after the last buffered byte
        received += chunk
    assert received == data
    # As the buffer drained we told the guest, unasked, that its window reopened.
    updates = guest.take(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    assert updates and updates[-1].hdr.fwd_cnt >= len(data) - MAX_PKT_BUF_SIZE
    if flags == VIRTIO_VSOCK_SHUTDOWN_BOTH:  # the guest closed: RST once all was delivered
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
    else:  # half-closed: the host can still answer
        host.sendall(b"bye")
        assert guest_data(guest, 90, 2000, 3) == b"bye"
    host.close()
    listener.close()


@pytest.mark.parametrize("reader", ["slow", "absent"])
def test_guest_close_lingers_for_a_slow_host_reader(
    uds: Path, events: EventLoop, reader: str
) -> None:
    linger = 0.05 if reader == "absent" else 30.0
    device = Vsock(GUEST_CID, uds, events, close_timeout=0.02, linger_timeout=linger)
    guest = FakeGuest(device)
    listener = listen(f"{uds}_91")
    try:
        guest.give_rx(8)
        guest.send(VIRTIO_VSOCK_OP_REQUEST, 2001, 91)
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
        host, _ = listener.accept()
        host.settimeout(TIMEOUT)
        data = os.urandom(CONN_TX_BUF_SIZE)
        for offset in range(0, len(data), MAX_PKT_BUF_SIZE):
            guest.send(VIRTIO_VSOCK_OP_RW, 2001, 91, data[offset : offset + MAX_PKT_BUF_SIZE])
        guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 2001, 91, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH)
        assert device.muxer.connections[(91, 2001)].tx_buf
        time.sleep(0.15)  # well past close_timeout: a slow reader must not lose the tail
        if reader == "slow":
            assert not guest.take(VIRTIO_VSOCK_OP_RST)
            received = b""
            while chunk := host.recv(1 << 16):
                received += chunk
            assert received == data
        else:
            wait_until(lambda: device.stats.host_errors == 1)  # given up on: buffer freed
        guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
        wait_until(lambda: not device.muxer.connections)
        host.close()
    finally:
        listener.close()
        guest.close()


def test_rst_flood_without_rx_buffers_is_bounded(guest: FakeGuest, dev: Vsock) -> None:
    for port in range(MAX_PENDING_RESETS + 100):
        guest.send(VIRTIO_VSOCK_OP_RW, 20000 + port, 9, b"x")  # no such connection
    assert dev.stats.dropped_resets == 100
    assert len(dev.muxer._resets) == MAX_PENDING_RESETS
    resets: list[Packet] = []

    def drained() -> bool:
        resets.extend(guest.take(VIRTIO_VSOCK_OP_RST))
        return guest.outstanding == 0

    for _ in range(MAX_PENDING_RESETS // 64):
        guest.give_rx(64)
        wait_until(drained)
    assert [p.hdr.dst_port for p in resets] == list(range(20000, 20000 + MAX_PENDING_RESETS))
    assert not dev.muxer.has_rx_work() and dev.stats.bad_packets == 0


# -- hostile packets ----------------------------------------------------------------------------


def test_malformed_packets_are_counted_and_dropped(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(16)
    client, local = host_connect(guest, uds, 52)
    big = MAX_PKT_BUF_SIZE + 1
    dropped: list[tuple[bytes, dict[str, int]]] = [
        (b"", {"src_cid": 99}),
        (b"", {"src_cid": VMADDR_CID_HOST}),
        (b"", {"dst_cid": 7}),
        (b"only ten b", {"length": 100}),  # len beyond the chain
        (b"z" * big, {"length": big}),  # beyond the 64 KiB packet limit
    ]
    for payload, fields in dropped:
        guest.send(VIRTIO_VSOCK_OP_RW, 52, local, payload, **fields)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 52, 4444, b"payload on a REQUEST")
    guest.send_raw([b"short"])
    assert dev.stats.bad_packets == len(dropped) + 2
    assert (local, 52) in dev.muxer.connections  # none of them touched the connection

    # A well-addressed packet with a bad type or op is answered with RST.
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 7001, 9, type=VIRTIO_VSOCK_TYPE_SEQPACKET)
    guest.send(42, 7002, 9)
    guest.send(0, 7003, 9)  # VIRTIO_VSOCK_OP_INVALID
    for port in (7001, 7002, 7003):
        rst = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
        assert rst.hdr.dst_port == port
    assert dev.stats.bad_packets == len(dropped) + 5
    # ... and on a live connection it resets that connection.
    guest.send(42, 52, local)
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST and p.hdr.src_port == local)
    assert is_closed(client)
    assert not dev.needs_reset and dev.stats.bad_packets == len(dropped) + 6
    # The device still works.
    client2, local2 = host_connect(guest, uds, 53)
    client2.sendall(b"ok")
    assert guest_data(guest, local2, 53, 2) == b"ok"
    client.close()
    client2.close()


def test_rx_buffers_too_small_are_returned_empty(guest: FakeGuest, dev: Vsock) -> None:
    with dev.lock:
        guest.rx.add_chain([], [HDR_SIZE - 1])
        guest.outstanding += 1
    guest.give_rx(2)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 5001, 4321)  # refused: an RST is due
    wait_until(lambda: dev.stats.bad_rx_buffers == 1)
    with dev.lock:
        used = guest.rx.used_entries()
    assert used[0].len == 0
    guest.outstanding -= len(used)


# -- scale and life cycle ---------------------------------------------------------------------


def test_twenty_concurrent_connections(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(64)
    clients = [host_connect(guest, uds, 100 + i) for i in range(20)]
    assert len(dev.muxer.connections) == 20
    assert len({local for _, local in clients}) == 20
    for i, (client, _) in enumerate(clients):
        client.sendall(f"message {i:02d}".encode())
    echoed = 0
    while echoed < 20 * 10:  # the guest echoes every payload back where it came from
        packet = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RW)
        guest.send(VIRTIO_VSOCK_OP_RW, packet.hdr.dst_port, packet.hdr.src_port, packet.payload)
        echoed += len(packet.payload)
        if guest.outstanding < 16:
            guest.give_rx(32)
    for i, (client, _) in enumerate(clients):
        assert recv_exactly(client, 10) == f"message {i:02d}".encode()
        client.close()


def test_close_removes_the_socket_file_and_every_fd(uds: Path, events: EventLoop) -> None:
    before = open_fds()
    device = Vsock(GUEST_CID, uds, events)
    guest = FakeGuest(device)
    listener = listen(f"{uds}_81")
    guest.give_rx(16)
    client, _ = host_connect(guest, uds, 52)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(uds))  # never sends its CONNECT line
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 6000, 81)
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RESPONSE)
    host, _ = listener.accept()
    host.settimeout(TIMEOUT)
    idle.settimeout(TIMEOUT)
    wait_until(lambda: len(device.muxer._clients) == 1)

    guest.close()
    assert not uds.exists()
    assert is_closed(client) and is_closed(host) and is_closed(idle)
    for sock in (client, host, idle, listener):
        sock.close()
    guest.mem.close()
    assert open_fds() - before == set()
    device.close()  # twice is fine


def test_transport_reset_event(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(8)
    client, _ = host_connect(guest, uds, 52)
    dev.transport_reset()  # no event buffer yet: delivered on the event queue's kick
    assert is_closed(client)
    assert not dev.muxer.connections
    with dev.lock:
        head = guest.ev.add_chain([], [4])
        dev.process_queue(EVENT_QUEUE)
        used = guest.ev.used_entries()
    assert [(u.id, u.len) for u in used] == [(head, 4)]
    assert struct.unpack("<I", guest.ev.written(head, 4))[0] == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    client.close()
    # The device goes on working after the reset.
    client2, _ = host_connect(guest, uds, 53)
    client2.close()


def test_device_reset_forgets_connections(guest: FakeGuest, uds: Path, dev: Vsock) -> None:
    guest.give_rx(8)
    client, _ = host_connect(guest, uds, 52)
    dev.reset()
    assert is_closed(client) and not dev.muxer.connections and not dev.active
    assert uds.is_socket()  # the listener stays for the next driver
    client.close()


# -- socat --------------------------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped afterwards even if the test failed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def run_client(
    argv_or_uds: list[str] | Path, stdin: bytes, procs: list[subprocess.Popen[bytes]]
) -> Callable[[], bytes]:
    """socat when installed, else the same dance in Python: send, half-close, read to EOF."""
    if isinstance(argv_or_uds, list):
        proc = subprocess.Popen(argv_or_uds, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(stdin)
        proc.stdin.close()

        def wait_for_socat() -> bytes:
            assert proc.stdout is not None
            out = proc.stdout.read()
            assert proc.wait(TIMEOUT) == 0
            return out

        return wait_for_socat
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(str(argv_or_uds))
    sock.sendall(stdin)
    sock.shutdown(socket.SHUT_WR)

    def finish() -> bytes:
        out = b""
        while chunk := sock.recv(4096):
            out += chunk
        sock.close()
        return out

    return finish


SOCAT = shutil.which("socat")


def test_socat_talks_to_the_device(
    guest: FakeGuest, uds: Path, dev: Vsock, procs: list[subprocess.Popen[bytes]]
) -> None:
    guest.give_rx(16)
    # Host-initiated: socat STDIO UNIX-CONNECT:<uds>, speaking the handshake itself.
    argv = ["socat", "-t", "5", "STDIO", f"UNIX-CONNECT:{uds}"] if SOCAT else uds
    finish = run_client(argv, b"CONNECT 52\nping\n", procs)
    request = guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_REQUEST)
    local = request.hdr.src_port
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, 52, local)
    assert guest_data(guest, local, 52, 5) == b"ping\n"
    guest.send(VIRTIO_VSOCK_OP_RW, 52, local, b"pong\n")
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_SHUTDOWN)  # socat's stdin ended
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 52, local, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH)
    assert finish() == f"OK {local}\npong\n".encode()

    # Guest-initiated: a socat listener at <uds>_777 receives what the guest sends.
    path = f"{uds}_777"
    if SOCAT:
        argv = ["socat", "-u", f"UNIX-LISTEN:{path}", "STDOUT"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        procs.append(proc)
        wait_until(lambda: os.path.exists(path))
    else:
        listener = listen(path)
    for _ in range(100):  # socat binds the path a moment before it listens: retry on RST
        guest.send(VIRTIO_VSOCK_OP_REQUEST, 3000, 777)
        answer = guest.wait_packet(
            lambda p: (
                p.op in (VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST) and p.hdr.dst_port == 3000
            )
        )
        if answer.op == VIRTIO_VSOCK_OP_RESPONSE:
            break
        time.sleep(0.01)
    guest.send(VIRTIO_VSOCK_OP_RW, 3000, 777, b"hello from the guest\n")
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 3000, 777, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH)
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST and p.hdr.dst_port == 3000)
    if SOCAT:
        assert proc.communicate(timeout=TIMEOUT)[0] == b"hello from the guest\n"
    else:
        host, _ = listener.accept()
        assert host.recv(100) == b"hello from the guest\n"
        host.close()
        listener.close()


def restore_device(state: dict[str, Any], uds: Path, events: EventLoop, rx: int) -> FakeGuest:
    """A new device restored from ``state`` behind ``uds``, with ``rx`` buffers from its guest."""
    restored = Vsock(GUEST_CID, uds, events)
    fresh = FakeGuest(restored)
    restored.load_state(state)
    restored.restored()
    fresh.give_rx(rx)
    return fresh


def test_restore_resets_each_busy_connection_of_the_snapshot_first(
    guest: FakeGuest, uds: Path, dev: Vsock, events: EventLoop, tmp_path: Path
) -> None:
    guest.give_rx(8)
    client, local = host_connect(guest, uds, 1024)
    client.sendall(b"in flight")  # delivered to the guest, not yet acknowledged by it
    guest.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RW)
    state = dev.save_state()
    assert state == {"connections": [[local, 1024]], "resumable": [], "next_port": local + 1}
    fresh = restore_device(state, tmp_path / "restored.sock", events, 4)
    restored = fresh.dev
    try:
        rst = fresh.wait_packet(lambda p: p.op == VIRTIO_VSOCK_OP_RST)
        assert (rst.hdr.src_port, rst.hdr.dst_port, rst.hdr.dst_cid) == (local, 1024, GUEST_CID)
        assert restored.host_connections == 0  # nothing on the host side came along
    finally:
        fresh.close()
        client.close()


def test_a_restore_never_hands_out_a_port_the_snapshots_guest_has_seen(
    guest: FakeGuest, uds: Path, dev: Vsock, events: EventLoop, tmp_path: Path
) -> None:
    """A fork's first new connections took the parent's ports again; the guest, still holding
    a socket on one (its owner had not closed it), ignored the REQUEST: refused after 10 s."""
    guest.give_rx(8)
    used = []
    for _ in range(3):
        client, local = host_connect(guest, uds, 1024)
        used.append(local)
        client.close()
    state = dev.save_state()
    restored_uds = tmp_path / "restored.sock"
    fresh = restore_device(state, restored_uds, events, 8)
    try:
        client, local = host_connect(fresh, restored_uds, 1024)
        assert local > max(used)
        client.close()
    finally:
        fresh.close()


def test_a_quiet_connection_is_resumed_by_a_new_host_client(
    guest: FakeGuest, uds: Path, dev: Vsock, events: EventLoop, tmp_path: Path
) -> None:
    guest.give_rx(8)
    client, local = host_connect(guest, uds, 1024)
    state = dev.save_state()
    assert state["connections"] == [] and [r["local_port"] for r in state["resumable"]] == [local]
    restored_uds = tmp_path / "restored.sock"
    fresh = restore_device(state, restored_uds, events, 8)
    try:
        taker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        taker.settimeout(TIMEOUT)
        taker.connect(str(restored_uds))
        taker.sendall(b"RESUME 1024\nping")
        assert read_line(taker) == f"OK {local}\n".encode()
        assert guest_data(fresh, local, 1024, 4) == b"ping"  # no REQUEST: it was open already
        assert not fresh.take(VIRTIO_VSOCK_OP_REQUEST)
        fresh.send(VIRTIO_VSOCK_OP_RW, 1024, local, payload=b"pong")
        assert recv_exactly(taker, 4) == b"pong"
        other, other_port = host_connect(fresh, restored_uds, 1024)  # a new one meanwhile
        assert other_port != local  # the carried-over port stays reserved
        other.close()
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(TIMEOUT)
        second.connect(str(restored_uds))
        second.sendall(b"RESUME 1024\n")
        assert is_closed(second)  # only one client takes a carried-over connection
        taker.close()
        second.close()
    finally:
        fresh.close()
        client.close()


def test_rx_buffers_counts_what_the_driver_posted_and_no_packet_used(
    guest: FakeGuest, uds: Path, dev: Vsock
) -> None:
    """The count a template build tops up before its snapshot (template_warm.top_up_rx)."""
    assert dev.counters()["rx_buffers"] == 0
    assert dev.counters()["rx_queue_size"] == QUEUE_SIZES[RX_QUEUE]
    guest.give_rx(10)
    assert dev.counters()["rx_buffers"] == 10
    client, local = host_connect(guest, uds, 52)  # the REQUEST takes one buffer
    client.sendall(b"hello")
    assert guest_data(guest, local, 52, 5) == b"hello"
    guest.poll()
    left = guest.outstanding  # given, less those the device returned used
    assert left <= 8  # the REQUEST and the data, at least
    assert dev.counters()["rx_buffers"] == left
    guest.give_rx(5)
    assert dev.counters()["rx_buffers"] == left + 5
    client.close()
