"""A restore's state and memory, made by the child forked ahead before its request comes.

The child the zygote forks ahead (:mod:`ember.zygote_fork`) does not know its request, but
the last request that restored a template most likely names the next one's too: every
``Sandbox()`` of a template restores that template (a fork's or a paused sandbox's
snapshot is restored once and deleted: those are never made ahead, see ``Zygote.spawn``).
So while it waits, the child reads that snapshot's state, maps its memory file, puts fresh
huge pages behind its holes (:mod:`ember.snapshot.hugeback`) and copies the pages its first
call writes (:mod:`ember.snapshot.prefault`): ~1 + 2 + 3-5 ms of a ~30 ms restore here;
then the KVM VM and vCPUs on that memory, which the caller's maker makes
(:mod:`ember.vmm.vm_shell`, kept here as an opaque closeable: this module knows no VMM).
:func:`ember.vmm.builder.restore_machine` takes them (:func:`take`) if its request names the
same directory and the files are still the ones read (device, inode, size, times of
each); anything else (another template, one rebuilt since, a failure while making
them) is made again as before, and what was made ahead is unmapped.

It costs the waiting child the pages it copied (~3.7 MiB for the default template), which
that child, as a VMM of the same template, would have copied anyway. The waiting child
checks the files every few seconds (:func:`recheck`): a template removed or rebuilt
meanwhile is let go then, so its memory file's disk space is not held until the next request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ember.errors import SnapshotError
from ember.memory import GuestMemory, GuestMemoryError
from ember.snapshot import MEMORY_FILE, STATE_FILE, hugeback, prefault
from ember.snapshot.format import read_state
from ember.stamps import Stamp, stamp

_READ = (STATE_FILE, MEMORY_FILE, prefault.PREFAULT_FILE, hugeback.HUGE_FILE)

Identity = tuple[Stamp | None, ...]


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class Premade:
    directory: Path
    identity: Identity
    state: dict[str, Any]
    memory: GuestMemory
    vm: Closeable | None = None  # the KVM VM on that memory (ember.vmm.vm_shell.VmShell)

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()  # before the memory its slots map
        self.memory.close()


_premade: Premade | None = None


def identity(directory: Path) -> Identity:
    """What says the files a restore reads are the ones read before: the stamp of each
    (:mod:`ember.stamps`), None for one that is missing."""
    return tuple(stamp(directory / name) for name in _READ)


def restore_memory(directory: Path, size: int) -> GuestMemory:
    """The snapshot's memory file mapped copy-on-write, fresh huge pages behind its holes,
    the pages of its first call copied: what a restore does before it makes the VM."""
    path = directory / MEMORY_FILE
    try:
        memory = GuestMemory.from_file(str(path), size)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {directory} has no memory file") from None
    except GuestMemoryError as exc:
        raise SnapshotError(f"snapshot {directory}: {exc}") from None
    try:
        hugeback.back(memory, hugeback.read(directory, size), path)
        prefault.populate(memory, prefault.read(directory, size))
    except GuestMemoryError as exc:
        memory.close()
        raise SnapshotError(f"snapshot {directory}: {exc}") from None
    except BaseException:
        memory.close()
        raise
    return memory


def load(directory: Path) -> tuple[dict[str, Any], GuestMemory]:
    """A snapshot's state and :func:`restore_memory`."""
    state = read_state(directory / STATE_FILE)
    return state, restore_memory(directory, int(state["memory"]["size"]))


def prepare(
    directory: Path, make_vm: Callable[[dict[str, Any], GuestMemory], Closeable] | None = None
) -> bool:
    """In the child forked ahead: make ``directory``'s restore as far as :func:`load` goes,
    and ``make_vm`` on its memory, for :func:`take`. False (nothing kept) if the load
    failed: the restore will say why; a VM that could not be made is made by the restore."""
    global _premade
    discard()
    before = identity(directory)
    if before[0] is None or before[1] is None:
        return False
    try:
        state, memory = load(directory)
    except Exception:
        return False
    made = Premade(directory, before, state, memory)
    if make_vm is not None:
        try:
            made.vm = make_vm(state, memory)
        except Exception:
            made.vm = None
    _premade = made
    return True


def take(directory: Path) -> Premade | None:
    """What :func:`prepare` made, if it was for ``directory`` and its files are unchanged;
    else None (and what was made is closed and unmapped)."""
    global _premade
    made, _premade = _premade, None
    if made is None:
        return None
    if made.directory != directory or identity(directory) != made.identity:
        made.close()
        return None
    return made


def recheck() -> bool:
    """In the waiting child, now and then: let go of what was made if its files changed or
    went (a template rebuilt, removed or pruned), so that a removed template's memory file
    is not kept alive (and its disk space taken) until the next request. True if it was
    still current."""
    made = _premade
    if made is None:
        return False
    if identity(made.directory) == made.identity:
        return True
    discard()
    return False


def discard() -> None:
    global _premade
    made, _premade = _premade, None
    if made is not None:
        made.close()
