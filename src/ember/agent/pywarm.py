"""Inside a pre-started interpreter: work done before a job so that the job does not
pay for it; numpy's kernels, the heap's budget, a rehearsal of a program's start, and a forked
member's copy-on-write faults taken in steps while it waits.

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


def _rehearse(heap: int, keep: set[str]) -> int:
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
    """
    return sum(_rehearsal(heap, keep))


def _rehearsal(heap: int, keep: set[str]) -> Iterator[int]:
    """:func:`_rehearse` in steps of at most :data:`STEP_PAGES` pages, each yielding its count."""
    import ctypes  # imported in the template already (_Flags)

    namespace: dict[str, Any] = {"__builtins__": __builtins__}
    exec(compile(_REHEARSAL, "<rehearsal>", "exec", dont_inherit=True), namespace)
    marshal.loads(marshal.dumps({"argv": ["python3"], "env": dict(os.environ)}))
    _ = set(sys.modules) - keep
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/maps", "rb") as maps:
        lines = maps.read().splitlines()
    reads: list[tuple[int, int]] = []
    writes: list[tuple[int, int]] = []
    data_of = (b"python3", b"libc.so")
    data_end = -1  # where python3's or libc's data ends: an unnamed mapping right there is .bss
    for line in lines:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split(b"-"))
        name = fields[5] if len(fields) > 5 else b""
        writable = fields[1].startswith(b"rw")
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
    pages = 0
    for (low, high), write in [*((r, False) for r in reads), *((w, True) for w in writes)]:
        for address in range(low, high, page):
            if write:
                byte = ctypes.c_char.from_address(address)
                byte.value = byte.value  # the same byte back: a write, no change
            else:
                ctypes.string_at(address, 1)
            pages += 1
            if pages == STEP_PAGES:
                yield pages
                pages = 0
    yield pages


def _warm_forked(ctl: int, keep: set[str]) -> None:
    """A forked member's copy-on-write faults, taken while it waits rather than in its job.

    Every page a forked member writes first is still its mother's: a guest page fault and a
    copy (~3 ms here). Its first program would take ~600 of them (the hand-over ~500, a small
    program ~100, counted on a host); after this warm-up, ~150-250. The warm-up costs ~2,000
    faults of its own, so it runs in steps, and stops as soon as a job is waiting on ``ctl``:
    the member says ``ready`` first, and an exec never waits for a warm-up.
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
        for _ in _warm_steps(keep):
            if pending():
                return
    finally:
        sock.detach()


def _warm_steps(keep: set[str]) -> Iterator[int]:
    """Most faults saved per fault taken first (counted on a host): the reseed, the small
    programs, then the rehearsal (~550 faults to save ~200)."""
    _reseed()  # random's and numpy's state, which the hand-over reseeds again
    yield 0
    for source in _WARM_PROGRAMS:
        exec(compile(source, "<warm>", "exec", dont_inherit=True), {})
        yield 0
    yield from _rehearsal(0, keep)


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
