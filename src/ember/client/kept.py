"""Blocking connections to the agent kept for the next call, and closed once unused.

Why: a new vsock connection costs this guest ~50-70k emulated kernel instructions (an
``accept``, a hand-over between the agent's threads, the GIL passed between them) where a
request on a kept one costs ~26k. Why they expire: a kept connection holds an agent thread
and its socket, and an idle sandbox should have none, so that it can be parked; after
``session.KEEPALIVE_IDLE_S`` unused (:class:`~ember.client.session.KeepalivePool`) a timer
closes it.

The blocking client keeps every connection it may reuse here; the asyncio client keeps here
the connections of its file transfers through the shared region, which run in a worker
thread on blocking sockets (its other calls keep asyncio streams of their own).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from ember.client.session import EXPIRY_SLACK_S, KeepalivePool
from ember.client.sockets import still_open

__all__ = ["KeptSockets"]


class KeptSockets:
    """A thread-safe pool of kept sockets, with the timer that closes the stale ones.

    ``resume``: the connection a restored VM's snapshot carried over, handed out (once) when
    the pool is empty. Satisfies :class:`ember.client.file_ring.Kept`.
    """

    def __init__(
        self,
        resume: Callable[[], socket.socket | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resume = resume
        self._pool: KeepalivePool[socket.socket] = KeepalivePool(clock)
        self._lock = threading.Lock()
        self._expiry: threading.Timer | None = None

    def take(self) -> socket.socket | None:
        """The newest kept connection the agent has not closed, else the carried-over one
        (once), else None: the caller connects."""
        while (sock := self._pool.pop()) is not None:
            if still_open(sock):
                return sock
            sock.close()
        with self._lock:
            resume, self._resume = self._resume, None
        return resume() if resume is not None else None

    def pop(self) -> socket.socket | None:
        """The newest kept connection as it is (a spare's warm-up hands it on), else None."""
        return self._pool.pop()

    def keep(self, sock: socket.socket) -> None:
        """Keep ``sock`` for the next call (closed if the pool is full)."""
        if not self._pool.put(sock):
            sock.close()
            return
        self._arm_expiry()

    def __len__(self) -> int:
        return len(self._pool)

    def close(self) -> None:
        """Close the kept connections (the pool stays usable)."""
        for sock in self._pool.drain():
            sock.close()
        with self._lock:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None

    def _expire(self) -> None:
        with self._lock:
            self._expiry = None
        for sock in self._pool.expire():
            sock.close()
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        """A timer for when the oldest kept connection is due (none when none is kept)."""
        with self._lock:
            due = self._pool.next_expiry()
            if self._expiry is None and due is not None:
                self._expiry = threading.Timer(due + EXPIRY_SLACK_S, self._expire)
                self._expiry.daemon = True
                self._expiry.start()
