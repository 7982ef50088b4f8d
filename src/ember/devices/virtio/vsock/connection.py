"""One vsock stream connection: a guest port on one side, a host Unix socket on the other.

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

Credit (§5.10.6.3), both ways, in modulo-2**32 counters:

* toward the guest we never send more than ``peer_buf_alloc - (tx_cnt -
  peer_fwd_cnt)``; with no credit left the host socket is simply not read, so
  the data waits in the host kernel, and a CREDIT_REQUEST asks for an update;
* toward the host we advertise ``buf_alloc`` = our window, the most ``tx_buf``
  (bytes the host socket would not take yet) may be made to hold, and
  ``fwd_cnt`` = bytes written to the host socket; we send CREDIT_UPDATE when
  asked or when ``fwd_cnt`` moved by :data:`CREDIT_UPDATE_THRESHOLD` (or half
  the window, if smaller) since the guest last heard it.  Windows come from the
  device's :class:`~ember.devices.virtio.vsock.budget.TxBudget`: at least
  :data:`~ember.devices.virtio.vsock.budget.MIN_WINDOW`, growing towards
  :data:`CONN_TX_BUF_SIZE` as the budget allows, never shrunk below what the
  guest was promised.  A guest that sends past ``fwd_cnt + buf_alloc`` is
  reset, so the VMM memory of all connections together stays within the budget.

A Connection never raises for the guest's doing or a host socket error: it
moves to CLOSED and owes the guest an RST.  It does not own its fd's
registration: the muxer closes the socket once ``state`` is CLOSED.
"""

from __future__ import annotations

import enum
import logging
import select
import socket
import time
from dataclasses import dataclass

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.vsock.budget import TxBudget
from ember.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PKT_BUF_SIZE,
    U32,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VsockHeader,
    host_header,
)
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

CONN_TX_BUF_SIZE = 256 * 1024  # the largest buf_alloc: the most we hold for one slow host socket
CREDIT_UPDATE_THRESHOLD = MAX_PKT_BUF_SIZE  # forwarded bytes that deserve a CREDIT_UPDATE
CONNECT_TIMEOUT = 10.0  # seconds a host client waits for the guest's RESPONSE (slow guests)
CLOSE_TIMEOUT = 2.0  # seconds we wait for the guest's RST after our SHUTDOWN(RCV|SEND)
LINGER_TIMEOUT = 30.0  # seconds a slow host reader gets for what the guest sent before closing

# Control packets in the order they go out: before data, then after it.
_OPS_BEFORE_DATA = (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
)
_OPS_AFTER_DATA = (VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RST)


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


class Connection:
    """Protocol state of one stream; the muxer does the epoll and virtqueue plumbing."""

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

    # -- snapshots --------------------------------------------------------------------------

    _RESUMABLE = (
        "local_port", "peer_port", "buf_alloc", "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt",
        "fwd_cnt", "last_fwd_cnt_sent",
    )  # fmt: skip

    def resumable_state(self) -> dict[str, int] | None:
        """The counters a restored copy needs to carry on, if nothing is in flight.

        Only an established, quiet connection qualifies: no control op owed,
        no shutdown, nothing buffered either way, everything sent consumed by
        the guest, nothing unread on the host socket.
        """
        if (
            self.state is not ConnState.ESTABLISHED
            or self.pending
            or self.shutdown_flags
            or self.peer_shutdown
            or self.tx_buf
            or self.tx_cnt != self.peer_fwd_cnt
        ):
            return None
        try:
            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return None
        except BlockingIOError:
            pass
        except OSError:
            return None
        return {name: int(getattr(self, name)) for name in self._RESUMABLE}

    def load_resumable_state(self, state: dict[str, int]) -> None:
        for name in self._RESUMABLE:
            setattr(self, name, int(state[name]) & U32)
        if self.guest_credit() > self.window:  # a state we never wrote: hold it to our window
            self.buf_alloc, self.last_fwd_cnt_sent = self.window, self.fwd_cnt

    # -- credit -----------------------------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes the guest can still take (0 if its counters make no sense)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def update_peer_credit(self, hdr: VsockHeader) -> None:
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.peer_credit() > 0:
            self.credit_requested = False

    def header(self, op: int, *, length: int = 0, flags: int = 0) -> VsockHeader:
        """A header toward the guest, stamped with our credit (which it also acknowledges).

        Every header is a chance for the window to grow (towards ``max_window``,
        as far as the budget allows); it never shrinks here, so the right edge
        ``fwd_cnt + buf_alloc`` the guest sees only moves forward.
        """
        may_send = not self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
        if self.state is not ConnState.CLOSED and may_send:
            self.window = self.budget.resize(self.window, max(self.window, self.max_window))
        hdr = host_header(
            self.guest_cid, self.local_port, self.peer_port, op, length=length, flags=flags
        )
        hdr.buf_alloc = self.buf_alloc = self.window
        hdr.fwd_cnt = self.last_fwd_cnt_sent = self.fwd_cnt
        self.pending.discard(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        return hdr

    def guest_credit(self) -> int:
        """Bytes the guest may still send: up to the right edge it was told, minus what came."""
        edge = self.last_fwd_cnt_sent + self.buf_alloc
        room = (edge - self.fwd_cnt - len(self.tx_buf)) & U32
        return 0 if room > U32 // 2 else room  # past the edge: nothing (a reset follows)

    def _maybe_credit_update(self) -> None:
        # Half a small window, not a fixed 64 KiB: a guest that has used a 4 KiB window
        # waits for our update (Linux never asks), and must get one once it drained.
        threshold = min(CREDIT_UPDATE_THRESHOLD, max(1, self.window // 2))
        if (self.fwd_cnt - self.last_fwd_cnt_sent) & U32 >= threshold:
            self.pending.add(VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    # -- what the muxer asks ----------------------------------------------------------------

    def can_read_host(self) -> bool:
        return (
            self.state in (ConnState.ESTABLISHED, ConnState.CLOSING)
            and not self.to_guest_done
            and self.peer_credit() > 0
        )

    def has_rx_work(self) -> bool:
        return bool(self.pending) or (self.data_ready and self.can_read_host())

    def wanted_events(self, rx_starved: bool) -> int:
        """The epoll mask for the host socket: read only when the data has somewhere to go."""
        if self.state is ConnState.CLOSED:
            return 0
        events = 0
        if not rx_starved and not self.data_ready and self.can_read_host():
            events |= select.EPOLLIN
        if self.tx_buf:
            events |= select.EPOLLOUT
        return events

    # -- host socket events (event thread) --------------------------------------------------

    def on_host_event(self, events: int) -> None:
        if self.state is ConnState.CLOSED:
            return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and self.can_read_host():
            self.data_ready = True
        if self.tx_buf and events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
            self.flush()

    def flush(self) -> None:
        """Write what the host socket did not take before; finish a pending SHUT_WR."""
        while self.tx_buf:
            try:
                n = self.sock.send(self.tx_buf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.kill(f"host write failed: {exc.strerror}", host_error=True)
                return
            del self.tx_buf[:n]
            self.fwd_cnt = (self.fwd_cnt + n) & U32
        self._maybe_credit_update()
        self._advance()

    # -- guest packets (tx queue) -----------------------------------------------------------

    def on_guest_packet(self, hdr: VsockHeader, memory: GuestMemory, payload: BufferList) -> None:
        """Act on one validated packet addressed to this connection."""
        self.update_peer_credit(hdr)
        op = hdr.op
        if op == VIRTIO_VSOCK_OP_RST:
            self.stats.resets_received += 1
            self._close(owe_rst=False)  # what the host socket did not take is dropped: a reset
            return
        if self.state is ConnState.CLOSED:
            return  # only our RST is left to deliver
        if self.state is ConnState.LOCAL_INIT:
            if op == VIRTIO_VSOCK_OP_RESPONSE and VIRTIO_VSOCK_OP_REQUEST not in self.pending:
                self._established()
            else:
                self.kill(f"{hdr.op_name} while connecting", guest_error=True)
            return
        if op == VIRTIO_VSOCK_OP_RW:
            self._to_host(memory, payload, hdr.len)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self.pending.add(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._peer_shutdown(hdr.flags & VIRTIO_VSOCK_SHUTDOWN_BOTH)
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:  # its credit is already taken
            self.kill(f"{hdr.op_name} on an established connection", guest_error=True)

    def _established(self) -> None:
        line = f"OK {self.local_port}\n".encode()
        try:
            sent = self.sock.send(line, socket.MSG_NOSIGNAL)
        except OSError:
            sent = -1
        if sent != len(line):
            self.kill("the host client went away before the guest answered", host_error=True)
            return
        self.state = ConnState.ESTABLISHED
        self.deadline = None

    def _to_host(self, memory: GuestMemory, payload: BufferList, length: int) -> None:
        if length == 0:
            return
        if self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND:
            self.kill("data after SHUTDOWN(SEND)", guest_error=True)
            return
        self.stats.tx_bytes += length
        if length > self.guest_credit():
            self.stats.credit_violations += 1
            self.kill(f"guest overran its credit ({length} bytes, {self.guest_credit()} allowed)")
            return
        sent = 0
        if not self.tx_buf:  # write straight from guest memory; buffer only the rest
            views = payload.views(memory, length)
            try:
                sent = self.sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.kill(f"host write failed: {exc.strerror}", host_error=True)
                return
            finally:
                for view in views:
                    view.release()
            self.fwd_cnt = (self.fwd_cnt + sent) & U32
        rest = length - sent
        if rest:  # fits the window: the credit check above
            self.tx_buf += payload.read(memory, sent, rest)
        self._maybe_credit_update()

    def _peer_shutdown(self, flags: int) -> None:
        new = flags & ~self.peer_shutdown
        self.peer_shutdown |= flags
        if new & VIRTIO_VSOCK_SHUTDOWN_RCV:
            self.to_guest_done = True
            self.data_ready = False
            self._shutdown_host(socket.SHUT_RD)
        self._advance()

    # -- toward the guest (rx queue) --------------------------------------------------------

    def fill_rx(self, memory: GuestMemory, writable: BufferList) -> int | None:
        """Write the next packet owed to the guest into an rx chain; None if nothing was due.

        Returns the bytes written (header + payload), or 0 when the chain is
        too small for the data that was due (the chain is then wasted).
        """
        for op in _OPS_BEFORE_DATA:
            if op in self.pending:
                return self._emit(memory, writable, op)
        if self.data_ready and self.can_read_host():
            written = self._recv_into(memory, writable)
            if written is not None:
                return written
        for op in _OPS_AFTER_DATA:
            if op in self.pending:
                return self._emit(memory, writable, op)
        return None

    def _emit(self, memory: GuestMemory, writable: BufferList, op: int) -> int:
        self.pending.discard(op)
        flags = self.shutdown_flags if op == VIRTIO_VSOCK_OP_SHUTDOWN else 0
        writable.write(memory, 0, self.header(op, flags=flags).pack())
        if op == VIRTIO_VSOCK_OP_RST:
            self.stats.resets_sent += 1
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self.credit_requested = True
        return HDR_SIZE

    def _recv_into(self, memory: GuestMemory, writable: BufferList) -> int | None:
        room = writable.total - HDR_SIZE
        if room <= 0:
            return 0
        want = min(room, MAX_PKT_BUF_SIZE, self.peer_credit())
        views = writable.skip(HDR_SIZE).views(memory, want)
        try:
            n = self.sock.recvmsg_into(views)[0]
        except (BlockingIOError, InterruptedError):
            self.data_ready = False
            return None
        except OSError as exc:
            self.kill(f"host read failed: {exc.strerror}", host_error=True)
            return None
        finally:
            for view in views:
                view.release()
        if n == 0:
            self._host_eof()
            return None
        if n < want:
            self.data_ready = False  # most likely drained; level-triggered epoll says if not
        self.tx_cnt = (self.tx_cnt + n) & U32
        self.stats.rx_bytes += n
        writable.write(memory, 0, self.header(VIRTIO_VSOCK_OP_RW, length=n).pack())
        if self.peer_credit() == 0 and not self.credit_requested:
            self.pending.add(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        return HDR_SIZE + n

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
