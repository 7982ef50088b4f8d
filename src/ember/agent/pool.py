"""Pre-started ``python3`` interpreters: ``exec`` of a Python program without a new process.

In this guest a fresh ``python3`` costs ~7 s (every system call and page fault goes through an
emulated kernel) and its exit ~2 s more (the kernel frees every page it touched). A template
snapshot taken while a few interpreters wait for work makes their start-up free for every
restored sandbox. The pool (``size`` interpreters, default 4) is filled when the agent starts;
``exec`` hands a Python command line to one of them when :func:`ember.agent.pyargs.plan` says
the result is indistinguishable from a real ``python3`` (otherwise a real process starts, as
before). Each interpreter runs one program and becomes that program's process: same
descriptors, process group, session, exit status; :mod:`ember.agent.pystart` is its side.

Exits are made cheap too: each interpreter has a *holder*, a task cloned with ``CLONE_VM``
that shares its memory and sleeps. When the program exits, the kernel sees another user of
the memory and skips tearing it down, so the pipes close and the exit status arrives at once;
the agent kills the holder later, when the sandbox is idle (or never, if the sandbox is
thrown away first), and only then does the guest pay for freeing the pages.

Refills are forked from a *mother*: one more interpreter, started with the template's, that
has imported the preload modules, holds no heap and never runs a program. A fresh
``python3`` with numpy costs ~20 s of guest time here, a fork of the mother ~1 s, so a
sandbox that runs a Python program every few seconds keeps finding a member ready. The
forked member is the agent's own child (``CLONE_PARENT``, see ``pyclone._Forker``), and the
agent reaps it as it reaps the members it started (:func:`ember.agent.adopt.adopt`). The
template's first :data:`~ember.agent.poolfill.STARTED` members are started, not forked: a
forked member shares its pages with the mother, and each one its program writes costs a guest
copy-on-write fault (a started member's first program ~0.2 s here, a forked one's ~0.6 s
without the fault profile below, ~0.3 s with it).
The rest of the template's pool is forked once the mother is there, each member warmed up
(``pywarm._warm_steps``, its copy-on-write faults taken) before it says ready, so before the
snapshot: ~4 s of build time and ~7 MiB of guest memory each, where a started one costs ~20 s
and ~30 MiB besides its heap. So a sandbox's third and fourth Python programs, at an agent's
pace of a few seconds, find a member waiting instead of waiting ~3 s for a refill. Which
pages a forked member writes while it waits is learned once, before the mother's first member:
a probe she forks runs a program as a real job and reports the pages it wrote
(:mod:`ember.agent.poolprobe`). Without a
mother (she failed, or cannot fork here) refills start ``python3`` as before. The mother's
work runs at nice 19; a fork refill starts after a fifth of :data:`IDLE_S`, and an exec that
finds the pool empty waits up to :data:`FORK_WAIT_S` for the fork instead of a new process.

Refills and the holders' deaths cost the guest seconds, so they happen only while the sandbox
is otherwise idle (no request but ``ping`` in flight for :data:`IDLE_S`); an interpreter still
starting when a request arrives is stopped (``SIGSTOP``) until the sandbox is idle again. The
first fill (the template's) needs no idle period, and only its interpreters get a pre-faulted
heap: touching pages in a live sandbox is exactly the cost the heap exists to avoid.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

from ember.agent.handover import acceptable, as_file, check_cwd, job_spec
from ember.agent.member import (
    BACKGROUND_NICE,
    Member,
    discard,
    kill_holder,
    read_message,
    renice,
    send_message,
)
from ember.agent.poolfill import DEFAULT_SIZE, IDLE_S, STARTED, PoolFiller, PoolState
from ember.agent.pyargs import plan
from ember.agent.pywarm import core_length

__all__ = ["DEFAULT_SIZE", "IDLE_S", "STARTED", "InterpreterPool", "PoolState"]

WARM_TIMEOUT_S = 30.0  # a rehearsal takes ~0.1 s here: one not done by then is broken
FORK_WAIT_S = 8.0  # an exec waits this long for a fork (~2 s, ready ~2 s later; python3: 4-8 s)


class InterpreterPool(PoolFiller):
    """The agent's side: start, hand over, refill, release."""

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Begin the first fill in the background (the agent announces readiness at once)."""
        if self.size == 0:
            return
        if self._python is None:
            self.state, self.last_error = PoolState.FAILED, "no python3 on the default PATH"
            return
        self._thread = threading.Thread(target=self._loop, name="pool", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            members = list(self._ready)
            self._ready.clear()
            if self._starting is not None:
                members.append(self._starting)
            if self._mother is not None and self._mother not in members:
                members.append(self._mother)
            self._mother = None
            holders, self._holders = self._holders, []
            self._cond.notify_all()
        for member in members:
            discard(member)
        for pid in holders:
            kill_holder(pid)

    def warm(self) -> list[int]:
        """Have the waiting interpreters that programs get first (the :data:`STARTED` with
        the biggest heaps: :meth:`take`'s order) rehearse a program's start (see
        ``pywarm``); the pages each touched. For a sandbox restored ahead of its use (a
        spare): in a restored copy every page a process touches first costs a shadow and a
        host fault (~25 us here), ~3,500 of them, ~100 ms, for each interpreter's first
        program. Not the forked ones behind them: each rehearsal is ~0.1 s of the spare's
        making and ~3 MiB of its private memory, for a program that comes seconds later if
        at all (with all four, ``ember run`` 1 s apart found its spare still rehearsing:
        0.22-0.25 -> 0.30-0.37 s). Members are out of the pool while they rehearse (an exec
        meanwhile gets one of the others, or starts a real process)."""
        with self._cond:
            order = sorted(self._ready, key=_heap, reverse=True)  # stable: take()'s order
            pending, self._ready = order[:STARTED], order[STARTED:]
        touched: list[int] = []
        kept: list[Member] = []
        try:
            while pending:
                member = pending[0]
                reply = None
                try:
                    member.ctl.settimeout(WARM_TIMEOUT_S)
                    send_message(member.ctl, {"op": "warm"}, ())
                    reply = read_message(member.ctl)
                except OSError:
                    pass
                finally:
                    member.ctl.settimeout(None)
                pending.pop(0)
                if reply is None or member.proc.poll() is not None:
                    discard(member)  # it died, or cannot say: a refill replaces it
                    continue
                touched.append(int(reply.get("pages", 0)))
                kept.append(member)
        finally:
            with self._cond:
                self._ready[0:0] = kept + pending
                self.rehearsed += len(kept)
                self._cond.notify_all()
        return touched

    # -- request accounting (the server calls these around every request but ping) -----

    def busy(self) -> None:
        with self._cond:
            self._busy += 1
            starting = self._starting
            if starting is not None and not starting.stopped and not self._waiting:
                starting.pause()

    def idle(self) -> None:
        """The request in flight ended. The pool's thread is woken only if it waits without
        a deadline and has work to start: a wake-up it does not need lands on the next
        request (its Python thread and the one serving that request hand the GIL back and
        forth, ~100k emulated instructions here: a ``stat`` right after another took ~45 ms
        instead of ~20, a file ring read ~250 ms instead of ~135). A thread waiting with a
        deadline finds the new idle time when that deadline comes."""
        with self._cond:
            self._busy = max(0, self._busy - 1)
            if self._busy == 0:
                self._idle_since = time.monotonic()
                if self._unbounded_wait and self._work_wanted():
                    self._cond.notify_all()

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "state": self.state.value,
                "size": self.size,
                "ready": len(self._ready),
                "starting": self._starting is not None,
                "served": self.served,
                "fallbacks": self.fallbacks,
                "preload": list(self.preload),
                # how many modules the preload imported; their names: modules(). A ping's
                # answer must stay under a vsock packet (4 KiB): each more costs ~6 ms here.
                "preloaded_count": len(self._preloaded_locked()),
                "heap_mib": self.heap_bytes >> 20,  # the budget; what each member touched:
                "heaps_mib": [_heap(m) >> 20 for m in self._ready],
                # pages each took warm before it said ready (the template's forked ones)
                "warmed": [int(m.info.get("warmed", 0)) for m in self._ready],
                "holders": len(self._holders),
                "last": dict(self._last),
                "lookups": self._finder.lookups,  # path answers computed, not kept (pyfind)
                "rehearsed": self.rehearsed,
                "mother": self._mother is not None,
                "forked": self.forked,
                "profile": len(self.profile) // 8,  # pages forked members take as they wait
                "profile_core": core_length(self.profile),  # what a live refill takes
                "mother_error": self.mother_error,
                "error": self.last_error,
            }

    def pids(self) -> list[int]:
        """The waiting interpreters' and the mother's process ids (whose heaps a template
        records)."""
        with self._cond:
            members = [*self._ready, *([self._mother] if self._mother is not None else [])]
            return [m.proc.pid for m in members]

    def modules(self) -> list[str]:
        """Every module the preload imported: a program finds them in its ``sys.modules``
        (empty while no interpreter waits)."""
        with self._cond:
            return self._preloaded_locked()

    def _preloaded_locked(self) -> list[str]:
        return list(self._ready[0].info.get("preloaded", ())) if self._ready else []

    # -- hand-over ----------------------------------------------------------------------

    def take(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        want_stdin: bool,
        *,
        io: tuple[int, int, int] | None = None,
        written: dict[str, tuple[bytes, str]] | None = None,
    ) -> subprocess.Popen[bytes] | None:
        """A pre-started interpreter now running ``argv``, or None: start a real process.
        ``io``: the program's stdin, stdout and stderr, instead of the member's pipes (the
        run_code worker's replacement: its socket and ``/dev/null``); its Popen has none.
        ``written``: files the request just wrote, by path: (bytes, real path); a script
        among them is handed over with the job, not read again by the interpreter."""
        started = time.monotonic()
        if not self._await_member():
            return None
        executable = self._finder.interpreter(argv[0], env, cwd)
        if executable is None:
            return None
        job = plan(argv, env, pool_ctype=self._ctype, pool_env=self._env)
        if job is None or not acceptable(job, env, self._member_info(), self._finder):
            with self._cond:
                self.fallbacks += 1
            return None
        if cwd is not None:
            check_cwd(argv[0], cwd)
        spec = job_spec(job, env, cwd, executable, want_stdin, self.resume.generation,
                        self.resume.job_seed())  # fmt: skip
        script = (written or {}).get(job.target) if job.mode == "file" else None
        if script is not None and os.path.isabs(job.target):
            spec["script"] = [job.target, *script]  # as the interpreter's _abspath names it
        while True:
            if not self._await_member():  # at once if one is ready; else another exec took it
                return None
            with self._cond:
                if not self._ready:
                    continue
                # the biggest pre-faulted heap first: a small guest cannot give every member one
                ready = self._ready
                member = ready.pop(max(range(len(ready)), key=lambda i: _heap(ready[i])))
                # Out of the background at once: a forked member still warming up (at nice
                # 19) finishes the step in hand at the agent's priority (renicing one that
                # has just died is a silent no-op).
                self._foreground(member)
            if member.proc.poll() is not None:  # died while waiting (OOM killer, say)
                discard(member)
                continue
            stdin_r, stdout_w, stderr_w = member.theirs if io is None else io
            fds = (stdout_w, stderr_w, stdin_r) if want_stdin else (stdout_w, stderr_w)
            try:
                send_message(member.ctl, spec, fds)
            except OSError:
                discard(member)  # it died while waiting: try the next one
                continue
            break
        proc = self._become(member, want_stdin, own_io=io is not None)
        with self._cond:
            self.served += 1
            if member.holder:
                self._handed[member.proc.pid] = member.holder
            # For benchmarks and diagnosis: the agent's share of a hand-over, and when the
            # program could start (CLOCK_MONOTONIC, comparable with the program's own clock).
            self._last = {"take_ms": round((time.monotonic() - started) * 1e3, 3),
                          "handed_at": time.monotonic(),
                          "script_handed": float("script" in spec)}  # fmt: skip
        return proc

    @property
    def python(self) -> str | None:
        """The interpreter the members run (None: there is none, and no pool)."""
        return self._python

    def _await_member(self) -> bool:
        """A member is ready, or (when the mother can fork one) becomes ready within
        :data:`FORK_WAIT_S` for each exec already waiting and this one: the refills then run
        although requests are in flight, as these requests are what they are for. Forks come
        one after another, so the second of a burst waits for the second fork (~2 s more
        here), not for a python3 of its own after the first's wait (4-8 s more)."""
        with self._cond:
            if self._ready:
                return True
            if self._mother is None or self._closed:
                return False
            deadline = time.monotonic() + FORK_WAIT_S * (1 + self._waiting)
            self._waiting += 1
            starting = self._starting
            if starting is not None:
                self._foreground(starting)
                if starting.stopped:
                    starting.go_on()
            self._cond.notify_all()
            try:
                while not self._ready and self._mother is not None and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return bool(self._ready)
            finally:
                self._waiting -= 1
                if not self._waiting:
                    self._background_again()

    def release(self, proc: subprocess.Popen[bytes]) -> None:
        """The program handed to ``proc`` has been reaped: free its memory when idle."""
        with self._cond:
            if self._last.get("pid") is None:
                self._last["pid"] = proc.pid
                self._last["released_at"] = time.monotonic()
            for item in self._closing.pop(proc.pid, ()):
                if item is not None:
                    item.close()
            holder = self._handed.pop(proc.pid, 0)
            if holder:
                self._holders.append(holder)
                self._wake_for_work_locked()

    def free_later(self, holder: int) -> None:
        """Kill ``holder`` (a task of ours holding a dead program's memory, such as the run_code
        worker's own) when the sandbox is idle, as the holders of finished programs are."""
        with self._cond:
            if not self._closed:
                self._holders.append(holder)
                self._wake_for_work_locked()
                return
        kill_holder(holder)

    def _wake_for_work_locked(self) -> None:
        """New work for the pool's thread (a holder to kill): wake it only if no request is
        in flight and it waits without a deadline. During a request :meth:`idle` wakes it at
        the end (an exec releases its program inside the request: woken here as well, the
        thread cost the next exec a GIL hand-over, ~30k emulated instructions); a thread
        waiting with a deadline finds the holder when the deadline comes."""
        if self._busy == 0 and self._unbounded_wait:
            self._cond.notify_all()

    def background_holder(self, pid: int) -> None:
        """Before a kill that reaches the holder of program ``pid`` (its whole process group):
        nice 19 for it, so that the teardown its death starts is background work, as when
        the pool kills it (:func:`~ember.agent.member.kill_holder`)."""
        with self._cond:
            holder = self._handed.get(pid, 0)
        if holder:
            renice(holder, BACKGROUND_NICE)

    def _become(
        self, member: Member, want_stdin: bool, *, own_io: bool = False
    ) -> subprocess.Popen[bytes]:
        """The member's Popen with the program's pipes; only the closes the relay needs (our
        copies of the program's ends) happen now, the rest once the program is done.
        ``own_io``: the program got descriptors of the caller's, so none of the pipes."""
        proc = member.proc
        member.close_fds(theirs_only=True)
        later: list[Any] = [member.ctl, proc.stdout, proc.stderr]  # the pipes it started with
        if own_io:
            for fd in member.ours:
                os.close(fd)
            proc.stdin = proc.stdout = proc.stderr = None
            self._closing[proc.pid] = later
            return proc
        stdin_w, stdout_r, stderr_r = member.ours
        if want_stdin:
            proc.stdin = as_file(stdin_w)
        else:
            later.append(as_file(stdin_w))
        proc.stdout, proc.stderr = as_file(stdout_r), as_file(stderr_r)
        self._closing[proc.pid] = later
        return proc


def _heap(member: Member) -> int:
    """The heap a member pre-faulted: programs go to the biggest first (see take)."""
    return int(member.info.get("heap", 0))
