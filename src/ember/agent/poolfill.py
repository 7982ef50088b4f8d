"""The interpreter pool's state and its filling: members started or forked, the mother, and
when that work may run.

Split from :mod:`ember.agent.pool`, which tells the design (holders, the mother, refills only
while the sandbox is idle), hands members over and reports; its
:class:`~ember.agent.pool.InterpreterPool` is this class with that half added. This half is
what the pool's own thread does (:meth:`PoolFiller._loop`): the first fill, refills forked by
the mother or started as fresh ``python3`` processes, holders killed, and each start stopped
(``SIGSTOP``) while a request is in flight, or lifted to the agent's priority while an exec
waits for it. Runs in the guest: standard library only.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.agent.cellwatch import CellWatch
from ember.agent.common import log
from ember.agent.handover import acceptable
from ember.agent.heap import with_malloc_env
from ember.agent.member import (
    MEMBER,
    MOTHER,
    START_TIMEOUT_S,
    Member,
    describe_death,
    discard,
    forked,
    kill_holder,
    read_message,
    renice,
    send_message,
    spawn,
)
from ember.agent.poolprobe import probe_spec, run_probe
from ember.agent.pyargs import effective_ctype, plan
from ember.agent.pyfind import PythonFinder
from ember.agent.resume import ResumeState

__all__ = ["DEFAULT_SIZE", "IDLE_S", "STARTED", "PoolFiller", "PoolState"]

DEFAULT_SIZE = 4
STARTED = 2  # of the first fill, started as python3 with a heap; the rest the mother forks
IDLE_S = 1.0  # a sandbox this long without requests may spend its CPU on refills
RETRY_S = 30.0  # after a refill failed
FIRST_TRIES = 3  # starts the first fill may lose to a death (not to a reported error)
FIRST_RETRY_S = 1.0
FORK_IDLE = 0.2  # of IDLE_S, before a refill the mother forks (~1 s of work, not ~20)


class PoolState(enum.Enum):
    OFF = "off"  # size 0
    STARTING = "starting"
    READY = "ready"  # the first fill is complete (what a template waits for)
    FAILED = "failed"  # the first fill failed: last_error says why


class PoolFiller:
    """The pool's state, and the thread that keeps it full (see the module docstring)."""

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        *,
        preload: tuple[str, ...] = (),
        heap_bytes: int = 0,
        resume: ResumeState | None = None,
        env: dict[str, str] | None = None,
        idle_s: float = IDLE_S,
    ) -> None:
        from ember.agent.execute import default_env

        self.size = max(0, size)
        self.preload = preload
        self.heap_bytes = heap_bytes
        self.resume = resume if resume is not None else ResumeState()
        self.idle_s = idle_s
        self._env = with_malloc_env(env if env is not None else default_env())
        self._finder = PythonFinder(self._env.get("PATH", ""))
        self._python = self._finder.python
        self._ctype = effective_ctype(self._env)
        self._cond = threading.Condition()
        self._ready: list[Member] = []
        self._starting: Member | None = None
        self._mother: Member | None = None  # forks refills (see _fork); None: spawn them
        self._holders: list[int] = []  # holders of finished programs, to kill when idle
        self._handed: dict[int, int] = {}  # program pid -> its holder, until released
        self._last: dict[str, float] = {}
        self._closing: dict[int, list[Any]] = {}  # program pid -> what to close when done
        self._busy = 0
        self._waiting = 0  # execs waiting for a forked member (the refill runs for them)
        self._priority = os.getpriority(os.PRIO_PROCESS, 0)  # what programs run at
        self._idle_since = time.monotonic()
        self._cells = CellWatch()  # run_code cells served over the code ring (watch_cells)
        self._unbounded_wait = False  # the pool's thread waits for a notify, not a deadline
        self._closed = False
        self._first_fill_done = False
        self._started = 0  # members the first fill started (the rest of it is forked)
        self._mother_tried = False
        self._first_failures = 0
        self._reported = False  # the last failed start said why (it would say so again)
        self._gave_up = False
        self.state = PoolState.OFF if self.size == 0 else PoolState.STARTING
        self.last_error = ""
        self.served = 0
        self.fallbacks = 0
        self.rehearsed = 0  # members that rehearsed a start (warm), in all
        self.forked = 0  # members the mother forked, in all
        self.mother_error = ""  # why there is no mother: refills are fresh python3 processes
        self.profile = b""  # the pages forked members write while they wait (poolprobe)
        self._thread: threading.Thread | None = None

    # -- when to work -----------------------------------------------------------------

    def _may_work(self) -> bool:
        """(Lock held.) More execs wait for a member than are ready (a member just made is
        theirs until they wake); or no request in flight, and none for the idle time the next
        piece of work needs, once the first fill is done."""
        if self._waiting > len(self._ready):
            return True
        if self._busy:
            return False
        if not self._first_fill_done:
            return True
        return not self._cells_ran() and self._idle_left() <= 0

    def _cells_ran(self) -> bool:
        """(Lock held.) A code-ring cell runs or ran since the last look: as a request that
        just ended (and the next look is ``idle_s`` on: :meth:`_idle_left`)."""
        if self._cells.ran():
            self._idle_since = time.monotonic()
            return True
        return False

    def _idle_left(self) -> float:
        """(Lock held.) Seconds of idleness still due before the next piece of work."""
        fork = self._fork_wanted() and not self._cells.lately
        needed = self.idle_s * FORK_IDLE if fork else self.idle_s
        return needed - (time.monotonic() - self._idle_since)

    def watch_cells(self, read: Callable[[], int]) -> None:
        """Count code-ring cells as requests: :mod:`ember.agent.cellwatch`."""
        with self._cond:
            self._cells.watch(read)

    def _fork_wanted(self) -> bool:
        """(Lock held.) The next piece of work is a refill the mother forks."""
        return self._mother is not None and len(self._ready) < self.size

    def _member_info(self) -> dict[str, Any]:
        """What the members said when ready (all alike: the same python3, the same start)."""
        with self._cond:
            return self._ready[-1].info if self._ready else {}

    # -- filling --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._may_work() and self._work_wanted()):
                    timeout = None
                    if not self._busy and self._work_wanted():
                        timeout = max(0.01, self._idle_left())
                    self._unbounded_wait = timeout is None  # see PoolFiller.idle
                    self._cond.wait(timeout)
                    self._unbounded_wait = False
                if self._closed:
                    return
                # A refill the mother forks (~4 s here) comes before freeing old programs'
                # memory (seconds each: a template member's heap is 64 MiB).
                holder = self._holders.pop() if self._holders and not self._fork_wanted() else 0
            if holder:
                kill_holder(holder)
                continue
            first = not self._first_fill_done
            member = self._start_one(first)
            filled = mother_due = False
            with self._cond:
                if member is not None:
                    self._ready.append(member)
                    self._cond.notify_all()  # an exec may be waiting for it
                    if first and not member.forked:
                        self._started += 1
                    mother_due = first and self._started >= min(self.size, STARTED)
                    filled = len(self._ready) >= self.size and not self._first_fill_done
                elif first:
                    # A member that reported an error (a preload module that does not
                    # import) would report it again; one that died (the OOM killer while
                    # the guest was tight, a signal) is worth another start: a template
                    # build should not fail on one loss.
                    self._first_failures += 1
                    if self._reported or self._first_failures >= FIRST_TRIES:
                        self.state = PoolState.FAILED
                        self._gave_up = True
                        return
            if mother_due and not self._mother_tried:
                self._start_mother()  # before READY: a template has her too
                self._learn_profile()  # before her first members: they warm up with it
            if filled:
                self._warm_lookups()
                with self._cond:
                    self._first_fill_done = True
                    self.state = PoolState.READY
            if member is None:
                time.sleep(FIRST_RETRY_S if first else RETRY_S)

    def _warm_lookups(self) -> None:
        """Keep the file-system answers a plain ``exec python3`` needs before the pool says
        it is ready, so before a template's snapshot: restored sandboxes skip the lookups."""
        from ember.agent.execute import default_env

        env = default_env()
        try:
            self._finder.interpreter("python3", env, None)
            job = plan(["python3", "-c", "pass"], env, pool_ctype=self._ctype, pool_env=self._env)
            if job is not None:
                acceptable(job, env, self._member_info(), self._finder)
        except OSError:
            pass  # a warm-up only: the first exec asks again

    def _work_wanted(self) -> bool:
        return bool(self._holders) or (not self._gave_up and len(self._ready) < self.size)

    def _start_one(self, first: bool) -> Member | None:
        """A new member: forked by the mother if there is one, else a fresh ``python3``."""
        # The first fill's last members (past STARTED, once the mother is there): forked,
        # and warmed before they say ready, so that the template holds them warm.
        reserve = first and self._mother_tried
        heap = self.heap_bytes if first and not reserve else 0
        member = None
        # Not for the template's first members: a forked one shares its pages with the
        # mother (a guest copy-on-write fault, ~3 ms, on each its program writes); a started
        # one owns them (a host fault, ~25 us, in a restored copy).
        if self._mother is not None and (reserve or not first):
            member = self._fork(self._mother, heap, warm_first=reserve)
        if member is None:
            member = self._spawn(heap, MEMBER)
        if member is None:
            return None
        info = self._run_start(member)
        self._reported = bool(info and info.get("error"))
        if info is None or not info.get("ready"):
            error = (info or {}).get("error") or describe_death(member)
            self.last_error = str(error)
            log(f"interpreter pool: {self.last_error}")
            discard(member)
            return None
        member.info = info
        self.last_error = ""
        return member

    def _start_mother(self) -> None:
        """The interpreter refills are forked from: preload imported, no heap, no program.
        Without one (it failed, or cannot fork here) refills are fresh processes, as before."""
        mother = self._spawn(0, MOTHER)
        info = self._run_start(mother) if mother is not None else None
        if mother is None or info is None or not info.get("mother"):
            error = (info or {}).get("error") or (
                describe_death(mother) if mother is not None else self.last_error
            )
            self.mother_error = str(error)
            log(f"interpreter pool: no mother ({self.mother_error}): refills start python3")
            if mother is not None:
                discard(mother)
            self._mother_tried = True
            return
        mother.info = info
        self._mother_tried = True
        # Her forks, and her children's warm-ups, are background work: at nice 19 a
        # request's program and the agent get the one vCPU (page-fault work runs at the
        # faulting task's priority too). Her children are born there; take() lifts each
        # to the agent's priority with its job.
        mother.background()
        self._mother = mother

    def _learn_profile(self) -> None:
        """Fork a probe and run :data:`~ember.agent.pywarm.PROBE_PROGRAM` in it as a real
        job: the pages it wrote are what each forked member writes while it waits
        (:mod:`ember.agent.poolprobe`). Without it (no mother, a probe that failed) members
        warm up as before."""
        spec = probe_spec(self._finder, self._ctype, self._env, self.resume.generation)
        if self._mother is None or spec is None:
            return
        probe = self._fork(self._mother, 0, probe=True)
        info = self._run_start(probe) if probe is not None else None
        if probe is None or info is None or not info.get("ready"):
            if probe is not None:
                discard(probe)
            return
        probe.info = info
        self.profile = run_probe(probe, spec)

    def _fork(
        self, mother: Member, heap: int, *, warm_first: bool = False, probe: bool = False
    ) -> Member | None:
        """Ask the mother for a member; None (and no mother from now on) if she cannot.
        ``warm_first``: the member takes its copy-on-write faults before it says ready.
        ``probe``: not a member (:meth:`_learn_profile`), so not counted in ``forked``."""
        ours, theirs = socket.socketpair()
        reply = None
        try:
            request = {"op": "fork", "heap": heap, "warm": warm_first, "profile": self.profile}
            send_message(mother.ctl, request, (theirs.fileno(),))
            reply = self._run_start(mother)
        except OSError:
            pass
        finally:
            theirs.close()
        pid = (reply or {}).get("pid")
        if not isinstance(pid, int) or pid <= 0:
            ours.close()
            self.mother_error = str((reply or {}).get("error") or describe_death(mother))
            log(f"interpreter pool: the mother failed ({self.mother_error}): refills start python3")
            with self._cond:
                self._mother = None
                self._cond.notify_all()  # execs waiting for a fork: start real processes
            discard(mother)
            return None
        with self._cond:
            self.forked += 0 if probe else 1
        assert self._python is not None
        return forked(self._python, pid, ours)

    def _spawn(self, heap: int, role: str) -> Member | None:
        assert self._python is not None
        try:
            return spawn(self._python, self._env, role, generation=self.resume.generation,
                         heap=heap, preload=self.preload)  # fmt: skip
        except OSError as exc:
            self.last_error = f"cannot start {self._python}: {exc}"
            log(f"interpreter pool: {self.last_error}")
            return None

    def _run_start(self, member: Member) -> dict[str, Any] | None:
        """The member's next message, with it stopped while a request is in flight (unless
        an exec waits for it: then it runs in the foreground, see :meth:`_foreground`)."""
        with self._cond:
            self._starting = member
            if self._waiting:
                self._foreground(member)
            elif member.forked:
                # Born at the mother's priority, which an exec's wait may have lifted for the
                # fork: its start and warm-up are background work once nobody waits.
                member.background()
            if self._busy and not self._waiting and not member.stopped:
                member.pause()
        info = self._await_ready(member)
        with self._cond:
            self._starting = None
            if member.stopped:
                member.go_on()
        return info

    def _background_again(self) -> None:
        """(Lock held.) No exec waits any more: what :meth:`_foreground` lifted goes back
        (the next refill's fork, and its child's warm-up, are background work again; a
        member about to be taken is lifted again by :meth:`take`)."""
        for member in (self._mother, self._starting, *self._ready):
            if member is not None and member.lifted:
                member.background()

    def _foreground(self, member: Member) -> None:
        """(Lock held.) A start an exec waits for is that exec's work, not background work:
        the mother (her fork) and a forked member (its start) go to the agent's priority.
        At nice 19 they would get almost none of the vCPU beside a program (the exec of an
        earlier wait that ran out), and the next waiting exec would run out too."""
        if (member.forked or member is self._mother) and not member.lifted:
            member.lifted = True
            renice(member.proc.pid, self._priority)

    def _await_ready(self, member: Member) -> dict[str, Any] | None:
        """Wait for the ``ready`` message. A start goes on only while no request and no
        code-ring cell runs (stopped by :meth:`busy`, or here), unless an exec waits for it."""
        poller = select.poll()
        poller.register(member.ctl.fileno(), select.POLLIN)
        ran = 0.0
        while ran < START_TIMEOUT_S and not self._closed:
            t0 = time.monotonic()
            if poller.poll(250):
                return read_message(member.ctl)
            with self._cond:
                held = not self._waiting and (
                    self._busy > 0 or (self._first_fill_done and self._cells_ran())
                )
                if member.stopped and not held:
                    member.go_on()
                elif not member.stopped and held:
                    member.pause()
                elif not member.stopped:
                    ran += time.monotonic() - t0
        member.timed_out = not self._closed
        return None
