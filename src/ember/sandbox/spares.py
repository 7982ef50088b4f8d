"""Sandboxes restored and warmed ahead of time, so that ``Sandbox()`` hands one over at once.

Why: on this host a restored sandbox's first request costs ~60-90 ms of emulated guest
kernel time that a later request does not (the VM's shadow page tables are rebuilt page
by page as the guest touches them; the resume announcement; the run_code worker's first
look at its new region), on top of the restore itself (~25 ms). None of it depends on who
asks. A *spare* is a sandbox restored from the same template with the same options, whose
first ``run_code`` and first ``ping`` were made in the background: ``Sandbox()`` takes it in
microseconds, and its first call costs what a later call costs.

Opt-in, because a spare is a whole VM (~11 MiB of host memory, 12 descriptors) that a
one-shot process (``ember run``) would waste, and warming it takes ~0.1 s of a core:

- ``Sandbox.keep_warm(count, **options)`` keeps ``count`` spares of those options
  (0: none, and the ones waiting are closed);
- ``$EMBER_SPARES=N`` gives every set of options this process makes a sandbox with N
  spares, for the :data:`MAX_AUTO_KEYS` sets used last.

Never shared, never recycled: a spare is popped under the pool's lock and handed to one
caller; a closed sandbox is never put back. Each spare is its own restore (its own
region, entropy and clock announcement), exactly what ``Sandbox()`` would have made on
demand. A spare whose VMM died while it waited, or whose template was rebuilt since, is
closed at take and the caller gets a fresh one. The refill thread waits while a sandbox
is being made on demand (up to :data:`QUIET_WAIT_S`), so it does not slow that one down
on a small host; a failing refill backs off. A forked child forgets its parent's spares
(they are the parent's VMs); at exit they are closed.

:class:`SparePool` is generic over what it keeps; what this process keeps are
:class:`Warm` VMs (a VMM and the agent connection its warm-up left open), which either
facade drives: ``Sandbox()`` and ``AsyncSandbox()`` call :func:`take`, and a miss makes
its sandbox on demand inside :func:`making`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast

from ember.client import AgentClient, CodeRing, LazyRegion
from ember.descriptors import descriptors_checked
from ember.errors import ConfigError
from ember.launcher import SandboxSpec, VmmProcess
from ember.snapshot import STATE_FILE
from ember.templates import DEFAULT, find, start_vmm, template_dir

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
# The run_code worker's pre-faulted heap a spare's warm-up writes once: a restored guest's
# first write to each page costs ~20 µs of shadow paging here (a first 10 MiB bytearray
# 50-75 ms, a second 1 ms). The pages become the spare's own: 16 MiB of host memory each.
WARM_HEAP_MIB = 16
# A spare's VMM runs at this nice until it is taken: on a small host its restore and warm-up
# (~0.3 s of CPU) would otherwise slow the sandbox whose take started the refill.
BACKGROUND_NICE = 19

T = TypeVar("T")


@dataclass
class Spare(Generic[T]):
    """One warmed sandbox and what its pool needs to know about it."""

    item: T
    usable: Callable[[], bool]  # its VM still runs, and its template was not rebuilt since
    close: Callable[[], None]


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
        with self._lock:
            if self._stopped:
                return None
            evicted: list[Spare[T]] = []
            if self._auto and key not in self._wanted:
                self._recent[key] = None
                self._recent.move_to_end(key)
                while len(self._recent) > MAX_AUTO_KEYS:
                    dropped, _ = self._recent.popitem(last=False)
                    evicted += self._discard_locked(dropped)
            self._kick_locked()
        if evicted:  # closed off the taker's path
            threading.Thread(target=_close_all, args=(evicted,), daemon=True).start()
        while True:
            with self._lock:
                queue = self._ready.get(key)
                spare = queue.popleft() if queue else None
                self._kick_locked()  # a refill, once the caller is up
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
            return len(self._ready.get(key, ()))

    def wait_ready(self, key: Hashable, count: int, timeout: float) -> bool:
        """Wait until ``count`` spares of ``key`` wait (a bench, a daemon at start)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._ready.get(key, ())) < count:
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
            if len(self._ready.get(key, ())) < self._count_locked(key):
                return key
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                key = self._next_locked()
                while key is None and not self._stopped:
                    self._wake.wait(1.0)  # also re-checks keys backing off
                    key = self._next_locked()
                if self._stopped or key is None:
                    return
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


# --- what this process keeps: warmed VMs, for both facades


@dataclass
class Warm:
    """A restored VM after its first calls: the facade drives ``vmm`` and adopts ``conn``."""

    vmm: VmmProcess
    conn: socket.socket  # to the agent, which waits on it for a request


class Watcher(Protocol):
    """Told of each spare's life: ``ember serve`` records its spares, so that the next
    daemon kills those a crashed one left (they are the keeper's children, not its own)."""

    def made(self, warm: Warm) -> None: ...
    def taken(self, warm: Warm) -> None: ...
    def gone(self, warm: Warm) -> None: ...


SpareKey = tuple[SandboxSpec, "str | None"]
_vms: SparePool[Warm] | None = None
_vms_lock = threading.Lock()
_watcher: Watcher | None = None


def watch(watcher: Watcher | None) -> None:
    """Tell ``watcher`` of every spare made, taken or closed from now on."""
    global _watcher
    _watcher = watcher


def spare_pool() -> SparePool[Warm]:
    """This process's spares, made (and registered for the end) on first use."""
    global _vms
    with _vms_lock:
        if _vms is None:
            _vms = register(SparePool(_make, auto=auto_count()))
        return _vms


def spare_key(spec: SandboxSpec, template: str | None, boot: bool) -> SpareKey | None:
    """What a spare must have been made with to stand for this sandbox; None when no spare
    can (a cold boot; a network, whose namespace and policy are the sandbox's own)."""
    return None if boot or spec.network is not None else (spec, template)


def take(spec: SandboxSpec, template: str | None, boot: bool) -> Warm | None:
    """A spare for this sandbox, or None: then make it on demand, inside :func:`making`."""
    if _vms is None and not auto_count():
        return None  # spares were never asked for: nothing to look up
    key = spare_key(spec, template, boot)
    warm = None if key is None else spare_pool().take(key)
    if warm is not None:
        _renice(warm.vmm, 0)
        if _watcher is not None:
            _watcher.taken(warm)
    return warm


def making() -> contextlib.AbstractContextManager[None]:
    """Around a sandbox made on demand (refills wait for it)."""
    return _vms.starting() if _vms is not None else contextlib.nullcontext()


def keep_warm(count: int = 1, **options: Any) -> None:
    """Keep ``count`` sandboxes of these options (``Sandbox``'s arguments) restored and
    warmed in the background, so that ``Sandbox(**options)`` (or ``AsyncSandbox``) gets
    one at once and its first call costs what a later one does; 0 stops, and closes those
    waiting. For sandboxes restored from a template without ``network=``."""
    from ember.sandbox.options import SandboxOptions

    opts = SandboxOptions(**options)
    if opts.network not in (None, False) or opts.boot:
        raise ConfigError("spares are for sandboxes restored from a template without network=")
    key = spare_key(opts.local_spec(), opts.template, opts.boot)
    assert key is not None
    spare_pool().keep(key, count)


def _make(key: Hashable) -> Spare[Warm]:
    """Restore one and make its first calls, as its facade would: the first ``run_code``
    first (the worker still polls after the restore, and a first request of another kind
    would tell it to stop; it writes :data:`WARM_HEAP_MIB` of the worker's heap), then the
    agent's first request (the resume announcement). The
    connection that leaves open is held while the spare waits: an idle VM with no
    connection is parked, and its next first request costs ~70 ms again (held, it costs
    ~0.2% of a core)."""
    spec, template = cast(SpareKey, key)
    state = find(template or DEFAULT, spec).dir / STATE_FILE
    made_from = _identity(state)
    vmm = start_vmm(spec, template=template, boot=False)
    _renice(vmm, BACKGROUND_NICE)  # its warm-up yields to the sandboxes in use
    region = LazyRegion(vmm.shm_region)
    code_ring = CodeRing(region, alive=lambda: not vmm.exited(), expect=vmm.restored)
    client = AgentClient(
        vmm.connect, resume=vmm.resume, announce_resume=True, code_ring=code_ring, shm=region
    )
    conn = None
    try:
        with descriptors_checked():
            client.run_code(f"bytearray({WARM_HEAP_MIB} << 20) and None")
            client.ping()
            conn = client.take_kept()
        if conn is None:
            raise ConfigError("the agent did not keep its connection open")  # an old image
    except BaseException:
        vmm.close()
        raise
    finally:
        client.close()
        code_ring.close()
        region.close()
    warm = Warm(vmm, conn)
    watcher = _watcher
    if watcher is not None:
        try:
            watcher.made(warm)
        except BaseException:
            conn.close()
            vmm.close()
            raise

    def usable() -> bool:
        # A template rebuilt in place (sb.snapshot(name) again) has a new state file; a
        # new image another default template (~1 ms to tell: the image's identity).
        if vmm.exited() or _identity(state) != made_from:
            return False
        try:
            return template_dir(template or DEFAULT, spec) / STATE_FILE == state
        except Exception:
            return False  # no image now: the on-demand path says why

    def close() -> None:
        if watcher is not None:
            watcher.gone(warm)
        warm.conn.close()
        vmm.close()

    return Spare(warm, usable, close)


def _renice(vmm: VmmProcess, nice: int) -> None:
    """Every thread of ``vmm`` at ``nice`` (Linux's nice is per thread; threads started
    later inherit their starter's). Best effort: a VMM that ended has nothing to renice."""
    pid = vmm.vmm_pid
    if pid is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
