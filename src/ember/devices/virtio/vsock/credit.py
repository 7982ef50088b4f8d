"""A connection's credit (§5.10.6.3), and the counters a snapshot carries over.

Credit, both ways, in modulo-2**32 counters:

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
  :data:`~ember.devices.virtio.vsock.state.CONN_TX_BUF_SIZE` as the budget
  allows, never shrunk below what the guest was promised.  A guest that sends
  past ``fwd_cnt + buf_alloc`` is reset, so the VMM memory of all connections
  together stays within the budget.
"""

from __future__ import annotations

import socket

from ember.devices.virtio.vsock.packet import (
    MAX_PKT_BUF_SIZE,
    U32,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VsockHeader,
    host_header,
)
from ember.devices.virtio.vsock.state import ConnState, StreamState

CREDIT_UPDATE_THRESHOLD = MAX_PKT_BUF_SIZE  # forwarded bytes that deserve a CREDIT_UPDATE


class StreamCredit(StreamState):
    """Credit accounting of one stream, both ways, and its state for a snapshot."""

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
