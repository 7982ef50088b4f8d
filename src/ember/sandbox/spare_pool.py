"""A pool of things made ahead of time by one background thread, handed out once each.

:mod:`ember.sandbox.spares` keeps warmed sandbox VMs in one; this module knows nothing of
VMs: ``make(key)`` makes one (on the pool's thread) and the :class:`Spare` it returns says
how to tell it is still usable (asked at take, cheap) or still current (asked of waiting
ones every :data:`SWEEP_S`, off the takers' path), and how to close it.

The rules: a spare is popped under the lock and handed to one caller, never put back;
``keep(key, n)`` sets how many wait (a lower count closes the extras, 0 all of them);
``auto`` gives every key asked for that many, for the :data:`MAX_AUTO_KEYS` used last. The
thread waits while something is being made on demand (:meth:`SparePool.starting`, up to
:data:`QUIET_WAIT_S`) and for :data:`AFTER_TAKE_S` after a take, so that it does not slow
the taker down on a small host; a failing ``make`` backs off :data:`BACKOFF_S`. Pools made
through :func:`register` are shut down at exit and forgotten in a forked child.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

SIZE_ENV = "EMBER_SPARES"
MAX_AUTO_KEYS = 4  # option sets that $EMBER_SPARES keeps spares for (least recently used out)
MAX_SPARES = 16  # per option set: keep_warm's ceiling
QUIET_WAIT_S = 2.0  # the longest a refill waits for sandboxes being made on demand
# A refill starts this long after the last take. Started at once, it slowed the taker's first
# two Python execs here by ~50 ms each (this process's GIL and the host's two cores shared
# with a restore and a warm-up); 0.3 s covers the first calls of a typical taker.
AFTER_TAKE_S = 0.3
BACKOFF_S = 5.0  # after a failed refill, the pause before that option set is tried again
SHUTDOWN_WAIT_S = 10.0
SWEEP_S = 1.0  # how often waiting spares are checked for being current

T = TypeVar("T")


@dataclass
class Spare(Generic[T]):
    """One warmed sandbox and what its pool needs to know about it."""

    item: T
    usable: Callable[[], bool]  # its VM still runs, its template was not rebuilt (at take)
    close: Callable[[], None]
    # What a take cannot afford to ask (~1-2 ms), asked of waiting spares every
    # SWEEP_S by the pool's thread: is it still what a sandbox made now would be?
    current: Callable[[], bool] = lambda: True


class SparePool(Generic[T]):
    """Spares by option set (``key``), and the one thread that makes them."""

    def __init__(self, make: Callable[[Hashable], Spare[T]], auto: int = 0) -> None:
        self._make = make  # restores and warms one (on the pool's thread)
        self._auto = min(max(auto, 0), MAX_SPARES)
        self._wanted: dict[Hashable, int] = {}  # keep_warm's counts
        self._recent: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._ready: dict[Hashable, collections.deque[Spare[T]]] = {}
        self._filling: set[Hashable] = set()
        self._failed_until: dict[Hashable, float] = {}
        self._starting = 0  # sandboxes being made on demand: refills wait for them
        self._last_take = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.taken = 0  # spares handed out (tests and benches read it)

    # --- the callers' side
    def take(self, key: Hashable) -> T | None:
        """A warmed spare of ``key``, or None (then make one on demand, inside :meth:`starting`)."""
        evicted: list[Spare[T]] = []
        first = True
        while True:
            with self._lock:
                if self._stopped:
                    return None
                if first and self._auto and key not in self._wanted:
                    # Registered in the same hold of the lock as the look at the queue: the
                    # refill this asks for cannot slip in between and be handed out as if
                    # it had waited.
                    self._recent[key] = None
                    self._recent.move_to_end(key)
                    while len(self._recent) > MAX_AUTO_KEYS:
                        dropped, _ = self._recent.popitem(last=False)
                        evicted += self._discard_locked(dropped)
                first = False
                queue = self._ready.get(key)
                spare = queue.popleft() if queue else None
                self._kick_locked()  # a refill, once the caller is up
            if evicted:  # closed off the taker's path
                threading.Thread(target=_close_all, args=(evicted,), daemon=True).start()
                evicted = []
            if spare is None:
                return None
            if spare.usable():
                with self._lock:
                    self.taken += 1
                    self._last_take = time.monotonic()
                return spare.item
            spare.close()  # died while it waited, or its template changed

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around a sandbox made on demand: the refill thread waits until it is up."""
        with self._lock:
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1
                self._wake.notify_all()

    def keep(self, key: Hashable, count: int) -> None:
        """Keep ``count`` spares of ``key`` from now on (0: stop, and close those waiting)."""
        if count < 0 or count > MAX_SPARES:
            raise ValueError(f"keep_warm count must be between 0 and {MAX_SPARES}, not {count}")
        with self._lock:
            if self._stopped:
                return
            closing: list[Spare[T]] = []
            if count:
                self._wanted[key] = count
                self._failed_until.pop(key, None)
                queue = self._ready.get(key)
                while queue and len(queue) > self._count_locked(key):
                    closing.append(queue.pop())
            else:
                self._wanted.pop(key, None)
                self._recent.pop(key, None)
                closing = self._discard_locked(key)
            self._kick_locked()
        _close_all(closing)  # before it returns (one being made is closed once it is made)

    def ready(self, key: Hashable) -> int:
        """How many spares of ``key`` wait now."""
        with self._lock:
            return self._waiting(key)

    def wait_ready(self, key: Hashable, count: int, timeout: float) -> bool:
        """Wait until ``count`` spares of ``key`` wait (a bench, a daemon at start)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._waiting(key) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._wake.wait(min(left, 0.1))
            return True

    # --- the refill thread
    def _waiting(self, key: Hashable) -> int:
        return len(self._ready.get(key, ()))

    def _count_locked(self, key: Hashable) -> int:
        auto = self._auto if key in self._recent else 0
        return max(self._wanted.get(key, 0), auto)

    def _discard_locked(self, key: Hashable) -> list[Spare[T]]:
        """Take ``key``'s waiting spares out, for the caller to close once it unlocks."""
        return list(self._ready.pop(key, ()))

    def _kick_locked(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._work, name="ember-spares", daemon=True)
            self._thread.start()
        self._wake.notify_all()

    def _next_locked(self) -> Hashable | None:
        now = time.monotonic()
        for key in [*self._wanted, *self._recent]:
            if key in self._filling or self._failed_until.get(key, 0.0) > now:
                continue
            if self._waiting(key) < self._count_locked(key):
                return key
        return None

    def _work(self) -> None:
        while True:
            self._sweep()
            with self._lock:
                key = self._next_locked()
                if key is None:
                    if self._stopped:
                        return
                    self._wake.wait(SWEEP_S)  # then sweeps, and re-checks keys backing off
                    continue
                self._wake.wait_for(lambda: self._stopped or not self._starting, QUIET_WAIT_S)
                # Made now, a refill would compete with the taker's first calls.
                while (
                    not self._stopped
                    and (left := self._last_take + AFTER_TAKE_S - time.monotonic()) > 0
                ):
                    self._wake.wait(left)
                if self._stopped:
                    return
                self._filling.add(key)
            spare: Spare[T] | None = None
            try:
                spare = self._make(key)
            except Exception:
                log.warning(
                    "making a spare sandbox failed; retrying in %gs", BACKOFF_S, exc_info=True
                )
                with self._lock:
                    self._failed_until[key] = time.monotonic() + BACKOFF_S
            with self._lock:
                self._filling.discard(key)
                wanted = self._count_locked(key)
                if spare is not None and not self._stopped and self._waiting(key) < wanted:
                    self._ready.setdefault(key, collections.deque()).append(spare)
                    spare = None
                self._wake.notify_all()
            if spare is not None:
                spare.close()  # no longer wanted (keep_warm(0), shut down): not kept

    def _sweep(self) -> None:
        """Close the waiting spares that are no longer current (a new image's default
        template): checked here, off the takers' path."""
        with self._lock:
            waiting = [(key, spare) for key, queue in self._ready.items() for spare in queue]
        stale = [(key, spare) for key, spare in waiting if not _safely(spare.current)]
        closing = []
        with self._lock:
            for key, spare in stale:
                queue = self._ready.get(key)
                if queue is not None and spare in queue:
                    queue.remove(spare)
                    closing.append(spare)
        _close_all(closing)

    # --- ends
    def shutdown(self) -> None:
        """Close the waiting spares and stop the thread (at exit)."""
        with self._lock:
            self._stopped = True
            waiting = [s for queue in self._ready.values() for s in queue]
            self._ready.clear()
            self._wake.notify_all()
            thread = self._thread
        _close_all(waiting)
        if thread is not None and thread is not threading.current_thread():
            thread.join(SHUTDOWN_WAIT_S)

    def forget(self) -> None:
        """In a forked child: the spares are the parent's VMs; drop them untouched."""
        self._ready.clear()
        self._stopped = True
        self._thread = None
        self._lock = threading.Lock()  # the parent's thread may have held it at the fork
        self._wake = threading.Condition(self._lock)


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


def _close_all(spares: list[Spare[T]]) -> None:
    for spare in spares:
        try:
            spare.close()
        except Exception:
            log.debug("closing a spare sandbox failed", exc_info=True)


def auto_count() -> int:
    """``$EMBER_SPARES``: spares per option set for every set this process uses (0: off)."""
    text = os.environ.get(SIZE_ENV, "")
    try:
        return min(max(0, int(text)), MAX_SPARES) if text else 0
    except ValueError:
        return 0


_pools: list[SparePool[object]] = []
_pools_lock = threading.Lock()


def register(pool: SparePool[T]) -> SparePool[T]:
    """Close ``pool``'s spares at exit, and forget them in a forked child."""
    with _pools_lock:
        if not _pools:
            atexit.register(_shutdown_all)
            os.register_at_fork(after_in_child=_forget_all)
        _pools.append(pool)  # type: ignore[arg-type]
    return pool


def _shutdown_all() -> None:
    for pool in list(_pools):
        pool.shutdown()


def _forget_all() -> None:
    for pool in _pools:
        pool.forget()
