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

- ``keep_warm(count, **options)`` keeps ``count`` spares of those options
  (0: none, and the ones waiting are closed);
- ``$EMBER_SPARES=N`` gives every set of options this process makes a sandbox with N
  spares, for the four sets used last (:data:`ember.sandbox.spare_pool.MAX_AUTO_KEYS`).

Never shared, never recycled: a spare is popped under the pool's lock and handed to one
caller; a closed sandbox is never put back. Each spare is its own restore (its own
region, entropy and clock announcement), exactly what ``Sandbox()`` would have made on
demand. A spare whose VMM died while it waited, or whose template was rebuilt since, is
closed at take and the caller gets a fresh one; a new image (another default template)
retires the waiting spares of the old one within a second. The pool's rules (one thread,
refills held back while a sandbox is made on demand and just after a take, back-off, exit
and fork) are :mod:`ember.sandbox.spare_pool`'s.

What this process keeps are :class:`Warm` VMs (a VMM and the agent connection its warm-up
left open), which either facade drives: ``Sandbox()`` and ``AsyncSandbox()`` call
:func:`vmm_for`, which takes a spare or starts a VMM on demand.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ember.client.attach import attach
from ember.descriptors import descriptors_checked
from ember.errors import AgentError, ConfigError
from ember.launcher import VmmProcess
from ember.sandbox.spare_pool import Spare, SparePool, auto_count, register
from ember.snapshot import STATE_FILE
from ember.snapshot.prefault import EXEC_FILES
from ember.spec import SandboxSpec
from ember.stamps import stamp
from ember.templates import DEFAULT, find, start_vmm, template_dir

# The run_code worker's pre-faulted heap a spare's warm-up writes once: a restored guest's
# first write to each page costs ~20 µs of shadow paging here (a first 10 MiB bytearray
# 50-75 ms, a second 1 ms). The pages become the spare's own: 16 MiB of host memory each.
WARM_HEAP_MIB = 16
# A spare's VMM runs at this nice until it is taken: on a small host its restore and warm-up
# (~0.3 s of CPU) would otherwise slow the sandbox whose take started the refill.
BACKGROUND_NICE = 19


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
    """A spare for this sandbox, or None (:func:`vmm_for` then starts one)."""
    if _vms is None and not auto_count():
        return None  # spares were never asked for: nothing to look up
    key = spare_key(spec, template, boot)
    warm = None if key is None else spare_pool().take(key)
    if warm is not None:
        _renice(warm.vmm, 0)
        if _watcher is not None:
            _watcher.taken(warm)
    return warm


def vmm_for(spec: SandboxSpec, template: str | None, boot: bool) -> tuple[VmmProcess, Warm | None]:
    """The VMM of a new sandbox: a spare's (with the connection its facade adopts) when
    one matches, else one started now, while the refills wait."""
    warm = take(spec, template, boot)
    if warm is not None:
        return warm.vmm, warm
    with _vms.starting() if _vms is not None else contextlib.nullcontext():
        return start_vmm(spec, template=template, boot=boot), None


def keep_warm(count: int = 1, **options: Any) -> None:
    """Keep ``count`` sandboxes of these options (``Sandbox``'s arguments) restored and
    warmed in the background, so that ``Sandbox(**options)`` (or ``AsyncSandbox``) gets
    one at once and its first call costs what a later one does; 0 stops, and closes those
    waiting. For sandboxes restored from a template without ``network=``."""
    from ember.sandbox.options import SandboxOptions

    opts = SandboxOptions(**options)
    key = spare_key(opts.local_spec(), opts.template, opts.boot)
    if key is None:
        raise ConfigError("spares are for sandboxes restored from a template without network=")
    spare_pool().keep(key, count)


def _make(key: Hashable) -> Spare[Warm]:
    """Restore one and make its first calls, as its facade would: the first ``run_code``
    first (the worker still polls after the restore, and a first request of another kind
    would tell it to stop; it writes :data:`WARM_HEAP_MIB` of the worker's heap), then the
    agent's first request (the resume announcement), then the pre-started interpreters'
    rehearsal (each one's first program ~100 ms sooner). The connection that leaves open is
    held while the spare waits: an idle VM with no connection is parked, and its next
    first request costs ~70 ms again (held, it costs ~0.2% of a core)."""
    spec, template = cast(SpareKey, key)
    state = find(template or DEFAULT, spec).dir / STATE_FILE
    made_from = stamp(state)
    vmm = start_vmm(spec, template=template, boot=False)
    _renice(vmm, BACKGROUND_NICE)  # its warm-up yields to the sandboxes in use
    attached = attach(vmm)
    client = attached.client
    conn = None
    try:
        with descriptors_checked():
            client.run_code(f"bytearray({WARM_HEAP_MIB} << 20) and None")
            client.ping()
            for _ in EXEC_FILES:  # the pages of the first programs, which the rehearsal writes
                vmm.prefault_exec()
            with contextlib.suppress(AgentError):  # an agent from before "pool" "warm"
                client.warm_pool()
            conn = client.take_kept()
        if conn is None:
            raise ConfigError("the agent did not keep its connection open")  # an old image
    except BaseException:
        vmm.close()
        raise
    finally:
        attached.close()
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
        # A template rebuilt in place (sb.snapshot(name) again) has a new state file.
        return not vmm.exited() and stamp(state) == made_from

    def current() -> bool:
        # A new image makes another default template (~1-2 ms to tell: hashing its names).
        return template_dir(template or DEFAULT, spec) / STATE_FILE == state

    def close() -> None:
        if watcher is not None:
            watcher.gone(warm)
        warm.conn.close()
        vmm.close()

    return Spare(warm, usable, close, current)


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
