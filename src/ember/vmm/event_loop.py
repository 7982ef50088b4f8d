"""The VMM's event thread: one epoll over every fd a device waits on.

Queue kicks (ioeventfds), and later TAP and vsock sockets, are served here,
off the vCPU threads, so a slow device never stalls a vCPU and no thread
ever busy-waits.  Callbacks must not raise; if one does, the error is
logged and counted, and the loop goes on serving the other devices.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.vmm.threads import name_this_thread

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.EpollSelector()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._stop_fd, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._tick: tuple[float, Callable[[], float]] | None = None
        self._on_start: Callable[[], None] | None = None
        # call_every: handle -> [next due, interval, callback]; only the event thread touches it
        self._periodic: dict[int, list[Any]] = {}
        self._next_handle = 0
        self.callback_errors = 0

    def set_tick(self, interval: float, callback: Callable[[], float]) -> None:
        """Also call ``callback`` after ``interval`` seconds, then after as many seconds as it
        returns each time (before :meth:`start`)."""
        self._tick = (interval, callback)

    def call_every(self, interval: float, callback: Callable[[], object]) -> int:
        """Call ``callback`` every ``interval`` seconds until :meth:`cancel` (event thread only:
        a control request or a device callback may start one, no other thread)."""
        self._next_handle += 1
        self._periodic[self._next_handle] = [time.monotonic() + interval, interval, callback]
        return self._next_handle

    def cancel(self, handle: int) -> None:
        self._periodic.pop(handle, None)

    def add_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time ``fd`` (an eventfd) is signalled; the count is drained."""

        def on_ready() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()

        self._selector.register(fd, selectors.EVENT_READ, on_ready)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except KeyError:
            pass

    def start(self, on_start: Callable[[], None] | None = None) -> None:
        """Serve on a new thread; ``on_start`` runs first on it (e.g. to install seccomp)."""
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name="ember-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_this_thread()
        if self._on_start is not None:
            self._on_start()
        interval = self._tick[0] if self._tick is not None else None
        next_tick = time.monotonic() + interval if interval is not None else None
        while True:
            due = [entry[0] for entry in self._periodic.values()]
            if next_tick is not None:
                due.append(next_tick)
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            for key, _mask in self._selector.select(timeout):
                if key.data is None:
                    return
                self._call(key.data)
            if self._periodic:
                self._run_periodic()
            if next_tick is not None and self._tick is not None and interval is not None:
                now = time.monotonic()
                if now >= next_tick:
                    wanted = self._call(self._tick[1])
                    next_tick = now + (wanted if isinstance(wanted, float) else interval)

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for handle, entry in list(self._periodic.items()):
            if now >= entry[0] and handle in self._periodic:
                entry[0] = max(entry[0] + entry[1], now)  # no catch-up burst after a stall
                self._call(entry[2])

    def _call(self, callback: Callable[[], object]) -> object:
        try:
            return callback()
        except Exception:
            self.callback_errors += 1
            log.exception("device callback failed")
            return None

    def stop(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._selector.close()
        os.close(self._stop_fd)
