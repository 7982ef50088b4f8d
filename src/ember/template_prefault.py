"""A template's first call, recorded once at build time so every restore can skip its faults.

:mod:`ember.snapshot.prefault` explains the cost: each page a restored guest writes first
faults twice and flushes a TLB, and on kvm_pvm it also denies KVM its shadow-page prefetch.
Here the build restores its just-written snapshot (not yet installed), makes the calls a new
sandbox makes first, and records the memory-file pages the VMM then holds privately; the
snapshot directory keeps them for every later restore. The calls go through the client a
:class:`~ember.sandbox.sync.Sandbox` makes (:func:`ember.client.attach.attach` builds both),
so the pages are those of the real first call: the resume, the code worker's reply over its
ring, the agent's answer to a ``ping``.

The same copy then runs two programs, ``exec python3 -c pass`` (a pre-started interpreter
takes each), and the pages each wrote beyond the calls before it go into a file of their own
that restores copy only when a sandbox's first (second) exec comes
(:data:`ember.snapshot.prefault.EXEC_FILES`).

The same restored copy also says where the warm heaps' 2 MiB guest pages are (agent op
``pool`` ``huge``); the zero ones go into the snapshot directory for
:mod:`ember.snapshot.hugeback`, which backs them with host huge pages at every restore.
"""

from __future__ import annotations

from pathlib import Path

from ember.client.attach import attach
from ember.errors import BuildError, EmberError
from ember.launcher import VmmProcess
from ember.snapshot import MEMORY_FILE, hugeback, prefault
from ember.spec import SandboxSpec

__all__ = ["FIRST_CALLS", "FIRST_PROGRAM", "HUGE_PAGES", "record"]

# Part of the template key: a change rebuilds templates.
FIRST_CALLS = "run_code('6*7'), ping; later: exec python3 -c pass, twice"
HUGE_PAGES = "warm heaps' zero 2 MiB pages, op pool huge"  # the same
FIRST_PROGRAM = ["python3", "-c", "pass"]  # the execs whose pages EXEC_FILES hold


def record(staging: Path, spec: SandboxSpec, name: str) -> tuple[int, list[int], int]:
    """Restore ``staging``, make the first calls and the first execs, write its prefault and
    huge-pages files; the pages (first calls; each exec) and the 2 MiB chunks recorded.

    A snapshot that cannot be restored, or whose first call fails, fails the build here
    (in one line) rather than in every sandbox later.
    """
    try:
        vmm = VmmProcess(spec, restore=staging)
    except EmberError as exc:
        raise BuildError(f"template {name}: its snapshot does not restore: {exc}") from None
    try:
        attached = attach(vmm)  # what Sandbox() makes: the same first call
        client = attached.client
        try:
            result = client.run_code("6*7", timeout=spec.boot_timeout)
            if result.error is not None or result.value != "42":
                raise BuildError(f"template {name}: a restored sandbox's first run_code failed")
            client.ping()
            pid = vmm.vmm_pid
            if pid is None:
                raise BuildError(f"template {name}: the restored VMM has no process")
            memory_file = staging / MEMORY_FILE
            pages = prefault.written_pages(pid, memory_file)
            huge = client.pool_huge()  # after the pages: its own writes are not a first call's
            exec_pages: list[list[int]] = []
            written = set(prefault.written_pages(pid, memory_file))
            for _ in prefault.EXEC_FILES:
                ran = client.exec(FIRST_PROGRAM, timeout=spec.boot_timeout)
                if ran.exit_code != 0:
                    raise BuildError(f"template {name}: a restored sandbox's exec failed")
                # Read at once: the pool's refill (after 0.2 s idle) writes pages of its own.
                now = set(prefault.written_pages(pid, memory_file))
                exec_pages.append(sorted(now - written))
                written = now
        except EmberError as exc:
            if isinstance(exc, BuildError):
                raise
            raise BuildError(f"template {name}: a restored sandbox failed: {exc}") from None
        finally:
            attached.close()
    finally:
        vmm.close()
    prefault.write(staging, prefault.runs_of(pages))
    for file, exec_set in zip(prefault.EXEC_FILES, exec_pages, strict=True):
        prefault.write(staging, prefault.runs_of(exec_set), file)
    chunks = hugeback.holes(memory_file, memory_file.stat().st_size, sorted(set(huge)))
    hugeback.write(staging, chunks)
    return len(pages), [len(exec_set) for exec_set in exec_pages], len(chunks)
