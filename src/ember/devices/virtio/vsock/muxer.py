"""Routing between the guest's vsock packets and host Unix sockets (hybrid vsock).

The muxer owns every host fd of the device — the listener at ``uds_path``,
clients still sending their CONNECT line, one socket per connection, and a
timerfd for connect / close timeouts — in an epoll set of its own.  The VMM's
event loop watches only that epoll fd (readable whenever one of ours is
ready) and the device then calls :meth:`VsockMuxer.handle_events`.  Owning the
epoll lets us ask for EPOLLOUT on a slow host socket and drop EPOLLIN from a
socket whose data has nowhere to go (no guest credit, no rx buffers), so
nothing is ever polled that we would not act on: no busy loops.

Connections are keyed by ``(local_port, peer_port)``: the host end's port and
the guest end's.  Host clients get an ephemeral local port from 2**30 up;
guest-initiated connections to CID 2 port P use P and reach ``<uds_path>_P``.

Packets owed to the guest wait in two places, both bounded: per-connection
control flags (at most one of each op per connection, and connections are
capped) and a queue of RSTs for packets that matched no connection (capped;
the excess is dropped and counted — the guest's own packets caused them).

What the guest sends and a host socket does not take yet is held in the
connections' ``tx_buf``s, within credit windows drawn from one
:class:`TxBudget` (``tx_budget`` bytes for the whole device; see
``budget.py``).  Closed connections hold nothing, and the timer heap, which
may still point at them until their deadline, is compacted once it holds more
stale entries than live ones: neither grows with the rate at which a guest
opens and resets connections.

Not thread-safe: the device calls everything under its lock.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import socket
import time
from pathlib import Path

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.queue import DescriptorChain
from ember.devices.virtio.vsock.budget import TX_BUDGET, TxBudget
from ember.devices.virtio.vsock.connection import (
    CLOSE_TIMEOUT,
    CONN_TX_BUF_SIZE,
    CONNECT_TIMEOUT,
    LINGER_TIMEOUT,
    Connection,
    ConnState,
    VsockStats,
)
from ember.devices.virtio.vsock.host import (
    HANDSHAKE_TIMEOUT,
    HandshakeError,
    PendingClient,
    Timer,
    bind_listener,
)
from ember.devices.virtio.vsock.packet import (
    HDR_SIZE,
    KNOWN_OPS,
    U32,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM,
    VsockHeader,
    check_tx_header,
    host_header,
)
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

LOCAL_PORT_MIN = 1 << 30
MAX_RESUMABLE = 8  # connections a snapshot carries over for RESUME
LOCAL_PORT_MAX = 0xFFFF_FFFE  # 0xFFFF_FFFF is VMADDR_PORT_ANY
MAX_CONNECTIONS = 1024
MAX_PENDING_CLIENTS = 64
MAX_PENDING_RESETS = 256
ACCEPT_RETRY = 0.1  # seconds the listener rests after accept() failed (e.g. EMFILE)
TIMER_SLACK = 16  # stale timer entries tolerated beyond one per live connection or client

_Timed = Connection | PendingClient | None  # None: the resting listener


class VsockMuxer:
    def __init__(
        self,
        guest_cid: int,
        uds_path: Path,
        stats: VsockStats,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        linger_timeout: float = LINGER_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        tx_budget: int = TX_BUDGET,
    ) -> None:
        self.guest_cid = guest_cid
        self.budget = TxBudget(max_connections, tx_budget)  # before any fd: it may refuse
        self.uds_path = uds_path
        self.stats = stats
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.linger_timeout = linger_timeout
        self.handshake_timeout = handshake_timeout
        self.listener = bind_listener(uds_path)
        st = os.stat(uds_path)
        self._listener_id = (st.st_dev, st.st_ino)
        self.epoll = select.epoll()
        self.timer = Timer()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.timer.fd, select.EPOLLIN)
        self.connections: dict[tuple[int, int], Connection] = {}
        # Carried over from a snapshot, waiting for a host client's RESUME (their guest
        # ends are open; a guest packet for one before that resets it).
        self._resumable: dict[tuple[int, int], dict[str, int]] = {}
        self._by_fd: dict[int, Connection] = {}
        self._clients: dict[int, PendingClient] = {}
        self._rx_ready: dict[tuple[int, int], None] = {}  # an ordered set: round-robin
        self._resets: collections.deque[VsockHeader] = collections.deque()
        self._timers: list[tuple[float, int, _Timed]] = []
        self._timer_seq = itertools.count()
        self._local_ports: set[int] = set()
        self._next_port = LOCAL_PORT_MIN
        self.rx_starved = False

    def fileno(self) -> int:
        """The fd for the event loop: readable when any host fd of ours is ready."""
        return self.epoll.fileno()

    # -- host events ------------------------------------------------------------------------

    def handle_events(self) -> None:
        for fd, events in self.epoll.poll(0):
            if fd == self.listener.fileno():
                self._accept()
            elif fd == self.timer.fd:
                self.timer.clear()
                self._expire()
            elif (client := self._clients.get(fd)) is not None:
                self._handshake(client)
            elif (conn := self._by_fd.get(fd)) is not None:
                conn.on_host_event(events)
                self._sync(conn)
        self._arm()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of fds: rest, or the listener would spin
                log.warning("vsock: accept on %s failed: %s", self.uds_path, exc.strerror)
                self.epoll.modify(self.listener.fileno(), 0)
                self._schedule(time.monotonic() + ACCEPT_RETRY, None)
                return
            sock.setblocking(False)
            busy = len(self.connections) + len(self._clients) >= self.max_connections
            if busy or len(self._clients) >= MAX_PENDING_CLIENTS:
                self.stats.refused += 1
                sock.close()
                continue
            client = PendingClient(sock, self.handshake_timeout)
            self._clients[client.fd] = client
            self.epoll.register(client.fd, select.EPOLLIN)
            self._schedule(client.deadline, client)

    def _handshake(self, client: PendingClient) -> None:
        try:
            request = client.read_line()
        except HandshakeError as exc:
            log.debug("vsock: host client dropped: %s", exc)
            self.stats.handshake_errors += 1
            self._drop_client(client, close=True)
            return
        if request is None:
            return
        verb, port = request
        self._drop_client(client, close=False)
        if verb == "RESUME":
            self._resume(client.sock, port)
            return
        local_port = self._alloc_port(port)
        if local_port is None:
            self.stats.refused += 1
            client.sock.close()
            return
        conn = self._new(client.sock, local_port, port, ConnState.LOCAL_INIT)
        conn.pending.add(VIRTIO_VSOCK_OP_REQUEST)
        conn.deadline = time.monotonic() + self.connect_timeout
        self._sync(conn)

    def _drop_client(self, client: PendingClient, *, close: bool) -> None:
        if self._clients.pop(client.fd, None) is client:
            self.epoll.unregister(client.fd)
        if close:
            client.sock.close()

    @property
    def next_port(self) -> int:
        """The local port the next host connection will try first (kept in snapshots)."""
        return self._next_port

    def continue_ports_after(self, port: int) -> None:
        """After a restore: allocate above ``port``, the highest the snapshot's guest has seen.

        A fresh muxer would start again at :data:`LOCAL_PORT_MIN` and hand out ports whose
        guest sockets may still exist (the guest closes them when their owner does), and the
        guest ignores a REQUEST for a port pair it still has: the client then waits
        :data:`CONNECT_TIMEOUT` and is refused.
        """
        if LOCAL_PORT_MIN <= port < LOCAL_PORT_MAX:
            self._next_port = max(self._next_port, port + 1)

    def _alloc_port(self, peer_port: int) -> int | None:
        for _ in range(len(self._local_ports) + len(self.connections) + 1):
            port = self._next_port
            self._next_port = port + 1 if port < LOCAL_PORT_MAX else LOCAL_PORT_MIN
            if port not in self._local_ports and (port, peer_port) not in self.connections:
                self._local_ports.add(port)
                return port
        return None

    def _new(
        self,
        sock: socket.socket,
        local_port: int,
        peer_port: int,
        state: ConnState,
        promised: int = 0,
    ) -> Connection:
        conn = Connection(
            sock,
            self.guest_cid,
            local_port,
            peer_port,
            state,
            self.stats,
            self.budget,
            promised=promised,
            close_timeout=self.close_timeout,
            linger_timeout=self.linger_timeout,
        )
        self.connections[conn.key] = conn
        self._by_fd[conn.fd] = conn
        self.stats.connections += 1
        return conn

    # -- guest packets ----------------------------------------------------------------------

    def handle_tx(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        """Validate and route one packet from the tx queue; a bad one is counted and dropped."""
        readable = BufferList(chain.readable)
        if readable.total < HDR_SIZE:
            self._bad(f"a {readable.total}-byte packet is shorter than its header")
            return
        hdr = VsockHeader.unpack(readable.read(memory, 0, HDR_SIZE))
        why = check_tx_header(hdr, self.guest_cid, readable.total - HDR_SIZE)
        if why is not None:
            self._bad(why)
            return
        key = (hdr.dst_port, hdr.src_port)
        if (carried := self._resumable.pop(key, None)) is not None:
            self._local_ports.discard(key[0])  # the guest moved first: that one is gone
            self.budget.release(promised_window(carried))
        conn = self.connections.get(key)
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM or hdr.op not in KNOWN_OPS:
            self._bad(f"type {hdr.type} {hdr.op_name}")
            if conn is not None:
                conn.kill("bad packet")
                self._sync(conn)
            else:
                self._reply_rst(hdr)
            return
        self.stats.tx_packets += 1
        if conn is None:
            if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(hdr)
            else:
                self._reply_rst(hdr)
            return
        conn.on_guest_packet(hdr, memory, readable.skip(HDR_SIZE))
        self._sync(conn)

    def _bad(self, why: str) -> None:
        self.stats.bad_packets += 1
        level = logging.WARNING if self.stats.bad_packets == 1 else logging.DEBUG
        log.log(level, "vsock: bad guest packet (%d so far): %s", self.stats.bad_packets, why)

    def _reply_rst(self, hdr: VsockHeader) -> None:
        if hdr.op == VIRTIO_VSOCK_OP_RST:
            return  # never answer an RST
        if len(self._resets) >= MAX_PENDING_RESETS:
            self.stats.dropped_resets += 1
            return
        self._resets.append(hdr.reply(VIRTIO_VSOCK_OP_RST))

    def _guest_connect(self, hdr: VsockHeader) -> None:
        """The guest asks for host port P: connect to ``<uds_path>_P`` without blocking."""
        if len(self.connections) + len(self._clients) >= self.max_connections:
            self.stats.refused += 1
            self._reply_rst(hdr)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("vsock: cannot create a socket: %s", exc.strerror)
            self.stats.refused += 1
            self._reply_rst(hdr)
            return
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{hdr.dst_port}")
        except OSError as exc:  # nothing listening, backlog full (EAGAIN), path too long, ...
            log.debug("vsock: guest connect to port %d refused: %s", hdr.dst_port, exc)
            sock.close()
            self.stats.refused += 1
            self._reply_rst(hdr)
            return
        conn = self._new(sock, hdr.dst_port, hdr.src_port, ConnState.ESTABLISHED)
        conn.update_peer_credit(hdr)
        conn.pending.add(VIRTIO_VSOCK_OP_RESPONSE)
        self._sync(conn)

    # -- toward the guest -------------------------------------------------------------------

    def has_rx_work(self) -> bool:
        return bool(self._resets) or bool(self._rx_ready)

    def fill_rx(self, memory: GuestMemory, chain: DescriptorChain) -> int | None:
        """Write the next packet owed to the guest into ``chain``; None if none was due.

        Returns the used length (0 for a chain too small to be of use).
        """
        writable = BufferList(chain.writable)
        if writable.total < HDR_SIZE:
            self.stats.bad_rx_buffers += 1
            return 0
        if self._resets:
            writable.write(memory, 0, self._resets.popleft().pack())
            self.stats.resets_sent += 1
            self.stats.rx_packets += 1
            return HDR_SIZE
        # Each round either fills the chain or takes work away from a connection (its
        # socket had nothing after all); the bound is a guard, not a limit that is reached.
        for _ in range(2 * len(self._rx_ready) + 2):
            if not self._rx_ready:
                break
            key = next(iter(self._rx_ready))
            del self._rx_ready[key]
            conn = self.connections[key]
            written = conn.fill_rx(memory, writable)
            self._sync(conn)  # back at the end of the line if it has more to say
            if written is not None:
                if written:
                    self.stats.rx_packets += 1
                else:
                    self.stats.bad_rx_buffers += 1
                return written
        return None

    def set_rx_starved(self, starved: bool) -> None:
        """No rx buffers: stop polling host sockets for data until the driver adds some."""
        if starved != self.rx_starved:
            self.rx_starved = starved
            for conn in list(self.connections.values()):
                self._sync(conn)
            self._arm()

    # -- bookkeeping ------------------------------------------------------------------------

    def _sync(self, conn: Connection) -> None:
        """Bring the epoll registration, rx work list and timer in line with ``conn``."""
        key = conn.key
        if conn.state is ConnState.CLOSED:
            if self._by_fd.get(conn.fd) is conn:
                del self._by_fd[conn.fd]
                if conn.registered:
                    self.epoll.unregister(conn.fd)
                    conn.registered = 0
                conn.sock.close()
            if conn.pending:
                self._rx_ready.setdefault(key)
            elif self.connections.get(key) is conn:
                del self.connections[key]
                self._rx_ready.pop(key, None)
                if conn.initiated_by_host:
                    self._local_ports.discard(key[0])
                self._compact_timers()
            return
        mask = conn.wanted_events(self.rx_starved)
        if mask != conn.registered:
            if not conn.registered:
                self.epoll.register(conn.fd, mask)
            elif not mask:
                self.epoll.unregister(conn.fd)
            else:
                self.epoll.modify(conn.fd, mask)
            conn.registered = mask
        if conn.has_rx_work():
            self._rx_ready.setdefault(key)
        else:
            self._rx_ready.pop(key, None)
        if conn.deadline is not None and conn.deadline != conn.timer_at:
            conn.timer_at = conn.deadline
            self._schedule(conn.deadline, conn)

    def _schedule(self, deadline: float, what: _Timed) -> None:
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), what))
        self._compact_timers()
        self._arm()

    def _live_timer(self, deadline: float, what: _Timed) -> bool:
        """Whether a timer entry still means something (else _expire would skip it)."""
        if what is None:
            return True
        if isinstance(what, PendingClient):
            return self._clients.get(what.fd) is what
        return self.connections.get(what.key) is what and what.timer_at == deadline

    def _compact_timers(self) -> None:
        """Drop stale entries once they outnumber the live ones (amortised O(1) a call).

        A stale entry would otherwise keep its closed Connection alive until the
        deadline (30 s of linger), however many a guest cycles through meanwhile.
        """
        live = len(self.connections) + len(self._clients) + 1
        if len(self._timers) <= 2 * live + TIMER_SLACK:
            return
        self._timers = [t for t in self._timers if self._live_timer(t[0], t[2])]
        heapq.heapify(self._timers)

    def _arm(self) -> None:
        self.timer.arm(self._timers[0][0] if self._timers else None)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, what = heapq.heappop(self._timers)
            if what is None:
                self.epoll.modify(self.listener.fileno(), select.EPOLLIN)
            elif isinstance(what, PendingClient):
                if self._clients.get(what.fd) is what:
                    log.debug("vsock: host client sent no CONNECT line in time")
                    self.stats.handshake_errors += 1
                    self._drop_client(what, close=True)
            elif self._live_timer(deadline, what):
                assert isinstance(what, Connection)
                what.timer_at = None
                what.expire(now)
                self._sync(what)
        self._arm()

    # -- connections carried over a snapshot ------------------------------------------------

    def resumable_state(self, limit: int = MAX_RESUMABLE) -> list[dict[str, int]]:
        """Idle, clean connections a restored copy can hand to a new host client (RESUME)."""
        found: list[dict[str, int]] = []
        for conn in self.connections.values():
            if len(found) >= limit:
                break
            state = conn.resumable_state()
            if state is not None:
                found.append(state)
        return found

    def add_resumable(self, states: list[dict[str, int]]) -> None:
        """Keep quiet connections of a snapshot for a host client's RESUME.

        The guest may still send what it was promised on each, so that is
        reserved in the budget now; one that does not fit is reset instead.
        """
        for state in states[:MAX_RESUMABLE]:
            key = (int(state["local_port"]), int(state["peer_port"]))
            if key in self._resumable or not self.budget.hold(promised_window(state)):
                self.reset_guest_ends([key])
                continue
            self._resumable[key] = state
            self._local_ports.add(key[0])  # the guest still uses it: no new connection may

    def _resume(self, sock: socket.socket, peer_port: int) -> None:
        """Attach a host client to a carried-over connection to ``peer_port``, or refuse."""
        key = next((k for k in self._resumable if k[1] == peer_port), None)
        busy = len(self.connections) + len(self._clients) >= self.max_connections
        if key is None or key in self.connections or busy:
            self.stats.refused += 1
            sock.close()
            return
        state = self._resumable.pop(key)
        conn = self._new(sock, key[0], key[1], ConnState.ESTABLISHED, promised_window(state))
        conn.load_resumable_state(state)
        self._local_ports.add(key[0])
        conn.initiated_by_host = True
        try:
            sock.send(f"OK {key[0]}\n".encode(), socket.MSG_NOSIGNAL)
        except OSError:
            conn.kill("the host client went away during RESUME", host_error=True)
        self._sync(conn)

    def connection_keys(self) -> list[tuple[int, int]]:
        """(host port, guest port) of every connection the guest knows about."""
        return list(self.connections)

    def reset_guest_ends(self, keys: list[tuple[int, int]]) -> None:
        """Queue an RST for each guest end whose host end is gone (after a restore).

        Per connection rather than TRANSPORT_RESET: the guest handles that
        event on its own schedule and would also kill connections made
        after the restore.  Resets go out before any other rx packet.
        """
        for local_port, peer_port in keys[:MAX_PENDING_RESETS]:
            self._resets.append(
                host_header(self.guest_cid, local_port, peer_port, VIRTIO_VSOCK_OP_RST)
            )

    def open_connections(self) -> int:
        return len(self.connections) + len(self._clients)

    def buffered_bytes(self) -> int:
        """Bytes the guest sent that host sockets have not taken yet (at most ``budget.held``)."""
        return sum(len(conn.tx_buf) for conn in self.connections.values())

    def reset_connections(self) -> None:
        """Forget every connection without telling the guest (device or transport reset)."""
        for conn in list(self.connections.values()):
            conn.forget()
            self._sync(conn)
        self.connections.clear()
        self._timers = [t for t in self._timers if not isinstance(t[2], Connection)]
        heapq.heapify(self._timers)
        self._by_fd.clear()
        self._rx_ready.clear()
        self._resets.clear()
        self._local_ports.clear()
        self.rx_starved = False

    def close(self) -> None:
        """Close every fd and remove the socket file (if it is still ours)."""
        self.reset_connections()
        for client in list(self._clients.values()):
            self._drop_client(client, close=True)
        self._timers.clear()
        self.epoll.close()
        self.timer.close()
        self.listener.close()
        try:
            st = os.stat(self.uds_path)
            if (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.uds_path)
        except OSError:
            pass


def promised_window(state: dict[str, int]) -> int:
    """What the guest of a snapshot's quiet connection may still send: up to its right edge.

    Capped at the largest window we ever grant, so a doctored state file
    cannot reserve more than one connection's worth.
    """
    edge = int(state["last_fwd_cnt_sent"]) + int(state["buf_alloc"])
    room = (edge - int(state["fwd_cnt"])) & U32
    return 0 if room > U32 // 2 else min(room, CONN_TX_BUF_SIZE)
