"""The host fds of the vsock device, its connection table, and the timers on both.

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

:class:`ConnectionTable` keeps all of this in line with each connection's state;
:class:`~ember.devices.virtio.vsock.muxer.VsockMuxer` routes packets and events on it.
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

from ember.devices.virtio.vsock.budget import TxBudget
from ember.devices.virtio.vsock.connection import Connection
from ember.devices.virtio.vsock.host import PendingClient, Timer, bind_listener
from ember.devices.virtio.vsock.packet import VsockHeader
from ember.devices.virtio.vsock.state import ConnState, VsockStats

log = logging.getLogger(__name__)

LOCAL_PORT_MIN = 1 << 30
LOCAL_PORT_MAX = 0xFFFF_FFFE  # 0xFFFF_FFFF is VMADDR_PORT_ANY
MAX_PENDING_RESETS = 256
TIMER_SLACK = 16  # stale timer entries tolerated beyond one per live connection or client

_Timed = Connection | PendingClient | None  # None: the resting listener


class ConnectionTable:
    """Every host fd of the device and the connections behind them, with their deadlines."""

    def __init__(
        self,
        guest_cid: int,
        uds_path: Path,
        stats: VsockStats,
        *,
        max_connections: int,
        close_timeout: float,
        linger_timeout: float,
        tx_budget: int,
    ) -> None:
        self.guest_cid = guest_cid
        self.budget = TxBudget(max_connections, tx_budget)  # before any fd: it may refuse
        self.uds_path = uds_path
        self.stats = stats
        self.max_connections = max_connections
        self.close_timeout = close_timeout
        self.linger_timeout = linger_timeout
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

    # -- connections and their ports --------------------------------------------------------

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

    def _drop_client(self, client: PendingClient, *, close: bool) -> None:
        if self._clients.pop(client.fd, None) is client:
            self.epoll.unregister(client.fd)
        if close:
            client.sock.close()

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

    # -- the whole table --------------------------------------------------------------------

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
