"""A template's first call, recorded once at build time so every restore can skip its faults.

:mod:`ember.snapshot.prefault` explains the cost: each page a restored guest writes first
faults twice and flushes a TLB, and on kvm_pvm it also denies KVM its shadow-page prefetch.
Here the build restores its just-written snapshot (not yet installed), makes the calls a new
sandbox makes first, and records the memory-file pages the VMM then holds privately; the
snapshot directory keeps them for every later restore. The calls go through the client a
:class:`~ember.sandbox.sync.Sandbox` makes (:func:`ember.client.attach.attach` builds both),
so the pages are those of the real first call: the resume, the code worker's reply over its
ring, the agent's answer to a ``ping``.

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

__all__ = ["FIRST_CALLS", "HUGE_PAGES", "record"]

FIRST_CALLS = "run_code('6*7'), ping"  # part of the template key: a change rebuilds templates
HUGE_PAGES = "warm heaps' zero 2 MiB pages, op pool huge"  # the same


def record(staging: Path, spec: SandboxSpec, name: str) -> tuple[int, int]:
    """Restore ``staging``, make the first calls, write its prefault and huge-pages files;
    the pages and the 2 MiB chunks recorded.

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
            pages = prefault.written_pages(pid, staging / MEMORY_FILE)
            huge = client.pool_huge()  # after the pages: its own writes are not a first call's
        except EmberError as exc:
            if isinstance(exc, BuildError):
                raise
            raise BuildError(f"template {name}: a restored sandbox failed: {exc}") from None
        finally:
            attached.close()
    finally:
        vmm.close()
    prefault.write(staging, prefault.runs_of(pages))
    memory_file = staging / MEMORY_FILE
    chunks = hugeback.holes(memory_file, memory_file.stat().st_size, sorted(set(huge)))
    hugeback.write(staging, chunks)
    return len(pages), len(chunks)
