"""Heaps touched in the template: memory a restored sandbox's interpreters reuse for free.

In this guest a fresh page costs the emulated kernel ~2-5 ms (a 10 MiB ``bytearray``: ~5 s),
while a page that was already mapped in the template costs a restored sandbox only a host-side
fault. So the warm interpreters (the pool's and the run_code worker) allocate and free a block
of ``heap`` bytes before the snapshot, in a heap that keeps what is freed:

* ``PYTHONMALLOC=malloc``: every Python object comes from glibc's heap, not from pymalloc's
  256 KiB arenas (those are ``mmap``-ed fresh and returned with ``munmap`` when empty);
* ``MALLOC_MMAP_MAX_=0``: big blocks come from the heap too, not from a fresh ``mmap``;
* ``MALLOC_TRIM_THRESHOLD_`` huge: ``free`` never gives the top of the heap back;
* ``MALLOC_ARENA_MAX=1``: threads share that one heap instead of fresh 64 MiB arenas;
* ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc grows the heap in 2 MiB steps and asks for
  transparent huge pages there (``MADV_HUGEPAGE``), so a fresh 2 MiB of heap is one page fault
  of the emulated kernel instead of 512 (the template's block, and what a program allocates
  past it).

Side effects, accepted: memory an interpreter freed stays with it until it exits (the pool's
interpreters run one program each; the run_code worker keeps its peak), and an exiting
interpreter never unmaps anything during finalisation, which here is also faster.

The guest kernel has transparent huge pages in ``madvise`` mode
(``src/ember/images/kernel/ember.config``): only memory that asks gets them, so a program that
touches one byte of a region nobody asked for costs the host 4 KiB, not 2 MiB. The warm
interpreters' heaps above ask; under the ``pvm`` CPU template every process's glibc heap asks
too (ember-init's ``GLIBC_TUNABLES``, beside the VMM clearing the guest's fresh pages).
:func:`tune_thp` makes them never wait: no compaction at fault time
(``defrag`` ``never``: a huge page when one is free, else 4 KiB pages as before), and no
``khugepaged`` scans (each would be emulated kernel work every 10 s in every idle sandbox).
Turning THP on also makes the kernel raise ``min_free_kbytes`` to what khugepaged would want
(~25 MiB of a 512 MiB guest); :func:`tune_min_free` puts back the kernel's own figure, see there.

The budget is clamped to what the guest can spare (``MemAvailable`` minus :data:`RESERVE_MIB`,
shared by all warm interpreters), so a small guest is not filled with idle heaps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

__all__ = [
    "DEFAULT_HEAP_MIB",
    "HEAP_ENV",
    "MALLOC_ENV",
    "RESERVE_MIB",
    "default_min_free_kbytes",
    "per_interpreter",
    "touch",
    "touch_from_env",
    "tune_min_free",
    "tune_page_reporting",
    "tune_thp",
    "with_malloc_env",
    "without_malloc_env",
]

DEFAULT_HEAP_MIB = 64
HEAP_ENV = "EMBER_WORKER_HEAP_BYTES"  # the run_code worker's share, set by the agent
RESERVE_MIB = 96  # left to the kernel, page cache and the programs themselves

MALLOC_ENV = {
    "PYTHONMALLOC": "malloc",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_ARENA_MAX": "1",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}

TUNABLES = "GLIBC_TUNABLES"

THP_DIR = "/sys/kernel/mm/transparent_hugepage"
#: What :func:`tune_thp` writes: sysfs file (under THP_DIR) -> value.
THP_SETTINGS = {
    "enabled": "madvise",
    "defrag": "never",
    "khugepaged/defrag": "0",
    "khugepaged/scan_sleep_millisecs": str(24 * 3600 * 1000),
    "khugepaged/alloc_sleep_millisecs": str(24 * 3600 * 1000),
}


def tune_thp(root: str = THP_DIR) -> int:
    """Apply :data:`THP_SETTINGS` (the agent, at boot, as root); how many took. A kernel
    without THP has no such files: nothing to do, and the heaps are 4 KiB pages."""
    return sum(_write_knob(f"{root}/{name}", value) for name, value in THP_SETTINGS.items())


def _write_knob(path: str, value: str) -> bool:
    """Write one sysfs or procfs setting; False where this kernel has no such file."""
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError:
        return False
    return True


MIN_FREE_PATH = "/proc/sys/vm/min_free_kbytes"


def default_min_free_kbytes(total_kib: int) -> int:
    """The kernel's figure without THP: sqrt(16 x memory in KiB), 128 KiB to 256 MiB
    (mm/page_alloc.c, ``init_per_zone_wmark_min``)."""
    return min(max(math.isqrt(max(0, total_kib) * 16), 128), 262144)


def tune_min_free(meminfo: str = "/proc/meminfo", path: str = MIN_FREE_PATH) -> int | None:
    """Set ``min_free_kbytes`` back to :func:`default_min_free_kbytes`; the value, or None.

    Call it after :func:`tune_thp`: enabling THP makes the kernel raise the reserve for
    khugepaged and fault-time compaction (2 free pageblocks per zone and more per migrate
    type: 25124 KiB in the 512 MiB guest), and we turned both off, so it buys nothing here.
    It costs twice: the guest cannot use those ~25 MiB, and the per-CPU page lists keep up
    to the low watermark (~30 MiB) of freed pages that neither MemFree counts nor free page
    reporting hands back to the host (seen after a balloon deflate: 23 MiB stranded).
    """
    total = _meminfo_kib("MemTotal", meminfo)
    if total is None:
        return None
    value = default_min_free_kbytes(total)
    return value if _write_knob(path, str(value)) else None


PAGE_REPORTING_PATH = "/sys/module/page_reporting/parameters/page_reporting_order"
#: 2 MiB blocks, a transparent huge page: see :func:`tune_page_reporting`.
PAGE_REPORTING_ORDER = 9


def tune_page_reporting(path: str = PAGE_REPORTING_PATH, order: int = PAGE_REPORTING_ORDER) -> bool:
    """Report free memory to the host in 2 MiB blocks instead of 4 MiB ones; whether it took.

    Free page reporting (virtio-balloon, how memory a guest frees goes back to the host) only
    runs while a zone has the low watermark plus 32 blocks of the reporting order free
    (``mm/page_reporting.c``). Without hugetlbfs that order is ``MAX_ORDER - 1``: 32 x 4 MiB,
    so a 512 MiB guest with less than ~132 MiB free reported nothing at all, however much it
    had just freed (seen: 96 MiB of free 4 MiB blocks, none reported, after a program freed
    120 MiB). At order 9 the bar is ~68 MiB. 6.1 lets the balloon driver overwrite the boot
    parameter when it registers, so the agent writes the sysfs knob after boot; the template
    keeps it. A kernel without reporting has no such file: nothing to do.
    """
    return _write_knob(path, str(order))


def _meminfo_kib(name: str, meminfo: str = "/proc/meminfo") -> int | None:
    """One ``/proc/meminfo`` figure, in KiB; None if it cannot be read."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _available_mib(meminfo: str = "/proc/meminfo") -> int | None:
    kib = _meminfo_kib("MemAvailable", meminfo)
    return None if kib is None else kib // 1024


def per_interpreter(heap_mib: int, interpreters: int, available_mib: int | None = None) -> int:
    """Bytes each of ``interpreters`` warm interpreters should touch (0: none)."""
    if heap_mib <= 0 or interpreters <= 0:
        return 0
    if available_mib is None:
        available_mib = _available_mib()
    mib = heap_mib
    if available_mib is not None:
        mib = min(mib, max(0, (available_mib - RESERVE_MIB) // interpreters))
    return mib << 20


def touch(nbytes: int) -> int:
    """Write every page of a block once and free it; it stays in the (tuned) heap.

    Clamped again to what the guest can spare *now*: the budget was made when the agent
    started, before the interpreters imported their preload modules. Returns the bytes touched.
    """
    available = _available_mib()
    if available is not None:
        nbytes = min(nbytes, max(0, available - RESERVE_MIB) << 20)
    if nbytes > 0:
        block = bytearray(nbytes)
        del block
    return max(0, nbytes)


def with_malloc_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :data:`MALLOC_ENV` laid over it; glibc tunables already there (the SSE-only
    ``glibc.cpu.hwcaps`` ember-init sets, see ember.agent.execute) are kept, not replaced."""
    merged = dict(env) | MALLOC_ENV
    inherited = env.get(TUNABLES)
    if inherited:
        merged[TUNABLES] = f"{inherited}:{MALLOC_ENV[TUNABLES]}"
    return merged


def without_malloc_env(env: MutableMapping[str, str]) -> None:
    """Undo :func:`with_malloc_env` in place: what remains is what ``env`` had before it.
    Only the tunable it appended comes off: ember-init's own tunables may ask for the same
    (``glibc.malloc.hugetlb=1`` under the pvm CPU template) and stay."""
    for name in MALLOC_ENV:
        if name != TUNABLES:
            env.pop(name, None)
    ours = MALLOC_ENV[TUNABLES]
    value = env.pop(TUNABLES, "")
    if value.endswith(":" + ours):
        env[TUNABLES] = value[: -len(ours) - 1]
    elif value and value != ours:
        env[TUNABLES] = value


def touch_from_env() -> int:
    """The run_code worker's start: touch the bytes the agent gave it; forget the variable."""
    import os

    try:
        nbytes = int(os.environ.pop(HEAP_ENV, "0") or 0)
    except ValueError:
        nbytes = 0
    without_malloc_env(os.environ)  # read at start-up already; programs the cells start get none
    return touch(nbytes)
