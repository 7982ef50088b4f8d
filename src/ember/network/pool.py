"""Sandbox networks made ahead of time, and closed ones torn down, off a sandbox's critical path.

Why: building one sandbox network (namespace, veth, TAP, masquerade, the
host table's chain, the resolver's sockets) runs four ``ip``/``nft``
processes, ~35 ms on this host, and deleting it another ~15-20 ms; none
of that depends on the sandbox but its policy.  So a few networks wait
here ready, with the :data:`~ember.network.host.CLOSED` policy (nothing
gets out), and ``Sandbox(network=...)`` takes one and only loads its own
egress rules, while its VMM restores (:meth:`SandboxNetwork.apply`).  A
background thread refills the pool and deletes the networks of closed
sandboxes.

Never shared, never reused dirty:

- a network is in the pool or handed out, never both: :meth:`take` pops it
  under a lock, and a closed sandbox's network is deleted, never put back
  (a namespace once used keeps conntrack entries, DNAT rules, name-set
  elements: recycling it would have to find them all);
- across processes, each slot is held by the ``flock`` its creator took
  (:func:`ember.network.host._claim_slot`), from :meth:`SandboxNetwork.prepare`
  until its deletion is done; a process that dies drops its locks, and the
  next process to claim such a slot deletes what it left before building
  anew;
- a forked child forgets the pool it inherited (its copies of the lock
  fds are closed; the parent still owns those networks).

The pool's size is ``$EMBER_NET_POOL`` (default 2; 0 turns the pool off:
each network is then made on demand, but still torn down in the background).
At exit, the pool deletes what it holds and waits for pending teardowns; a
process killed before that (a daemon stopped by a signal) leaves its pooled
networks marked in ``/run/ember/net/pooled``, and the next pool to start
deletes those whose slot lock is free.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import logging
import os
import queue
import threading

from ember.network.host import CLOSED, SandboxNetwork
from ember.network.policy import NetworkPolicy
from ember.network.slots import LOCK_DIR

log = logging.getLogger(__name__)

POOLED_DIR = f"{LOCK_DIR}/pooled"  # a file K while slot K waits in some process's pool
SIZE_ENV = "EMBER_NET_POOL"
DEFAULT_SIZE = 2
SHUTDOWN_WAIT_S = 30.0
QUIET_WAIT_S = 2.0  # the longest background work waits for starting sandboxes
_FILL = "fill"
_STOP = "stop"
_Job = SandboxNetwork | str  # a network to delete, or _FILL / _STOP


class NetworkPool:
    """Up to ``size`` prepared networks, and the one thread that makes and deletes them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ready: collections.deque[SandboxNetwork] = collections.deque()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._filling = 0  # fills queued or running
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._policy = CLOSED  # what the pool's networks are made for: the last one taken
        # Takes under way, and slots taken whose sandbox is not up yet: background work
        # waits for both (see settled()).
        self._taking = 0
        self._starting: set[int] = set()
        self._quiet = threading.Condition(self._lock)

    def take(self, policy: NetworkPolicy) -> SandboxNetwork:
        """A network of this sandbox alone, ``policy`` being loaded over it: call its
        ``wait_applied()`` before the sandbox is used, its ``close()`` or :meth:`release`
        when done.  From the pool if it has one ready, else made now."""
        network = self._pop(policy)
        try:
            if network is None:
                network = SandboxNetwork.prepare(policy)
            elif not network.apply(policy):
                network.wait_rules()  # its rules allow what this policy may not: replace first
        except BaseException:
            if network is not None:
                network.close()
            with self._lock:
                self._taking -= 1
                self._quiet.notify_all()
            raise
        with self._lock:
            self._taking -= 1
            self._starting.add(network.slot)
        return network

    def settled(self, network: SandboxNetwork) -> None:
        """``network``'s sandbox is up (or failed): let the background work run, refill.

        The pool's thread waits while a sandbox is starting (up to
        :data:`QUIET_WAIT_S`): its ``ip``/``nft`` processes and the kernel's
        namespace clean-up competed with a restoring VMM for this host's two
        cores and slowed ``Sandbox()`` by ~10 ms.
        """
        with self._lock:
            self._starting.discard(network.slot)
            self._quiet.notify_all()
            if not self._stopped:
                self._start_locked()
                self._fill_locked()

    def release(self, network: SandboxNetwork) -> None:
        """Delete ``network`` (whose VMM is gone) in the background; its slot stays locked
        until the namespace is gone, so no one can claim it half deleted."""
        with self._lock:
            self._starting.discard(network.slot)
            self._quiet.notify_all()
            if not self._stopped:
                self._start_locked()
                self._jobs.put(network)
                return
        network.close()  # at exit: no thread to hand it to

    def fill(self) -> None:
        """Make networks in the background until the pool is full again (a daemon asks at
        start, so that its first networked sandbox finds one ready)."""
        with self._lock:
            if not self._stopped:
                self._start_locked()
                self._fill_locked()

    def ready(self) -> int:
        """How many networks wait in the pool now."""
        with self._lock:
            return len(self._ready)

    def _pop(self, policy: NetworkPolicy) -> SandboxNetwork | None:
        with self._lock:
            self._taking += 1
            if self._stopped:
                return None
            self._start_locked()
            self._policy = policy  # refills are made for it: the next take likely wants it too
            network = next((n for n in self._ready if n.policy == policy), None)
            if network is not None:
                self._ready.remove(network)
            elif self._ready:
                network = self._ready.popleft()
        if network is not None:
            _unmark(network.slot)  # a sandbox's now: a daemon may adopt it after a crash
        if network is not None and not os.path.exists(network.netns_path):
            self.release(network)  # deleted behind our back (ip netns delete): not usable
            return None
        return network

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="ember-net-pool", daemon=True)
            self._thread.start()

    def _fill_locked(self) -> None:
        while len(self._ready) + self._filling < self.size:
            self._filling += 1
            self._jobs.put(_FILL)

    def _is_quiet(self) -> bool:
        return self._stopped or not (self._taking or self._starting)

    def _work(self) -> None:
        _sweep()
        while True:
            job = self._jobs.get()
            if job == _STOP:
                return
            with self._lock:
                self._quiet.wait_for(self._is_quiet, QUIET_WAIT_S)
            if isinstance(job, SandboxNetwork):
                try:
                    job.close()
                except Exception:
                    log.exception("deleting sandbox network slot %d failed", job.slot)
                continue
            with self._lock:
                policy = self._policy
            try:
                network: SandboxNetwork | None = SandboxNetwork.prepare(policy)
            except Exception:  # not root, no iproute2...: take() will say why, on its thread
                log.debug("preparing a pooled sandbox network failed", exc_info=True)
                network = None
            if network is not None:
                _mark(network.slot)
            with self._lock:
                self._filling -= 1
                if network is not None and not self._stopped:
                    self._ready.append(network)
                    network = None
            if network is not None:
                _unmark(network.slot)
                network.close()

    def shutdown(self) -> None:
        """Delete the pooled networks and finish the pending deletions (at exit)."""
        with self._lock:
            self._stopped = True
            ready = list(self._ready)
            self._ready.clear()
            thread = self._thread
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join(SHUTDOWN_WAIT_S)
        for network in ready:
            _unmark(network.slot)
            with contextlib.suppress(Exception):
                network.close()
        if thread is not None and thread.is_alive():
            return  # stuck in a command: leave the rest to the next claimer of each slot
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, SandboxNetwork):
                with contextlib.suppress(Exception):
                    job.close()

    def forget(self) -> None:
        """In a forked child: drop the inherited networks without touching them (they are
        the parent's), closing only this process's copies of their fds."""
        for network in self._ready:
            network.forget()
        self._ready.clear()
        self._stopped = True


_pool: NetworkPool | None = None
_pool_lock = threading.Lock()


def network_pool() -> NetworkPool:
    """This process's pool, made (and registered for clean-up at exit) on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = NetworkPool(pool_size())
            atexit.register(_pool.shutdown)
        return _pool


def pool_size() -> int:
    text = os.environ.get(SIZE_ENV, "")
    try:
        return max(0, int(text)) if text else DEFAULT_SIZE
    except ValueError:
        return DEFAULT_SIZE


def take_network(policy: NetworkPolicy) -> SandboxNetwork:
    """A sandbox's network: see :meth:`NetworkPool.take`."""
    return network_pool().take(policy)


def network_settled(network: SandboxNetwork) -> None:
    """A sandbox took ``network`` and is up: see :meth:`NetworkPool.settled`."""
    network_pool().settled(network)


def release_network(network: SandboxNetwork) -> None:
    """Delete a closed sandbox's network in the background: see :meth:`NetworkPool.release`."""
    network_pool().release(network)


def _mark(slot: int) -> None:
    os.makedirs(POOLED_DIR, exist_ok=True)
    with open(f"{POOLED_DIR}/{slot}", "w"):
        pass


def _unmark(slot: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{POOLED_DIR}/{slot}")


def _sweep() -> None:
    """Delete the pooled networks of processes that died without their exit handlers (a
    daemon killed by a signal): marked pooled, their slot's lock free.  Never a sandbox's
    network: a taken one is unmarked, and a daemon may re-adopt it after a crash."""
    try:
        names = os.listdir(POOLED_DIR)
    except FileNotFoundError:
        return
    for name in names:
        if not name.isdigit():
            continue
        slot = int(name)
        fd = os.open(f"{LOCK_DIR}/{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # waiting in a live process's pool
            os.close(fd)
            continue
        if not os.path.exists(f"{POOLED_DIR}/{slot}"):  # taken meanwhile, then released
            os.close(fd)
            continue
        _unmark(slot)
        try:
            SandboxNetwork(slot, CLOSED, fd).close()  # closes fd too
        except Exception:
            log.exception("deleting stale pooled network slot %d failed", slot)


def _after_fork_in_child() -> None:
    global _pool, _pool_lock
    _pool_lock = threading.Lock()  # another thread may have held it at the fork
    if _pool is not None:
        with contextlib.suppress(Exception):
            atexit.unregister(_pool.shutdown)
        _pool.forget()
        _pool = None


os.register_at_fork(after_in_child=_after_fork_in_child)
