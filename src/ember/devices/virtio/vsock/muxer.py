"""Routing between the guest's vsock packets and host Unix sockets (hybrid vsock).

:class:`VsockMuxer` acts on host events (a client at the listener, its CONNECT
or RESUME line, a ready socket, a timer) and on the guest's tx packets, and
fills the guest's rx buffers with what is owed to it.  The host fds, the
connection table and its timers are in ``table.py``; what a snapshot carries
over in ``carryover.py``.

Not thread-safe: the device calls everything under its lock.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from pathlib import Path

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.queue import DescriptorChain
from ember.devices.virtio.vsock.budget import TX_BUDGET
from ember.devices.virtio.vsock.carryover import SnapshotCarryOver, promised_window
from ember.devices.virtio.vsock.host import HANDSHAKE_TIMEOUT, HandshakeError, PendingClient
from ember.devices.virtio.vsock.packet import (
    HDR_SIZE,
    KNOWN_OPS,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM,
    VsockHeader,
    check_tx_header,
)
from ember.devices.virtio.vsock.state import (
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    LINGER_TIMEOUT,
    ConnState,
    VsockStats,
)
from ember.devices.virtio.vsock.table import MAX_PENDING_RESETS
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024
MAX_PENDING_CLIENTS = 64
ACCEPT_RETRY = 0.1  # seconds the listener rests after accept() failed (e.g. EMFILE)


class VsockMuxer(SnapshotCarryOver):
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
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        super().__init__(
            guest_cid,
            uds_path,
            stats,
            max_connections=max_connections,
            close_timeout=close_timeout,
            linger_timeout=linger_timeout,
            tx_budget=tx_budget,
        )

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
