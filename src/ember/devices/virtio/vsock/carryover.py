"""What the vsock muxer carries over a snapshot: port numbers, and quiet connections.

A snapshot keeps the next local port (a restored copy must not reuse ports
the guest may still hold) and the counters of idle, clean connections; the
restored muxer keeps those for a host client's ``RESUME <port>`` (the guest
ends are still open), and resets the guest end of every other connection.
"""

from __future__ import annotations

import socket

from ember.devices.virtio.vsock.packet import U32, VIRTIO_VSOCK_OP_RST, host_header
from ember.devices.virtio.vsock.state import CONN_TX_BUF_SIZE, ConnState
from ember.devices.virtio.vsock.table import (
    LOCAL_PORT_MAX,
    LOCAL_PORT_MIN,
    MAX_PENDING_RESETS,
    ConnectionTable,
)

MAX_RESUMABLE = 8  # connections a snapshot carries over for RESUME


class SnapshotCarryOver(ConnectionTable):
    """The connection table's side of snapshots: what to save, and what to do on restore."""

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


def promised_window(state: dict[str, int]) -> int:
    """What the guest of a snapshot's quiet connection may still send: up to its right edge.

    Capped at the largest window we ever grant, so a doctored state file
    cannot reserve more than one connection's worth.
    """
    edge = int(state["last_fwd_cnt_sent"]) + int(state["buf_alloc"])
    room = (edge - int(state["fwd_cnt"])) & U32
    return 0 if room > U32 // 2 else min(room, CONN_TX_BUF_SIZE)
