"""Inside a pre-started interpreter: work done before a job so that the job does not
pay for it; numpy's kernels, the heap's budget, a rehearsal of a program's start, and a forked
member's copy-on-write faults taken in steps while it waits, at the pages a probe's program
wrote (its *fault profile*) when there is one.

Standard library only (it runs in the guest; see :mod:`ember.agent.pybase` for how).
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from collections.abc import Iterator
    from typing import Any

if __name__ != "ember_pystart":  # imported as a module; in BOOT's namespace they are there
    from ember.agent.pybase import _reseed


RESERVE_MIB = 96  # ember.agent.heap.RESERVE_MIB (these files import nothing of Ember's)
STEP_PAGES = 64  # of a forked member's warm-up between two looks for a job (~0.2 s here)
REHEARSED_HEAP = 2 << 20  # of the pre-faulted block, what a rehearsal writes (see _rehearse)
MAX_BSS = 4 << 20  # an unnamed mapping after a library's data bigger than this is not its .bss
PROFILE_MAX_PAGES = 8192  # of a fault profile (8 bytes each): a longer list is cut here
WARM_SEED = b"ember: a warm-up's seed, replaced at every hand-over"
CORE_END = bytes(8)  # in a fault profile, after the pages every program takes (address 0)
PAGEMAP_CHUNK = 1 << 16  # entries read at a time (a mapping may reserve gigabytes)
FAULT_AROUND = 64 << 10  # the kernel's fault_around_bytes: one read fault maps this window
# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT, PM_FILE, PM_EXCLUSIVE = 1 << 63, 1 << 61, 1 << 56


def warm_numpy() -> None:
    """If numpy was preloaded, run its common kernels once on tiny inputs: the first call of a
    LAPACK routine reads its code from the disk and OpenBLAS maps its buffers (~2 s for one
    200x200 eig in a restored guest); done here, it is in every restored copy already."""
    np: Any = sys.modules.get("numpy")
    if np is None:
        return
    try:
        # 256: past LAPACK's block-size cross-overs, so the blocked code paths are loaded too
        a = np.random.default_rng(0).random((256, 256)) + np.eye(256) * 256
        la = np.linalg
        for op in (la.eig, la.eigh, la.svd, la.inv, la.det, la.qr, la.cholesky, la.eigvals):
            op(a @ a.T if op is la.cholesky else a)
        la.solve(a, a[0])
        la.lstsq(a, a[0], rcond=None)
        np.fft.fft(a[0])
        np.random.default_rng(0).random(8).sort()
        (a.astype(np.float32) @ a.astype(np.float32)).sum()
        (a.astype(np.complex128) @ a).sum()
    except Exception:
        pass  # a warm-up only: the program gets whatever it would have got


def _spare_bytes() -> int:
    """MemAvailable less ember.agent.heap.RESERVE_MIB: the budget is checked again at touch time,
    after the preload modules took their share."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return max(0, (int(line.split()[1]) >> 10) - RESERVE_MIB) << 20
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


Ranges = list[tuple[int, int]]  # [low, high) address ranges, ascending
Plan = tuple[Ranges, Ranges]  # a rehearsal's reads, writes


def _rehearse(heap: int, keep: set[str], plan: Plan | None = None) -> int:
    """Touch now what a program's start will touch; the pages touched (``{"op": "warm"}``).

    In a sandbox restored from a template each page a process touches first costs a shadow
    page fault and a host fault (~25 us here): ~3,500 of them, ~100 ms, in a pre-started
    interpreter's first program. A sandbox restored ahead of its use (a spare) asks for
    this while it waits. The compiler and the eval loop are rehearsed by compiling and
    running a throwaway program, the hand-over's own steps by doing them on copies. Memory
    is read a byte a page: the heap (but the pre-faulted block's tail, which small programs
    never reach) and the stack; what every program writes is written back unchanged: the
    interpreter's and libc's data (their globals, malloc's arena) and the first
    :data:`REHEARSED_HEAP` of the block, where its allocations land. That costs the host
    ~3 MiB of private memory per interpreter; the rest stays shared with the template.
    Where those are comes from ``plan`` (:func:`_plan_rehearsal`, made in the template)
    when given: reading ``/proc/self/maps`` again would cost every spare ~0.9 s a member.
    """
    return sum(_rehearsal(heap, keep, plan))


def _plan_rehearsal(heap: int) -> Plan:
    """The ranges a rehearsal reads and writes, from ``/proc/self/maps``: made once, before
    the snapshot, since none of them shrinks or moves while a member waits (its heap is
    never trimmed: ``MALLOC_TRIM_THRESHOLD_``, and only a mother calls ``malloc_trim``,
    before she forks; a stack never shrinks; python3's and libc's data stay where they were
    loaded). A heap that grew since is rehearsed as far as it reached then."""
    reads: list[tuple[int, int]] = []
    writes: list[tuple[int, int]] = []
    data_of = (b"python3", b"libc.so")
    data_end = -1  # where python3's or libc's data ends: an unnamed mapping right there is .bss
    for low, high, perms, name in _maps():
        writable = perms.startswith(b"rw")
        ours = any(part in name.rsplit(b"/", 1)[-1] for part in data_of)
        if name == b"[heap]":
            block = max(low, high - heap)  # the block is the heap's top, as the template freed it
            reads.append((low, block if heap else high))
            if heap:
                writes.append((block, min(high, block + REHEARSED_HEAP)))
        elif name == b"[stack]":
            reads.append((low, high))
        elif writable and (ours or (not name and low == data_end and high - low <= MAX_BSS)):
            writes.append((low, high))
        data_end = high if writable and ours else -1
    return reads, writes


def _rehearsal(heap: int, keep: set[str], plan: Plan | None = None) -> Iterator[int]:
    """:func:`_rehearse` in steps of at most :data:`STEP_PAGES` pages, each yielding its count."""
    import ctypes  # imported in the template already (_Flags)

    namespace: dict[str, Any] = {"__builtins__": __builtins__}
    exec(compile(_REHEARSAL, "<rehearsal>", "exec", dont_inherit=True), namespace)
    marshal.loads(marshal.dumps({"argv": ["python3"], "env": dict(os.environ)}))
    _ = set(sys.modules) - keep
    page = os.sysconf("SC_PAGE_SIZE")
    reads, writes = plan if plan is not None else _plan_rehearsal(heap)
    pages = 0
    for (low, high), write in [*((r, False) for r in reads), *((w, True) for w in writes)]:
        for address in range(low, high, page):
            if write:
                ctypes.memmove(address, address, 1)  # the same byte back (see _profile_steps)
            else:
                ctypes.string_at(address, 1)
            pages += 1
            if pages == STEP_PAGES:
                yield pages
                pages = 0
    yield pages


def _warm_forked(
    ctl: int, keep: set[str], profile: bytes = b"", ranges: tuple[Ranges, Ranges] | None = None
) -> None:
    """A forked member's copy-on-write faults, taken while it waits rather than in its job.

    Every page a forked member writes first is still its mother's: a guest page fault and a
    copy (~3 ms here). Its first program would take ~600 of them (the hand-over ~500, a small
    program ~100, counted on a host). The warm-up takes the profile's core only (the pages
    every program takes: :func:`_ordered_profile`), in steps, and stops as soon as a job is
    waiting on ``ctl``: the member says ``ready`` first, and an exec never waits for a
    warm-up.
    """
    import _socket

    sock = _socket.socket(fileno=ctl)

    def pending() -> bool:
        try:
            sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True  # a job, or the agent closed the socket: the caller reads which

    try:
        if pending():
            return
        for _ in _warm_steps(keep, profile, ranges, whole=False):
            if pending():
                return
    finally:
        sock.detach()


def _warm_steps(
    keep: set[str],
    profile: bytes = b"",
    ranges: tuple[Ranges, Ranges] | None = None,
    *,
    whole: bool = True,
) -> Iterator[int]:
    """Most faults saved per fault taken first (counted on a host): the reseed, then the
    pages of the mother's fault ``profile``, each one a program would write or read (see
    :func:`_profile_steps`, which the mother's ``ranges`` and ``whole`` are passed to);
    without one, the small programs, then the rehearsal (~550 faults to save ~200)."""
    # random's and numpy's state, which the hand-over reseeds again (with the job's seed, so
    # the warm-up's may be a constant): a seed given takes the hand-over's own path, and
    # asks the kernel for no entropy (~50,000 emulated instructions of ChaCha otherwise).
    _reseed(WARM_SEED)
    yield 0
    if profile:
        yield from _profile_steps(profile, ranges, whole=whole)
        return
    for source in _WARM_PROGRAMS:
        exec(compile(source, "<warm>", "exec", dont_inherit=True), {})
        yield 0
    yield from _rehearsal(0, keep)


def _maps() -> list[tuple[int, int, bytes, bytes]]:
    """This process's mappings from ``/proc/self/maps``, ascending: (low, high, permissions,
    name). Costly here (~0.9 s for ~280 mappings: the kernel escapes every path character
    by character), so read once where it is needed at all."""
    found = []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps.read().splitlines():
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split(b"-"))
            found.append((low, high, fields[1], fields[5] if len(fields) > 5 else b""))
    return found


def _private_writable() -> Ranges:
    """This process's private writable mappings (``rw?p``), ascending."""
    return _mother_ranges()[0]


def _mother_ranges() -> tuple[Ranges, Ranges]:
    """This process's private writable mappings (``rw?p``) and its read-only private file
    mappings (``r-?p`` of a path: program text and constants), each ascending: where a fault
    profile's addresses may be written back, and where read (:func:`_profile_steps`)."""
    writable: Ranges = []
    readable: Ranges = []
    for low, high, perms, name in _maps():
        if perms[:2] + perms[3:] == b"rwp":
            writable.append((low, high))
        elif perms[:2] + perms[3:] == b"r-p" and name.startswith(b"/"):
            readable.append((low, high))
    return writable, readable


def _read_pages() -> bytes:
    """The read-only file pages this process mapped since its fork, one 8-byte address per
    :data:`FAULT_AROUND` window: run by a probe at its end, beside :func:`_written_pages`.

    A fork copies no page-table entries of a mapping that has no anonymous pages (the
    kernel's ``vma_needs_copy``): a forked member maps each page of python3's and its
    libraries' code afresh, a guest page fault per window its program reaches (~40,000
    emulated instructions in a small program's exec here). So every such page present in
    the probe was mapped by the probe; one read of a byte in its window, while a member
    waits, maps the window as the program's own fault would have."""
    found = bytearray()
    window = -1
    try:
        for address, entry in _pagemap_entries(_mother_ranges()[1]):
            mapped = entry & (PM_PRESENT | PM_FILE) == PM_PRESENT | PM_FILE
            if mapped and address // FAULT_AROUND != window:
                window = address // FAULT_AROUND
                found += address.to_bytes(8, "little")
    except (OSError, ValueError):
        return b""
    return bytes(found)


def _written_pages() -> bytes:
    """The pages this process wrote since its fork, as 8-byte little-endian addresses: run
    by a *probe*, a member the mother forked only to run :data:`PROBE_PROGRAM` (the agent's
    ``profile`` job, ``ember.agent.poolprobe``), at its end. Its mother's other children
    have the same address space, so these are the pages their first program will write,
    each a copy-on-write fault (~3 ms here) unless written while they wait
    (:func:`_profile_steps`). From ``/proc/self/pagemap``: at the fork every page was the
    mother's too, so a present, anonymous page mapped by this process alone was copied (or
    first touched) by it. Empty where there is no pagemap (a kernel without
    ``CONFIG_PROC_PAGE_MONITOR``): the members then warm up without a profile."""
    wanted = PM_PRESENT | PM_FILE | PM_EXCLUSIVE
    found = bytearray()  # one buffer: a probe's own allocations are pages in its profile too
    try:
        for address, entry in _pagemap_entries(_private_writable()):
            if entry & wanted == PM_PRESENT | PM_EXCLUSIVE:
                found += address.to_bytes(8, "little")
    except (OSError, ValueError):
        return b""
    return bytes(found)


def _pagemap_entries(ranges: Ranges) -> Iterator[tuple[int, int]]:
    """Each page of ``ranges`` and its ``/proc/self/pagemap`` entry (kernel
    ``Documentation/admin-guide/mm/pagemap.rst``: 64 bits, ``PM_PRESENT``, ``PM_FILE``...),
    read :data:`PAGEMAP_CHUNK` entries at a time. Raises OSError where there is no pagemap."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for low, high in ranges:
            for start in range(low, high, PAGEMAP_CHUNK * page):
                pagemap.seek(start // page * 8)
                entries = pagemap.read(min(PAGEMAP_CHUNK, (high - start) // page) * 8)
                for i in range(0, len(entries) - 7, 8):
                    yield start + i // 8 * page, int.from_bytes(entries[i : i + 8], "little")


def _ordered_profile(handed: bytes, ran: bytes, ended: bytes, read: bytes = b"") -> bytes:
    """A probe's fault profile from its :func:`_written_pages` at three points (after the
    hand-over, when its program returned, at its end) and its :func:`_read_pages`, in the
    order a member should take them: the hand-over's pages, then the ending's, which every
    program writes, then the code pages read; :data:`CORE_END`; then the pages the probe's
    own program wrote. A refill warms up in steps that stop for a job, so the job may find
    only the head of the list taken. Cut at :data:`PROFILE_MAX_PAGES` entries.

    The core is what a refill in a live sandbox takes (:func:`_profile_steps`): the probe's
    program (``PROBE_PROGRAM``: sorting, dicts, json) wrote ~1,500 more pages, a guess at
    what a program writes that costs a refill seconds of guest time in copy-on-write faults
    (~2,000 in all, at ~2-3 ms each here) while a user's next exec waits for the fork after
    it. The template's forked members, warmed before the snapshot, take the whole list."""

    def pages(data: bytes) -> list[bytes]:
        return [data[i : i + 8] for i in range(0, len(data) - 7, 8)]

    first, before_end = set(pages(handed)), set(pages(ran))
    ending = [p for p in pages(ended) if p not in before_end]
    program = [p for p in pages(ran) if p not in first]
    order = [*pages(handed), *ending, *pages(read), CORE_END, *program]
    return b"".join(order[:PROFILE_MAX_PAGES])


def core_length(profile: bytes) -> int:
    """Entries of a fault profile before its :data:`CORE_END` (all of them if it has none):
    what a refill in a live sandbox takes (:func:`_profile_steps` unless ``whole``)."""
    for i in range(0, len(profile) - 7, 8):
        if profile[i : i + 8] == CORE_END:
            return i // 8
    return len(profile) // 8


def _profile_steps(
    profile: bytes,
    mother: tuple[Ranges, Ranges] | None = None,
    *,
    whole: bool = True,
) -> Iterator[int]:
    """Take now, in the list's order (:func:`_ordered_profile`), the faults a program would
    take at the pages of ``profile`` (a probe's, forked from this member's mother): write
    back, unchanged, one byte of each page that lies in a private writable mapping here (a
    copy-on-write fault), and read one byte of each that lies in a read-only file mapping
    (a window of code mapped: :func:`_read_pages`), in steps of at most
    :data:`STEP_PAGES`, each yielding its count. The list is a hint, from another process:
    an address that is not page-aligned or not in such a mapping is passed over, and at most
    :data:`PROFILE_MAX_PAGES` are read; unless ``whole``, only those before
    :data:`CORE_END` (:func:`_ordered_profile`). Writing a byte with its own value changes nothing
    but who owns the page: a copy-on-write fault now, while the member waits (or, in a
    template, before the snapshot), not in the program.

    The byte is read and written back inside one C call (``memmove`` onto itself). Read by
    one bytecode and written by the next, it could be a byte the interpreter changed in
    between (this frame's value stack, a reference count): the stale value written back
    would corrupt it. A member forked in a CI run died so, three times in a row (a read
    at 0x61 in ``_Py_CheckRecursiveCall``).

    Which mappings are which (writable, readable) is ``mother`` when given: the mother's
    (:func:`_mother_ranges`, read once in the template, after her heap was trimmed). A
    child has every mapping its mother had at the fork, and hers only grow from then on (her
    heap is never trimmed again, her malloc never maps or unmaps: ``ember.agent.heap``), so
    an address inside them is mapped here too. Reading ``/proc/self/maps`` in each refill
    instead cost ~400,000 emulated instructions (~0.5 s here) a member."""
    import ctypes  # imported in the template already (_Flags)

    page = os.sysconf("SC_PAGE_SIZE")
    ranges, readable = mother if mother is not None else _mother_ranges()
    seen: set[int] = set()
    pages = 0
    entries = len(profile) // 8 if whole else core_length(profile)
    for i in range(min(entries, PROFILE_MAX_PAGES)):
        address = int.from_bytes(profile[i * 8 : i * 8 + 8], "little")
        if address % page or address in seen:
            continue
        if _within(ranges, address):
            ctypes.memmove(address, address, 1)
        elif _within(readable, address):
            ctypes.string_at(address, 1)
        else:
            continue
        seen.add(address)
        pages += 1
        if pages == STEP_PAGES:
            yield pages
            pages = 0
    yield pages


def _within(ranges: Ranges, address: int) -> bool:
    """``address`` lies in one of ``ranges`` (ascending, disjoint): a binary search."""
    low, high = 0, len(ranges)
    while low < high:
        middle = (low + high) // 2
        if ranges[middle][1] <= address:
            low = middle + 1
        else:
            high = middle
    return low < len(ranges) and ranges[low][0] <= address


_REHEARSAL = """\
def _words(n):
    return [f"{i}:{str(i) * 2}" for i in range(n)]
_table = {"list": _words(16), "tuple": tuple(_words(4)), "set": set(_words(8))}
_text = " ".join(sorted(_table["set"])).encode().decode()
try:
    raise ValueError(_text[:8])
except ValueError as _exc:
    _table["error"] = repr(_exc)
"""


# Small programs a forked member runs while it waits, each a step of its warm-up (a job that
# arrives meanwhile waits for the step in hand only): what programs commonly do first.
_WARM_PROGRAMS = (
    """\
class _Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
_points = sorted((_Point(i % 17, i * 3.5) for i in range(500)), key=lambda p: (p.x, -p.y))
_words = " ".join(f"{p.x}-{p.y:.1f}" for p in _points[:64]).split()
""",
    """\
try:
    {}["missing"]
except KeyError as _exc:
    _error = repr(_exc)
_table = {i: str(i) for i in range(2000)}
""",
    """\
import io, json, collections
_out = io.StringIO()
print(collections.Counter("abracadabra").most_common(2), file=_out)
json.loads(json.dumps({str(i): [i, i * 0.5] for i in range(500)}))
""",
    """\
_blobs = [bytes(n) for n in range(1, 4096, 5)]
_text = "".join(chr(32 + i % 90) for i in range(20000)).encode().decode()
""",
)

# The agent's probe (ember.agent.poolprobe) runs this in a member forked from the mother, and
# the pages it wrote, hand-over and ending included, become the other members' warm-up.
PROBE_PROGRAM = "\n".join((*_WARM_PROGRAMS, "print(len(_words), len(_table), len(_blobs))\n"))
