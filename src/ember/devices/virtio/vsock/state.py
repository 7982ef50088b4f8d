"""A connection's state machine: its states and timeouts, and its moves toward CLOSED.

The state machine (:class:`ConnState`)::

    host client "CONNECT p"            guest REQUEST to CID 2 port p
            |                                     |  connect(<uds>_p) ok
            v                                     v
       LOCAL_INIT --- guest RESPONSE ------> ESTABLISHED --- both directions over ---> CLOSING
            |                                     |                                      |
            +---- RST / timeout / error ----------+---- RST / error ----------> CLOSED <-+
                                                                  (guest RST, or timeout)

Half-close (§5.10.6.5): a guest SHUTDOWN(SEND) becomes ``shutdown(SHUT_WR)`` on
the host socket once everything the guest sent has been written to it; a guest
SHUTDOWN(RCV) becomes ``shutdown(SHUT_RD)``; end-of-file on the host socket
becomes SHUTDOWN(SEND) to the guest.  When both directions are over we send
SHUTDOWN(RCV|SEND) and wait :data:`CLOSE_TIMEOUT` for the guest's RST; when the
guest shut both directions we flush what it sent (a slow host reader gets
:data:`LINGER_TIMEOUT`), then answer with RST.

A connection never raises for the guest's doing or a host socket error: it
moves to CLOSED and owes the guest an RST.  It does not own its fd's
registration: the muxer closes the socket once ``state`` is CLOSED.

The device's counters (:class:`VsockStats`) are defined here, below everything that
counts in them.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from dataclasses import dataclass

from ember.devices.virtio.vsock.budget import TxBudget
from ember.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
)

log = logging.getLogger(__name__)

CONN_TX_BUF_SIZE = 256 * 1024  # the largest buf_alloc: the most we hold for one slow host socket
CONNECT_TIMEOUT = 10.0  # seconds a host client waits for the guest's RESPONSE (slow guests)
CLOSE_TIMEOUT = 2.0  # seconds we wait for the guest's RST after our SHUTDOWN(RCV|SEND)
LINGER_TIMEOUT = 30.0  # seconds a slow host reader gets for what the guest sent before closing


class ConnState(enum.Enum):
    LOCAL_INIT = "local-init"  # a host client asked for a guest port; no RESPONSE yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # both directions over (or the guest shut both): RST or timeout next
    CLOSED = "closed"  # host socket closed; an RST may still be owed to the guest


@dataclass
class VsockStats:
    """Counters for the device's lifetime (read them; nothing resets them)."""

    tx_packets: int = 0  # guest -> host packets accepted
    rx_packets: int = 0  # host -> guest packets delivered
    tx_bytes: int = 0  # payload bytes the guest sent
    rx_bytes: int = 0  # payload bytes delivered to the guest
    bad_packets: int = 0  # guest packets dropped as malformed (bad cid, type, len, op, ...)
    bad_rx_buffers: int = 0  # rx chains too small to carry what was due
    resets_sent: int = 0
    resets_received: int = 0
    credit_violations: int = 0  # connections reset for overrunning our buf_alloc
    host_errors: int = 0  # connections reset for a host socket error or timeout
    refused: int = 0  # connections refused (nothing listening, too many connections)
    handshake_errors: int = 0  # host clients dropped for a bad or missing CONNECT line
    dropped_resets: int = 0  # RSTs to unknown addresses dropped while the rx queue was full
    connections: int = 0  # connections opened (either side)


class StreamState:
    """The fields of one stream and the moves of its state machine toward CLOSED.

    :class:`~ember.devices.virtio.vsock.connection.Connection` builds the protocol on it.
    """

    def __init__(
        self,
        sock: socket.socket,
        guest_cid: int,
        local_port: int,
        peer_port: int,
        state: ConnState,
        stats: VsockStats,
        budget: TxBudget,
        *,
        promised: int = 0,
        max_window: int = CONN_TX_BUF_SIZE,
        close_timeout: float = CLOSE_TIMEOUT,
        linger_timeout: float = LINGER_TIMEOUT,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.guest_cid = guest_cid
        self.local_port = local_port  # the host end's port (src_port of what we send)
        self.peer_port = peer_port  # the guest end's port
        self.state = state
        self.stats = stats
        self.budget = budget
        self.max_window = max_window
        # Our credit window, taken from the budget (``promised``: already reserved there for
        # a connection carried over a snapshot) and given back by _close().
        self.window = budget.open(promised)
        self.buf_alloc = 0  # the window the guest last heard of (with last_fwd_cnt_sent)
        self.close_timeout = close_timeout
        self.linger_timeout = linger_timeout
        self.pending: set[int] = set()  # control ops owed to the guest
        self.shutdown_flags = 0  # flags of the SHUTDOWN owed to / last sent to the guest
        self.peer_shutdown = 0  # SHUTDOWN flags the guest sent us, accumulated
        self.to_guest_done = False  # no more data will flow host -> guest
        self.to_host_done = False  # no more data will flow guest -> host (SHUT_WR done)
        self.data_ready = False  # the host socket polled readable and was not drained since
        self.deadline: float | None = None
        self.initiated_by_host = state is ConnState.LOCAL_INIT  # local_port was allocated
        self.registered = 0  # epoll mask the muxer registered (0: not registered)
        self.timer_at: float | None = None  # the deadline the muxer's timer knows of
        # Credit, host -> guest.
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.credit_requested = False
        # Credit, guest -> host.
        self.fwd_cnt = 0
        self.last_fwd_cnt_sent = 0
        self.tx_buf = bytearray()

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # -- closing ----------------------------------------------------------------------------

    def _host_eof(self) -> None:
        self.to_guest_done = True
        self.data_ready = False
        self._send_shutdown(VIRTIO_VSOCK_SHUTDOWN_SEND)
        self._advance()

    def _send_shutdown(self, flags: int) -> None:
        if flags & ~self.shutdown_flags:
            self.shutdown_flags |= flags
            self.pending.add(VIRTIO_VSOCK_OP_SHUTDOWN)

    def _shutdown_host(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass  # the host end is already gone; a later read or write will tell

    def _advance(self) -> None:
        """Move toward CLOSING / CLOSED once the directions that were shut are drained."""
        if self.state not in (ConnState.ESTABLISHED, ConnState.CLOSING):
            return
        if (
            self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
            and not self.tx_buf
            and not self.to_host_done
        ):
            self.to_host_done = True
            self._shutdown_host(socket.SHUT_WR)
        if self.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH and self.to_host_done:
            self._close(owe_rst=True)  # the guest closed and everything it sent was delivered
        elif self.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH or (
            self.to_guest_done and self.to_host_done
        ):
            lingering = self.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH  # tx_buf not empty
            if not lingering:
                self._send_shutdown(VIRTIO_VSOCK_SHUTDOWN_BOTH)
            if self.state is not ConnState.CLOSING:
                self.state = ConnState.CLOSING
                timeout = self.linger_timeout if lingering else self.close_timeout
                self.deadline = time.monotonic() + timeout

    def expire(self, now: float) -> None:
        """The muxer's timer fired: give up on a connect or a close that took too long."""
        waiting = self.state in (ConnState.LOCAL_INIT, ConnState.CLOSING)
        if waiting and self.deadline is not None and now >= self.deadline:
            why = "close timed out" if self.state is ConnState.CLOSING else "guest did not answer"
            self.kill(why, host_error=True)

    def forget(self) -> None:
        """Close without telling the guest (device or transport reset): it forgot us."""
        self._close(owe_rst=False)

    def kill(self, why: str, *, host_error: bool = False, guest_error: bool = False) -> None:
        """Abort: close the host socket and owe the guest an RST (if it knows us at all)."""
        if self.state is ConnState.CLOSED:
            return
        log.debug("vsock %d->%d: reset: %s", self.local_port, self.peer_port, why)
        if host_error:
            self.stats.host_errors += 1
        if guest_error:
            self.stats.bad_packets += 1
        unknown_to_guest = (
            self.state is ConnState.LOCAL_INIT and VIRTIO_VSOCK_OP_REQUEST in self.pending
        )
        self._close(owe_rst=not unknown_to_guest)

    def _close(self, *, owe_rst: bool) -> None:
        """Drop what is buffered and give the window back: a closed connection holds nothing
        (the muxer's timer heap may still point at it for a while)."""
        self.state = ConnState.CLOSED
        self.deadline = None
        self.data_ready = False
        self.tx_buf = bytearray()
        if self.window:
            self.budget.close(self.window)
            self.window = 0
        self.pending = {VIRTIO_VSOCK_OP_RST} if owe_rst else set()
