"""One vsock stream connection: a guest port on one side, a host Unix socket on the other.

:class:`Connection` speaks the protocol: it acts on the guest's packets, the host
socket's events, and writes what is owed to the guest into rx chains.  Its
states and their moves toward CLOSED are in ``state.py``, its credit and
snapshot counters in ``credit.py``.
"""

from __future__ import annotations

import select
import socket

from ember.devices.virtio.block.request import BufferList
from ember.devices.virtio.vsock.credit import StreamCredit
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
)
from ember.devices.virtio.vsock.state import ConnState
from ember.memory import GuestMemory

# Control packets in the order they go out: before data, then after it.
_OPS_BEFORE_DATA = (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
)
_OPS_AFTER_DATA = (VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RST)


class Connection(StreamCredit):
    """Protocol state of one stream; the muxer does the epoll and virtqueue plumbing."""

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
