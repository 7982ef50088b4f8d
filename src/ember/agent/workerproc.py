"""The ``run_code`` worker's process: its start, its holder, its death and its replacement.

The first worker (the template's) is a ``python3 -m ember.agent.worker`` of its own, started
in the background when the agent starts; it touches the pre-faulted heap and maps the whole
shared region (~4.3 s here), which every restored sandbox inherits. A replacement, after a
death or a kill, is a pre-started interpreter of the exec pool (:meth:`WorkerProcess.use_pool`)
handed the same module like any Python program: its start-up and the template's preload are
done, so the next call waits a few seconds instead of ~30 for a fresh ``python3`` importing
the preload, and, having a holder (see :mod:`ember.agent.pool`), its own death is reported
before its memory is torn down. With the pool empty it waits for the mother's fork, as an
exec would; without a pool, or one that cannot take it, a fresh ``python3`` starts. A worker
that is not a pool member clones a holder of its own (``pyclone.holder_without``: without
our socket, whose end is how we hear of its death), which the pool frees when idle: the
template's worker's death is then reported in ~0.05 s instead of the ~4 s the guest kernel
takes to tear down its heap and its mapping of the shared region. A replacement maps only
its code slots of that region (:data:`ember.ring.CODE_SLOTS`).

The calls themselves (:class:`ember.agent.runcode.CodeRunner`) hold :attr:`_lock` for a
whole call; everything here that starts or discards a worker runs with it held, except the
watcher, which takes it to replace a worker that died between calls.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import sys
import threading

from ember.agent.codering import PREMAP_ENV, DeathNotice
from ember.agent.common import log
from ember.agent.heap import HEAP_ENV, with_malloc_env
from ember.agent.member import BACKGROUND_NICE, kill_holder, renice
from ember.agent.preload import ENV as PRELOAD_ENV
from ember.protocol import Kind, ProtocolError, decode_json, read_frame

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ember.agent.pool import InterpreterPool

__all__ = ["STARTUP_TIMEOUT", "WorkerProcess", "WorkerState", "describe"]

STARTUP_TIMEOUT = 300.0  # a cold python3 in the guest takes 7-18 s; leave a wide margin


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # could not start; the next call tries again
    STOPPED = "stopped"


def _package_root() -> str:
    """The directory holding the ``ember`` package, for the worker's PYTHONPATH."""
    here = os.path.dirname(os.path.abspath(__file__))  # .../ember/agent
    return os.path.dirname(os.path.dirname(here))


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def _holder(ready: bytes) -> int:
    """The holder pid a worker's "ready" names, if it is our child (cloned with
    ``CLONE_PARENT``, so that only we can reap it and its pid stays its own until we do)."""
    try:
        pid = decode_json(ready).get("holder")
    except ProtocolError:
        return 0
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return 0
    try:  # ChildProcessError: not ours. WNOWAIT: a dead one stays a zombie, its pid ours
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0
    return pid


class WorkerProcess:
    """Owns the worker process: start, detect death, replace (see the module)."""

    def __init__(self, command: list[str] | None = None, *, heap_bytes: int = 0) -> None:
        self._command = command or [sys.executable, "-m", "ember.agent.worker"]
        # Touched by the first worker only (the template's): a replacement started in a live
        # sandbox would pay a page fault per page, the very cost the heap exists to avoid.
        self._heap_bytes = heap_bytes
        self._lock = threading.Lock()  # held for a whole call, and while (re)starting
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.state = WorkerState.STOPPED
        self.last_error = ""
        self._closed = False
        self._started_one = False  # the first worker (the template's) is a python3 of its own
        # Hosts waiting on the code rings learn of a worker's death through the region.
        self.notice = DeathNotice.open()
        self.last_death = ""
        self._pool: InterpreterPool | None = None
        self._pooled: set[int] = set()  # workers that are pool members (pids): released to it
        self._holders: dict[int, int] = {}  # worker pid -> its own holder's (not pooled ones)
        # Workers whose watcher has not yet published their death (see _discard).
        self._unpublished: set[subprocess.Popen[bytes]] = set()
        self._published = threading.Condition()
        self.replacements = 0  # workers started after the first, and how many the pool gave
        self.pooled_replacements = 0

    def use_pool(self, pool: InterpreterPool | None) -> None:
        """Start replacements in ``pool``'s pre-started interpreters (see the module), and
        let it see the cells the worker serves over the code ring."""
        self._pool = pool
        if pool is not None and self.notice is not None:
            pool.watch_cells(self.notice.read_cells)

    def start_in_background(self) -> None:
        """Begin starting a worker without making the caller wait for it."""
        self.state = WorkerState.STARTING
        threading.Thread(target=self._start_locked, name="worker-start", daemon=True).start()

    def _start_locked(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._ensure()
            except Exception as exc:
                log(f"run_code worker did not start: {exc}")

    def pids(self) -> list[int]:
        """The worker's process id, if it has one (whose heap a template records; not polled:
        that would reap a dead worker behind the lock's back, and a dead one has no heap)."""
        proc = self._proc
        return [proc.pid] if proc is not None else []

    def _ensure(self) -> socket.socket:
        """Return a live worker's socket, starting one if needed (lock held)."""
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._closed:
            raise RuntimeError("the agent is shutting down")
        self._discard()
        self.state = WorkerState.STARTING
        ours, theirs = socket.socketpair()
        env = with_malloc_env(os.environ)  # freed memory stays in the heap: ember.agent.heap
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH")) if p
        )
        first = not self._started_one
        self._started_one = True
        if not first:
            self.replacements += 1
        env[HEAP_ENV], self._heap_bytes = str(self._heap_bytes), 0
        if first:
            env[PREMAP_ENV] = "1"
        # A replacement is a caller's work, as a request is: the pool's refills and the freeing
        # of old programs' memory (seconds of guest CPU each) wait until it is up.
        busy = None if first else self._pool
        if busy is not None:
            busy.busy()
        try:
            return self._start(first, ours, theirs, env)
        finally:
            if busy is not None:
                busy.idle()

    def _start(
        self, first: bool, ours: socket.socket, theirs: socket.socket, env: dict[str, str]
    ) -> socket.socket:
        """(Lock held.) Start a worker on ``theirs`` and wait for its "ready" on ``ours``."""
        try:
            proc = None if first else self._from_pool(theirs, env)
            if proc is None:
                proc = subprocess.Popen(
                    [*self._command, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # output below sys.stdout (os.write, children)
                    stderr=subprocess.DEVNULL,  # must not flood the serial console
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            ours.close()
            self.state, self.last_error = WorkerState.FAILED, str(exc)
            raise
        finally:
            theirs.close()
        self._proc, self._sock = proc, ours
        ours.settimeout(STARTUP_TIMEOUT)
        try:
            frame = read_frame(ours)
            if frame is None or frame[0] is not Kind.RESULT:
                raise ProtocolError(f"worker {describe(proc.wait())} while starting")
        except (OSError, ProtocolError) as exc:
            self._discard()
            self.state, self.last_error = WorkerState.FAILED, str(exc)
            raise
        ours.settimeout(None)
        if proc.pid not in self._pooled and (holder := _holder(frame[1])):
            self._holders[proc.pid] = holder
        self.state, self.last_error = WorkerState.READY, ""
        with self._published:
            self._unpublished.add(proc)
        threading.Thread(target=self._watch, args=(proc,), name="worker-watch", daemon=True).start()
        return ours

    def _from_pool(
        self, sock: socket.socket, env: dict[str, str]
    ) -> subprocess.Popen[bytes] | None:  # env: what a started worker would get
        """A replacement worker in a pre-started interpreter of the pool, or None. Its
        stdin is our socket (the worker moves it off fd 0), stdout and stderr /dev/null."""
        pool = self._pool
        if pool is None or pool.python is None:
            return None
        # A program's environment, as an exec's (the member started with the allocator's
        # settings already), and what the worker module needs on top of it.
        from ember.agent.execute import default_env

        job_env = default_env() | {"PYTHONPATH": _package_root(), HEAP_ENV: "0"}
        if PRELOAD_ENV in env:
            job_env[PRELOAD_ENV] = env[PRELOAD_ENV]  # already imported: the worker just knows
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            argv = [pool.python, *self._command[1:], "0"]  # the pool's python3 (the guest's)
            proc = pool.take(argv, job_env, None, True, io=(sock.fileno(), null, null))
        except Exception as exc:  # the pool's trouble must not keep run_code from starting
            log(f"run_code worker: no pooled interpreter ({exc}); starting python3")
            return None
        finally:
            os.close(null)
        if proc is not None:
            self._pooled.add(proc.pid)
            self.pooled_replacements += 1
        return proc

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and everything its cells started (its process group). Its
        holder (the pool's, or its own) is in the group too: the worker goes first, so that
        its exit leaves the memory to the holder (no teardown while we wait for it), and the
        holder's death, which tears it down, is background work."""
        pool = self._pool if proc.pid in self._pooled else None
        holder = self._holders.get(proc.pid, 0)
        if pool is not None:
            pool.background_holder(proc.pid)
        elif holder:
            renice(holder, BACKGROUND_NICE)
        if pool is not None or holder:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        """The worker is gone: its holder (and a pooled one's pipes) go to the pool, to be
        freed while the sandbox is idle; without a pool, its own holder is freed now, in the
        background."""
        if proc.pid in self._pooled and self._pool is not None:
            self._pooled.discard(proc.pid)
            self._pool.release(proc)
        holder = self._holders.pop(proc.pid, 0)
        if not holder:
            return
        if self._pool is not None:
            self._pool.free_later(holder)
        else:
            threading.Thread(target=kill_holder, args=(holder,), name="holder", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for this worker's end; a death nobody asked for is published at once (hosts
        on the rings are waiting), and a replacement started as after a failed call."""
        status = proc.wait()
        self._reaped(proc)
        if not self._closed:
            self.last_death = describe(status)
            if self.notice is not None:
                self.notice.publish()
        with self._published:
            self._unpublished.discard(proc)
            self._published.notify_all()
        if self._closed:
            return
        with self._lock:
            if self._proc is proc and not self._closed:
                self._discard()
                self.start_in_background()

    def _discard(self, grace: float = 0.0) -> int | None:
        """Kill and reap the worker (and anything it started); return its exit status.

        ``grace`` lets a worker that is already exiting finish on its own, so
        its real status is reported rather than our SIGKILL: its socket closes
        a moment before it can be reaped.
        """
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()
        if proc is None:
            return None
        if grace:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            self._kill_group(proc)
        status = proc.wait()
        self._reaped(proc)
        # Its death on the rings before anything else happens: a caller answered now must not
        # find it "ready" there on its next call, and a late publish would mark its
        # replacement's rings dead. The watcher publishes without the lock we hold.
        with self._published:
            self._published.wait_for(lambda: proc not in self._unpublished, 5.0)
        return status

    def close(self) -> None:
        """Stop the worker for good, even in the middle of a call or a start."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # unblocks whoever holds the lock
            except (ProcessLookupError, PermissionError):
                pass
        if self._lock.acquire(timeout=5.0):
            try:
                self._discard()
            finally:
                self._lock.release()
        self.state = WorkerState.STOPPED
