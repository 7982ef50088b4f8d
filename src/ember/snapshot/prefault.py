"""The pages a restored guest writes first, copied for it before its vCPUs run.

A restore maps the snapshot's memory file ``MAP_PRIVATE``. Each page the guest then writes
costs a read fault (KVM maps the shared page-cache page read-only), a write fault that copies
it, and a remote TLB flush as KVM drops the read-only entry. Under shadow paging (kvm_pvm)
there is more: KVM's shadow-page prefetch, which maps up to eight neighbours of a faulting
page in one exit, takes only pages whose host mapping is already writable. So a shared,
read-only page cache makes every page of the first call its own exit.

A template build therefore restores its fresh snapshot once, makes the first call a sandbox
makes (``ping``, ``run_code``), and records the pages of the memory file that the VMM then
holds privately: the ones written (:func:`written_pages`, from ``/proc/PID/pagemap``). They
go into the snapshot directory as :data:`PREFAULT_FILE`. Every later restore copies exactly
those pages with ``MADV_POPULATE_WRITE`` before the guest runs (:func:`populate`), in one
system call per run: copies a sandbox whose first call is a ``run_code`` would make anyway
(one that never calls it holds the worker's ~1.5 MiB more). Measured on kvm_pvm: the first
``run_code`` takes ~1,000 shadow faults instead of ~1,700 and no TLB flushes instead of ~260.

More sets, :data:`EXEC_FILES`, hold the pages a sandbox's first and second ``exec python3
-c`` write beyond those before them: a pre-started interpreter's heap (each exec gets
another) and the agent's hand-over, ~1,200 pages (~5 MiB) each for the default template.
Copying them at restore would cost every sandbox that never runs a program that memory, so
the VMM copies the next set when asked (control op ``prefault-exec``), which the SDK does
before each of a sandbox's first execs: ~10 ms of copying on the host instead of ~1,200
copy-on-write faults, and the shadow faults their denied prefetch costs, in the guest's exec
(a first ``exec python3 -c 'print(1)'`` after a ping: ~130 -> ~117 ms here). An exec that
takes no interpreter (``exec true``) uses up a set all the same: the price of a wrong guess
is memory the next programs would mostly have written anyway.

The files are hints: one that is missing, malformed or out of range is ignored (logged),
and a kernel without ``MADV_POPULATE_WRITE`` (Linux < 5.14) just restores as before.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ember.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger(__name__)

PREFAULT_FILE = "prefault.json"
# The pages a sandbox's first, second exec write beyond the calls before them.
EXEC_FILES = ("prefault-exec.json", "prefault-exec-2.json")
FORMAT = 1
MAX_RUNS = 1 << 16  # a recorded set has a few hundred; more is not a file we wrote
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.12

# proc(5) pagemap: one little-endian u64 per virtual page.
PM_PRESENT = 1 << 63
PM_FILE_OR_SHARED = 1 << 61  # clear on a present page: private, i.e. copied on write

Run = tuple[int, int]  # (first page of the memory file, pages)
T = TypeVar("T")


def runs_of(pages: Iterable[int]) -> list[Run]:
    """Sorted page numbers as maximal (first, count) runs: one madvise each."""
    runs: list[list[int]] = []
    for page in sorted(set(pages)):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return [(first, count) for first, count in runs]


def written_pages(pid: int, memory_file: Path) -> list[int]:
    """The pages of ``memory_file`` that process ``pid`` (a VMM restored from it) holds as
    private copies: those its guest or its devices wrote since the restore.

    Mappings are matched by device and inode, so a jailed VMM, which sees the file under
    another path, is read all the same. Needs the right to read ``/proc/PID/pagemap``
    (the VMM's owner, or root).
    """
    st = memory_file.stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    pages: list[int] = []
    with open(f"/proc/{pid}/maps") as maps:
        lines = maps.read().splitlines()
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or fields[3] != device or int(fields[4]) != st.st_ino:
                continue
            low, high = (int(part, 16) for part in fields[0].split("-"))
            first = int(fields[2], 16) // PAGE_SIZE
            count = (high - low) // PAGE_SIZE
            entries = os.pread(fd, count * 8, low // PAGE_SIZE * 8)
            for index, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry & PM_PRESENT and not entry & PM_FILE_OR_SHARED:
                    pages.append(first + index)
    finally:
        os.close(fd)
    return sorted(set(pages))


def write(directory: Path, runs: list[Run], name: str = PREFAULT_FILE) -> None:
    """Record ``runs`` in ``directory`` (a snapshot being built: not yet visible)."""
    body = {"format": FORMAT, "page_size": PAGE_SIZE, "runs": [list(run) for run in runs]}
    (directory / name).write_text(json.dumps(body, separators=(",", ":")))


def parse(text: str, memory_pages: int) -> list[Run]:
    """A prefault file's runs, checked against a memory file of ``memory_pages`` pages.

    Raises ValueError for anything but what :func:`write` makes: ascending, disjoint,
    non-empty runs inside the file.
    """
    raw = hint_list(text, "prefault", ("page_size", PAGE_SIZE), "runs", MAX_RUNS)
    runs: list[Run] = []
    end = 0
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(type(value) is int for value in item)
        ):
            raise ValueError(f"run {item!r} is not a [first, count] pair of integers")
        first, count = item
        if first < end or count <= 0 or first + count > memory_pages:
            raise ValueError(f"run {item!r} overlaps, is empty or lies outside the memory file")
        runs.append((first, count))
        end = first + count
    return runs


def read(directory: Path, memory_size: int, name: str = PREFAULT_FILE) -> list[Run]:
    """The runs recorded for the snapshot in ``directory`` (in its file ``name``); none when
    there is no usable file."""
    runs = read_hint(directory / name, lambda text: parse(text, memory_size // PAGE_SIZE))
    return runs if runs is not None else []


def hint_list(text: str, kind: str, unit: tuple[str, int], key: str, most: int) -> list[Any]:
    """The list under ``key`` in a hint file of format 1 whose ``unit`` (name, value) is ours,
    at most ``most`` long; ValueError for anything else (its items are the caller's to check)."""
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"not a {kind} file of format {FORMAT}")
    name, value = unit
    if body.get(name) != value:
        raise ValueError(f"{name.replace('_', ' ')} {body.get(name)!r}, expected {value}")
    raw = body.get(key)
    if not isinstance(raw, list) or len(raw) > most:
        raise ValueError(f"{key} must be a list of at most {most} items")
    return raw


def read_hint(path: Path, parse_text: Callable[[str], T]) -> T | None:
    """A snapshot's hint file (this one, or ``hugepages.json``) parsed, or None when there is
    none or it is unusable (logged): a restore then goes on without it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s is unreadable (%s): restoring without it", path, exc)
        return None
    try:
        return parse_text(text)
    except ValueError as exc:
        log.warning("%s is ignored: %s", path, exc)
        return None


def populate(memory: GuestMemory, runs: list[Run]) -> int:
    """Copy the pages of ``runs`` into ``memory`` (mapped from the file, regions back to back)
    before the guest runs; the number of pages copied.

    Stops quietly where the kernel cannot (no ``MADV_POPULATE_WRITE``, or no memory to copy
    into): what is left is faulted as it would have been without this.
    """
    done = 0
    base = 0
    for region in memory.regions:
        first_page, end_page = base // PAGE_SIZE, (base + region.size) // PAGE_SIZE
        for first, count in runs:
            start, stop = max(first, first_page), min(first + count, end_page)
            if start >= stop:
                continue
            try:
                region.mem.madvise(
                    MADV_POPULATE_WRITE,
                    (start - first_page) * PAGE_SIZE,
                    (stop - start) * PAGE_SIZE,
                )
            except OSError as exc:  # EINVAL: Linux < 5.14; ENOMEM: no memory to copy into
                log.info("prefault stopped after %d pages: %s", done, exc.strerror)
                return done
            done += stop - start
        base += region.size
    return done
