"""vsock's host memory is bounded per VMM, whatever the guest does (issue 14, items 2 and 3).

The guest here is honest about credit (it sends only what the windows we
advertise allow, as Linux does) unless a test says otherwise, and the host
peers do not read until told to: everything the guest sends then waits in the
device's ``tx_buf``s.  Each muxer-side socket gets the smallest send buffer
the kernel allows, so the host kernel takes almost nothing off our hands.
Assertions are on bytes held, live objects and tracemalloc peaks, never time.
"""

from __future__ import annotations

import gc
import socket
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.devices.virtio.vsock import Vsock
from ember.devices.virtio.vsock.budget import MIN_WINDOW, TX_BUDGET, TxBudget
from ember.devices.virtio.vsock.connection import Connection
from ember.devices.virtio.vsock.packet import (
    MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VsockHeader,
)
from ember.devices.virtio.vsock.state import CONN_TX_BUF_SIZE
from ember.devices.virtio.vsock.table import LOCAL_PORT_MIN, TIMER_SLACK
from ember.errors import ConfigError
from ember.vmm.event_loop import EventLoop
from tests.unit.test_vsock import GUEST_CID, TIMEOUT, FakeGuest, listen, wait_until

HOST_PORT = 700
PATTERN = bytes(range(251)) * 4096  # ~1 MiB; a prime period, so offsets are told apart


def stream(index: int, start: int, n: int) -> bytes:
    """Bytes ``start:start+n`` of connection ``index``'s stream (each has its own phase)."""
    offset = (start + 7919 * index) % 251
    return PATTERN[offset : offset + n]


@dataclass
class GuestEnd:
    """The guest's view of one connection it opened to HOST_PORT: what it sent, what it may."""

    index: int
    port: int
    sent: int = 0
    received: int = 0  # by its host peer
    edge: int = 0  # fwd_cnt + buf_alloc of the last header heard
    windows: tuple[int, ...] = ()

    def hear(self, hdr: VsockHeader) -> None:
        if hdr.op == VIRTIO_VSOCK_OP_RST:
            return
        edge = hdr.fwd_cnt + hdr.buf_alloc
        assert edge >= self.edge, "the right edge of our credit moved back"
        self.edge = edge
        self.windows += (hdr.buf_alloc,)

    @property
    def credit(self) -> int:
        return self.edge - self.sent


class HonestGuest(FakeGuest):
    """A FakeGuest that opens connections to HOST_PORT and sends within its credit."""

    def __init__(self, dev: Vsock, listener: socket.socket) -> None:
        super().__init__(dev)
        self.listener = listener
        self.ends: dict[int, GuestEnd] = {}
        self.hosts: dict[int, socket.socket] = {}

    def route(self) -> None:
        if self.outstanding < 64:  # two descriptors each: 128 fill the 256-entry ring
            self.give_rx(128 - self.outstanding)
        for packet in self.poll():
            end = self.ends.get(packet.hdr.dst_port)
            if end is not None and packet.hdr.src_port == HOST_PORT:
                end.hear(packet.hdr)
        self.inbox.clear()

    def route_until(self, done: Callable[[], bool]) -> None:
        def check() -> bool:
            self.route()
            return done()

        wait_until(check)

    def open(self, index: int, port: int) -> GuestEnd:
        end = self.ends[port] = GuestEnd(index, port)
        self.send(VIRTIO_VSOCK_OP_REQUEST, port, HOST_PORT)
        self.route_until(lambda: end.edge > 0)
        host, _ = self.listener.accept()
        host.settimeout(TIMEOUT)
        self.hosts[port] = host
        conn = self.dev.muxer.connections[(HOST_PORT, port)]
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
        return end

    def fill(self, end: GuestEnd, upto: int) -> None:
        """Send as much of the first ``upto`` bytes of the end's stream as credit allows."""
        self.route()
        while end.sent < upto and end.credit > 0:
            n = min(MAX_PKT_BUF_SIZE, end.credit, upto - end.sent)
            self.send(VIRTIO_VSOCK_OP_RW, end.port, HOST_PORT, stream(end.index, end.sent, n))
            end.sent += n

    def rst(self, end: GuestEnd) -> None:
        self.send(VIRTIO_VSOCK_OP_RST, end.port, HOST_PORT)
        self.hosts.pop(end.port).close()


@pytest.fixture
def events() -> Iterator[EventLoop]:
    loop = EventLoop()
    loop.start()
    yield loop
    loop.close()
    assert loop.callback_errors == 0, "a device callback raised on the event thread"


def make_guest(tmp_path: Path, events: EventLoop, **kwargs: int) -> HonestGuest:
    uds = tmp_path / "v.sock"
    dev = Vsock(GUEST_CID, uds, events, **kwargs)
    return HonestGuest(dev, listen(f"{uds}_{HOST_PORT}"))


def close_guest(guest: HonestGuest) -> None:
    for host in guest.hosts.values():
        host.close()
    guest.listener.close()
    guest.close()


def drain(guest: HonestGuest, ends: list[GuestEnd], total: int) -> None:
    """Read every host peer while the guest keeps sending: each stream must arrive whole."""

    def done() -> bool:
        for end in ends:
            guest.fill(end, total)
            host = guest.hosts[end.port]
            while end.received < end.sent:
                try:
                    chunk = host.recv(1 << 18, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                assert chunk, "EOF before the whole stream"
                assert chunk == stream(end.index, end.received, len(chunk)), "corrupted"
                end.received += len(chunk)
        return all(end.received == total for end in ends)

    wait_until(done, timeout=4 * TIMEOUT)


# -- item 3: the total is bounded and accounted -------------------------------------------------


def test_many_slow_host_readers_hold_at_most_the_budget_and_lose_nothing(
    tmp_path: Path, events: EventLoop
) -> None:
    """96 connections x 256 KiB windows would be 24 MiB; the budget holds it to TX_BUDGET."""
    guest = make_guest(tmp_path, events)
    dev = guest.dev
    try:
        ends = [guest.open(i, 5000 + i) for i in range(96)]
        tracemalloc.start()
        try:
            for end in ends:
                guest.fill(end, CONN_TX_BUF_SIZE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        buffered = dev.muxer.buffered_bytes()
        assert buffered > TX_BUDGET // 2, "the host sockets took the data: the test proves nothing"
        assert buffered <= dev.muxer.budget.held <= TX_BUDGET
        assert peak < TX_BUDGET + (2 << 20), f"{peak} bytes traced while filling"
        # Fair: every connection got at least its floor, none more than the cap.
        for end in ends:
            assert MIN_WINDOW <= end.windows[0] <= CONN_TX_BUF_SIZE
        assert min(end.sent for end in ends) >= MIN_WINDOW
        # Backpressure, not loss: once the hosts read, every stream arrives whole.
        drain(guest, ends, CONN_TX_BUF_SIZE + MAX_PKT_BUF_SIZE)
        assert dev.stats.credit_violations == 0 and dev.stats.bad_packets == 0
        for end in ends:
            guest.rst(end)
        guest.route_until(lambda: not dev.muxer.connections)
        assert dev.muxer.budget.held == 0 and dev.muxer.budget.holders == 0
    finally:
        close_guest(guest)


def test_a_spent_budget_slows_a_connection_but_never_stops_it(
    tmp_path: Path, events: EventLoop
) -> None:
    pool = CONN_TX_BUF_SIZE - MIN_WINDOW  # one full window above the floors
    guest = make_guest(tmp_path, events, max_connections=4, tx_budget=4 * MIN_WINDOW + pool)
    dev = guest.dev
    try:
        hog = guest.open(0, 5000)
        guest.fill(hog, 4 * CONN_TX_BUF_SIZE)  # its host never reads: the window stays full
        assert hog.windows[-1] == CONN_TX_BUF_SIZE
        late = guest.open(1, 5001)
        assert late.windows[0] < 2 * MIN_WINDOW  # the floor (and what little was left)
        drain(guest, [late], 4 * CONN_TX_BUF_SIZE)  # slowly, a small window at a time
        assert max(late.windows) < 2 * MIN_WINDOW
        assert dev.muxer.buffered_bytes() <= dev.muxer.budget.held <= dev.muxer.budget.total
        drain(guest, [hog], 4 * CONN_TX_BUF_SIZE)  # the hog's data was held, not dropped
        guest.rst(hog)
        guest.route()
        drain(guest, [late], 5 * CONN_TX_BUF_SIZE)  # the hog's window went back: late grows
        assert max(late.windows) == CONN_TX_BUF_SIZE
        assert dev.stats.credit_violations == 0
    finally:
        close_guest(guest)


def test_a_guest_past_its_window_is_reset_even_if_the_host_would_take_it(
    tmp_path: Path, events: EventLoop
) -> None:
    guest = make_guest(tmp_path, events)
    dev = guest.dev
    try:
        end = guest.open(0, 5000)
        guest.fill(end, CONN_TX_BUF_SIZE)
        assert end.credit == 0
        guest.send(VIRTIO_VSOCK_OP_RW, end.port, HOST_PORT, b"one byte too many")
        assert dev.stats.credit_violations == 1
        assert dev.muxer.buffered_bytes() == 0 and dev.muxer.budget.held == 0
    finally:
        close_guest(guest)


def test_budget_accounting() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        TxBudget(slots=1024, total=1024 * MIN_WINDOW - 1)
    budget = TxBudget(slots=2, total=2 * MIN_WINDOW + 10_000)
    a = budget.open()
    assert a == MIN_WINDOW and budget.available() == 10_000
    a = budget.resize(a, CONN_TX_BUF_SIZE)
    assert a == MIN_WINDOW + 10_000 and budget.available() == 0
    b = budget.open()  # the second slot's floor was kept aside
    assert b == MIN_WINDOW and budget.resize(b, CONN_TX_BUF_SIZE) == MIN_WINDOW
    assert budget.held == budget.total
    assert not budget.hold(1)  # no room for a snapshot's promise either
    budget.close(a)
    assert budget.hold(10_000) and budget.available() == 0  # a's window, minus the free floor
    c = budget.open(10_000)  # a resumed connection takes over its promise
    assert c == 10_000 and budget.held == 10_000 + MIN_WINDOW
    budget.close(b)
    budget.close(c)
    assert budget.held == 0 and budget.holders == 0


def test_snapshot_promises_are_reserved_and_given_back(tmp_path: Path, events: EventLoop) -> None:
    dev = Vsock(GUEST_CID, tmp_path / "r.sock", events)
    guest = FakeGuest(dev)
    try:
        quiet = {
            "local_port": LOCAL_PORT_MIN, "peer_port": 1024, "buf_alloc": CONN_TX_BUF_SIZE,
            "peer_buf_alloc": 1 << 16, "peer_fwd_cnt": 0, "tx_cnt": 0,
            "fwd_cnt": 300, "last_fwd_cnt_sent": 100,
        }  # fmt: skip
        doctored = dict(quiet, local_port=LOCAL_PORT_MIN + 1, peer_port=1025, buf_alloc=1 << 31)
        dev.load_state({"connections": [], "resumable": [quiet, doctored]})
        dev.restored()
        promised = CONN_TX_BUF_SIZE - 200
        assert dev.muxer.budget.held == promised + CONN_TX_BUF_SIZE  # the doctored one: capped
        guest.send(VIRTIO_VSOCK_OP_RW, 1025, LOCAL_PORT_MIN + 1, b"x")  # the guest moved first
        assert dev.muxer.budget.held == promised
        taker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        taker.settimeout(TIMEOUT)
        taker.connect(str(tmp_path / "r.sock"))
        taker.sendall(b"RESUME 1024\n")
        wait_until(lambda: dev.muxer.connections)
        conn = dev.muxer.connections[(LOCAL_PORT_MIN, 1024)]
        assert conn.window == conn.guest_credit() == promised  # taken over, not charged twice
        assert dev.muxer.budget.held == promised and dev.muxer.budget.holders == 1
        taker.close()
    finally:
        guest.close()


# -- item 2: closed connections hold nothing ----------------------------------------------------


def track_connections(dev: Vsock) -> list[weakref.ref[Connection]]:
    """Weak references to every Connection the muxer creates from now on."""
    refs: list[weakref.ref[Connection]] = []
    original = dev.muxer._new

    def tracking(*args: object, **kwargs: object) -> Connection:
        conn = original(*args, **kwargs)  # type: ignore[arg-type]
        refs.append(weakref.ref(conn))
        return conn

    dev.muxer._new = tracking  # type: ignore[method-assign]
    return refs


def alive(refs: list[weakref.ref[Connection]]) -> list[Connection]:
    gc.collect()
    return [conn for ref in refs if (conn := ref()) is not None]


def test_connect_fill_shutdown_rst_cycles_leave_nothing_behind(
    tmp_path: Path, events: EventLoop
) -> None:
    """Each cycle leaves a 30 s linger timer; the issue saw 44 MiB held after 200 cycles."""
    guest = make_guest(tmp_path, events)
    dev = guest.dev
    refs = track_connections(dev)
    try:
        for i in range(200):
            end = guest.open(i, 6000 + i)
            guest.fill(end, MAX_PKT_BUF_SIZE)
            guest.send(
                VIRTIO_VSOCK_OP_SHUTDOWN, end.port, HOST_PORT, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH
            )
            assert dev.muxer.connections[(HOST_PORT, end.port)].tx_buf  # lingering
            guest.rst(end)
        assert not dev.muxer.connections and dev.muxer.budget.held == 0
        survivors = alive(refs)
        assert sum(len(conn.tx_buf) for conn in survivors) == 0
        assert len(survivors) <= TIMER_SLACK + 3, f"{len(survivors)} closed connections alive"
        assert len(dev.muxer._timers) <= TIMER_SLACK + 3
    finally:
        close_guest(guest)


@pytest.mark.parametrize("how", ["device reset", "transport reset"])
def test_resets_drop_lingering_connections_and_their_timers(
    tmp_path: Path, events: EventLoop, how: str
) -> None:
    guest = make_guest(tmp_path, events)
    dev = guest.dev
    refs = track_connections(dev)
    try:
        for i in range(4):
            end = guest.open(i, 7000 + i)
            guest.fill(end, CONN_TX_BUF_SIZE)
            guest.send(
                VIRTIO_VSOCK_OP_SHUTDOWN, end.port, HOST_PORT, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH
            )
        assert dev.muxer.buffered_bytes() > 3 * CONN_TX_BUF_SIZE
        dev.reset() if how == "device reset" else dev.transport_reset()
        assert not alive(refs), "a reset connection is still referenced (by its linger timer)"
        assert not any(isinstance(t[2], Connection) for t in dev.muxer._timers)
        assert dev.muxer.budget.held == 0 and dev.muxer.budget.holders == 0
    finally:
        close_guest(guest)


def test_rst_flushes_nothing_and_frees_the_window_at_once(
    tmp_path: Path, events: EventLoop
) -> None:
    guest = make_guest(tmp_path, events, max_connections=2, tx_budget=2 * CONN_TX_BUF_SIZE)
    dev = guest.dev
    try:
        end = guest.open(0, 5000)
        guest.fill(end, CONN_TX_BUF_SIZE)
        conn = dev.muxer.connections[(HOST_PORT, end.port)]
        assert len(conn.tx_buf) > CONN_TX_BUF_SIZE // 2
        guest.rst(end)
        assert conn.tx_buf == b"" and conn.window == 0 and dev.muxer.budget.held == 0
    finally:
        close_guest(guest)
