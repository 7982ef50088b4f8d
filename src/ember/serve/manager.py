"""The daemon's sandboxes by id: create, find, delete, re-adopt, and reap past their timeout.

Each sandbox is an in-process :class:`~ember.sandbox.Sandbox` whose VMM the
keeper forked (so it outlives this process), plus a :class:`Record` in the
state directory (what it holds of each is an :class:`~ember.serve.entries.Entry`).
A sandbox whose VMM died is kept as ``crashed`` (with its
console tail) until it is deleted, so its owner learns what happened.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar, cast

from ember.errors import SandboxCrashed
from ember.launcher import VmmProcess
from ember.network.policy import NetworkPolicy
from ember.sandbox import Sandbox
from ember.serve import adopt, spare_records
from ember.serve.entries import CreateArgs, Entry, ForkArgs, NotFound, Paused, State, SteadyClock
from ember.serve.keeper import KeeperClient, keeper_pid
from ember.serve.state import Record, StateDir, new_id

# The entries' names are re-exported: the routes import them beside Manager.
__all__ = ["CreateArgs", "Entry", "ForkArgs", "Manager", "NotFound", "Paused", "State"]

T = TypeVar("T")
log = logging.getLogger("ember.serve")


class Manager:
    def __init__(
        self, state: StateDir, *, reap_interval: float = 1.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:  # fmt: skip
        self.state = state
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._reap_interval = reap_interval
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._keeper: KeeperClient | None = None
        self._on_event = on_event or (lambda _event, _id: None)
        self.clock = SteadyClock()

    # --- life cycle
    def start(self) -> None:
        self._keeper = KeeperClient.install(self.state.path)
        self.readopt()
        self._reaper = threading.Thread(target=self._reap_loop, name="ember-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Stop serving; the sandboxes keep running for the next daemon to re-adopt."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.sandbox is not None:
                adopt.release(entry.sandbox)
        if self._keeper is not None:
            self._keeper.close()

    def readopt(self) -> None:
        keeper = keeper_pid(self.state.path)
        for record in self.state.load_all():
            if spare_records.is_spare(record):  # a crashed daemon's spare: nobody's sandbox
                spare_records.kill_left(self.state, record, keeper)
                continue
            if record.paused and self.state.paused_dir(record.id).is_dir():
                entry = Entry(record, None, State.PAUSED)
            elif adopt.alive(record, keeper):
                try:
                    entry = Entry(record, adopt.adopt(record))
                except OSError as exc:
                    entry = Entry(record, None, State.CRASHED, f"cannot re-adopt: {exc}")
                self._event("adopted", record.id)
            else:
                tail = adopt.console_tail(record)
                adopt.discard(record)
                self.state.remove(record.id)
                entry = Entry(record, None, State.CRASHED, "the VMM died while no daemon ran",
                              tail)  # fmt: skip
                self._event("crashed", record.id)
            with self._lock:
                self._entries[record.id] = entry

    # --- requests
    def create(self, args: CreateArgs) -> Entry:
        network = None if args.network in (None, False) else NetworkPolicy.from_json(args.network)
        sandbox = Sandbox(
            template=args.template, mem_mib=args.mem_mib, vcpus=args.vcpus, cpus=args.cpus,
            memory_mib=args.memory_mib, pids=args.pids, server="", network=network,
        )  # fmt: skip
        now = self.clock.now()
        spec = {"mem_mib": args.mem_mib, "vcpus": args.vcpus, "cpus": args.cpus,
                "memory_mib": args.memory_mib, "pids": args.pids,
                "network": network.to_json() if network is not None else None}  # fmt: skip
        expires = now + args.timeout if args.timeout is not None else None
        entry = self._own(sandbox, args.template or "default", spec, dict(args.metadata), expires,
                          idle_timeout=args.idle_timeout, on_timeout=args.on_timeout)  # fmt: skip
        self._event("created", entry.record.id)
        return entry

    def _own(
        self, sandbox: Sandbox, template: str, spec: dict[str, Any], metadata: dict[str, str],
        expires_at: float | None, *, idle_timeout: float | None = None, on_timeout: str = "kill",
    ) -> Entry:  # fmt: skip
        """A new id and record for a sandbox just started (created or forked)."""
        try:
            vmm = sandbox._vmm
            assert vmm.proc is not None
            record = Record(
                id=new_id(), dir=str(vmm.dir), pid=vmm.proc.pid, template=template,
                created_at=self.clock.now(), spec=spec, metadata=metadata, expires_at=expires_at,
                cgroup=adopt.cgroup_record(vmm.cgroup), idle_timeout=idle_timeout,
                on_timeout=on_timeout, network=adopt.network_record(vmm),
            )  # fmt: skip
            self.state.save(record)
        except BaseException:
            sandbox.close()
            raise
        entry = Entry(record, sandbox)
        with self._lock:
            self._entries[record.id] = entry
        return entry

    def fork(self, sandbox_id: str, args: ForkArgs) -> Entry:
        """A new sandbox continuing from this one's state (see ``Sandbox.fork``), with an id
        and record of its own, so a restarted daemon re-adopts it like any other."""
        entry = self.get(sandbox_id)
        with entry.lock:
            _, sandbox = self.running(sandbox_id)
            child = sandbox.fork()
        parent = entry.record
        if args.keep_timeout:
            expires = parent.expires_at
        else:
            expires = self.clock.now() + args.timeout if args.timeout is not None else None
        metadata = dict(parent.metadata if args.metadata is None else args.metadata)
        idle, on_timeout = parent.idle_timeout, parent.on_timeout
        forked = self._own(child, parent.template, dict(parent.spec), metadata, expires,
                           idle_timeout=idle, on_timeout=on_timeout)  # fmt: skip
        self._event("forked", forked.record.id)
        return forked

    def snapshot(self, sandbox_id: str, name: str) -> None:
        """Save the sandbox as it is now as template ``name`` (``POST /sandboxes`` can then
        restore it by that name); the sandbox runs on."""
        entry = self.get(sandbox_id)
        with entry.lock:
            _, sandbox = self.running(sandbox_id)
            sandbox.snapshot(name)
        self._event("snapshotted", sandbox_id)

    def get(self, sandbox_id: str) -> Entry:
        with self._lock:
            entry = self._entries.get(sandbox_id)
        if entry is None:
            raise NotFound(sandbox_id)
        return entry

    def running(self, sandbox_id: str) -> tuple[Entry, Sandbox]:
        entry = self.get(sandbox_id)
        if entry.state is State.PAUSED:
            raise Paused(f"sandbox {sandbox_id} is paused: resume it first")
        if entry.sandbox is None or entry.state is not State.RUNNING:
            raise SandboxCrashed(f"sandbox {sandbox_id} crashed: {entry.error}", entry.console)
        entry.last_active = time.monotonic()
        return entry, entry.sandbox

    @contextlib.contextmanager
    def holding(self, sandbox_id: str) -> Iterator[Entry]:
        """Inside, the sandbox is never idle: the idle reaper must not kill a sandbox whose
        exec is still talking, or whose terminal, watch or channel a client holds open."""
        entry = self.get(sandbox_id)
        with entry.lock:
            entry.streams += 1
        try:
            yield entry
        finally:
            with entry.lock:
                entry.streams -= 1
            entry.last_active = time.monotonic()

    def streaming(self, entry: Entry, items: Iterator[T]) -> Generator[T, None, Any]:
        """``items`` (a stream served from the sandbox), held (:meth:`holding`) while open."""
        with self.holding(entry.record.id):
            # a generator's return (an exec's result) passes on
            result: Any = yield from cast(Generator[T, None, Any], items)
            return result

    def find(self, metadata: dict[str, str] | None = None, state: str | None = None) -> list[Entry]:
        with self._lock:
            entries = list(self._entries.values())
        want = (metadata or {}).items()
        return [
            e for e in entries
            if want <= e.record.metadata.items() and (state is None or e.state.value == state)
        ]  # fmt: skip

    def delete(self, sandbox_id: str) -> None:
        entry = self.get(sandbox_id)
        with entry.lock:
            self._delete_locked(entry)
        self._event("deleted", sandbox_id)

    def _delete_locked(self, entry: Entry) -> None:
        """End the sandbox and forget it; the caller holds ``entry.lock``, and sends the
        ``deleted`` event once it let go (a listener that calls back into the manager takes
        the lock). NotFound if another call deleted it first."""
        sandbox_id = entry.record.id
        with self._lock:
            if self._entries.get(sandbox_id) is not entry:
                raise NotFound(sandbox_id)
            del self._entries[sandbox_id]
        try:
            if entry.sandbox is not None:
                entry.sandbox.close()
            shutil.rmtree(self.state.paused_dir(sandbox_id), ignore_errors=True)
        finally:
            self.state.remove(sandbox_id)

    def set_timeout(self, sandbox_id: str, seconds: float | None) -> Entry:
        entry = self.get(sandbox_id)
        with entry.lock:
            entry.record.expires_at = self.clock.now() + seconds if seconds is not None else None
            if entry.state is not State.CRASHED:
                self.state.save(entry.record)
        return entry

    def pause(self, sandbox_id: str) -> Entry:
        """Snapshot the sandbox to disk and end its VMM: no CPU, its memory back to the host."""
        entry = self.get(sandbox_id)
        with entry.lock:
            paused = self._pause_locked(entry)
        if paused:
            self._event("paused", sandbox_id)
        return entry

    def _pause_locked(self, entry: Entry) -> bool:
        """:meth:`pause`, the caller holding ``entry.lock``; whether it paused the sandbox
        (False: it was paused already). The caller sends the ``paused`` event once it let
        go of the lock."""
        if entry.state is State.PAUSED:
            return False
        sandbox_id = entry.record.id
        _, sandbox = self.running(sandbox_id)
        snapshot = self.state.paused_dir(sandbox_id)
        snapshot.mkdir(parents=True, mode=0o700)
        try:
            sandbox._vmm.snapshot(snapshot, durable=True)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        record = entry.record
        record.paused, record.pid, record.cgroup = True, 0, None
        self.state.save(record)
        sandbox.close()
        entry.sandbox, entry.state = None, State.PAUSED
        return True

    def resume(self, sandbox_id: str) -> Entry:
        """Restore a paused sandbox from its snapshot (in whatever daemon runs now)."""
        entry = self.get(sandbox_id)
        with entry.lock:
            if entry.state is State.RUNNING:
                return entry
            if entry.state is not State.PAUSED:
                raise SandboxCrashed(f"sandbox {sandbox_id} crashed: {entry.error}", entry.console)
            snapshot = self.state.paused_dir(sandbox_id)
            spec = adopt.spec_of(entry.record)
            vmm = VmmProcess(spec, restore=snapshot)  # maps the memory file: then it may go
            sandbox = object.__new__(Sandbox)
            sandbox._setup(vmm, spec)
            record = entry.record
            assert vmm.proc is not None
            record.paused, record.pid, record.dir = False, vmm.proc.pid, str(vmm.dir)
            record.cgroup = adopt.cgroup_record(vmm.cgroup)
            # a new namespace (the guest's side is the same in all): its ports again
            exposed = record.network["exposed"] if record.network is not None else []
            for port in exposed:
                sandbox.expose(port)
            record.network = adopt.network_record(vmm)
            self.state.save(record)
            shutil.rmtree(snapshot, ignore_errors=True)
            entry.sandbox, entry.state = sandbox, State.RUNNING
            entry.last_active = time.monotonic()  # idle from now, not from before the pause
        self._event("resumed", sandbox_id)
        return entry

    def expose(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """Forward TCP ``port`` of the sandbox's address to the guest (kept across a pause
        and a daemon restart); the address and port to connect to, on the daemon's host."""
        entry, sandbox = self.running(sandbox_id)
        with entry.lock:
            found = sandbox.expose(port)
            entry.record.network = adopt.network_record(sandbox._vmm)
            self.state.save(entry.record)
        return found

    def mark_crashed(
        self, entry: Entry, error: str, console: str, *, seen: Sandbox | None = None
    ) -> None:
        """A call found the VMM gone: report the sandbox as crashed from now on.

        ``seen`` is the sandbox whose VMM was found gone, if the caller looked without the
        entry's lock (the reaper): a pause ends that VMM on purpose, and a resume puts a new
        sandbox in its place, which must be neither closed nor reported as crashed."""
        with entry.lock:
            if entry.state is State.CRASHED:
                return
            if seen is not None and (entry.sandbox is not seen or entry.state is not State.RUNNING):
                return
            entry.state, entry.error, entry.console = State.CRASHED, error, console
            sandbox = entry.sandbox
        if sandbox is not None:
            sandbox.close()
        self.state.remove(entry.record.id)
        self._event("crashed", entry.record.id)

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in State}
        with self._lock:
            for e in self._entries.values():
                counts[e.state.value] += 1
        return counts

    # --- the reaper
    def reap_once(self) -> list[str]:
        """Kill the sandboxes past their timeout; mark those whose VMM died as crashed."""
        reaped = []
        for entry in self.find():
            if self._overdue(entry) is None:
                sandbox = entry.sandbox
                running = entry.state is State.RUNNING
                if running and sandbox is not None and sandbox._vmm.exited():
                    vmm = sandbox._vmm
                    self.mark_crashed(entry, str(vmm.crashed("the VMM exited")),
                                      vmm.console_tail(), seen=sandbox)  # fmt: skip
                continue
            rid = entry.record.id
            if self._time_out(entry):
                reaped.append(rid)
                self._event("reaped", rid)
        return reaped

    def _overdue(self, entry: Entry) -> str | None:
        """Why the sandbox is past one of its timeouts now, or None if it is not."""
        expires, idle = entry.record.expires_at, entry.record.idle_timeout
        now = self.clock.now()
        if expires is not None and expires <= now:
            return f"its timeout passed {now - expires:.1f} s ago"
        idle_for = entry.idle_for(time.monotonic())
        if idle is not None and entry.state is State.RUNNING and idle_for > idle:
            return f"idle for {idle_for:.1f} s (idle_timeout {idle:g} s)"
        return None

    def _time_out(self, entry: Entry) -> bool:
        """Kill, or pause (``on_timeout``), a sandbox past a timeout; False if it was gone,
        or is no longer due.

        The reaper looked without the entry's lock: a ``set_timeout``, a call that made it
        busy again, or a delete may have come in since. So it looks again under the lock,
        and acts while it holds it, or it would kill a sandbox its owner had just given
        more time."""
        rid = entry.record.id
        event = None
        with entry.lock:
            why = self._overdue(entry)
            if why is None:
                return False
            log.info("timing out %s: %s (on_timeout %s)", rid, why, entry.record.on_timeout)
            try:
                if entry.record.on_timeout == "pause":
                    entry.record.expires_at = None  # paused, it waits for a resume
                    if entry.state is State.RUNNING and self._pause_locked(entry):
                        event = "paused"
                    else:
                        self.state.save(entry.record)
                else:
                    self._delete_locked(entry)
                    event = "deleted"
            except NotFound:
                return False
        if event is not None:
            self._event(event, rid)
        return True

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval):
            try:
                self.reap_once()
            except Exception:
                log.exception("the reaper failed")

    def _event(self, event: str, sandbox_id: str) -> None:
        log.info(event, extra={"sandbox": sandbox_id})
        self._on_event(event, sandbox_id)
