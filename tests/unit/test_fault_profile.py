"""The pool's fault profile (ember.agent.pywarm, ember.agent.poolprobe): a forked child's
written pages read from /proc/self/pagemap, and a member writing a profile's pages back so
that its program takes no copy-on-write fault on them. Real forks on the host's kernel."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from ember.agent import pywarm
from ember.agent.poolprobe import MAX_PROFILE_BYTES, valid_profile

PAGE = mmap.PAGESIZE
PAGES = 16

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/pagemap"), reason="needs /proc/self/pagemap"
)


_RU_MINFLT = 8  # struct rusage as longs: two timevals (2 longs each), then ru_maxrss .. ru_minflt


def _fault_counter() -> Callable[[Any], None]:
    """``count(usage)`` fills a ``c_long * 18`` with getrusage(RUSAGE_SELF), ``ru_minflt`` at
    :data:`_RU_MINFLT`. A count read through Python (``/proc/self/stat``, a parse) allocates
    between two readings, and a fresh allocator page is a minor fault of its own: the very
    noise a measurement of one or two faults cannot have. This call allocates nothing, and
    the caller compares its filled arrays only after the last reading."""
    import ctypes

    getrusage = ctypes.CDLL(None, use_errno=True).getrusage
    getrusage.argtypes = [ctypes.c_int, ctypes.c_void_p]
    getrusage.restype = ctypes.c_int
    return lambda usage: getrusage(0, usage)


def _exclusive(address: int) -> bool:
    """Whether the page at ``address`` is present and mapped by this process alone (pagemap)."""
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(address // PAGE * 8)
        entry = int.from_bytes(pagemap.read(8), "little")
    return entry & (pywarm.PM_PRESENT | pywarm.PM_EXCLUSIVE) == (
        pywarm.PM_PRESENT | pywarm.PM_EXCLUSIVE
    )


def _in_child(body: Callable[[int], Any], base: int) -> Any:
    """``body(base)`` in a forked child; its repr()-able result (or its exception's text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(r)
        try:
            result: Any = body(base)
        except BaseException as exc:
            result = f"raised {type(exc).__name__}: {exc}"
        os.write(w, repr(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return eval(data)  # our own child's repr of ints, lists and strings


@pytest.fixture
def block() -> Any:
    """Sixteen private anonymous pages of random bytes, all present in this process."""
    area = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.write(random.randbytes(PAGES * PAGE))
    yield area
    area.close()


def _address(area: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(area))


def _pages(profile: bytes) -> set[int]:
    return {int.from_bytes(profile[i : i + 8], "little") for i in range(0, len(profile), 8)}


def test_a_forked_child_reports_the_pages_it_wrote_and_not_those_it_read(block: Any) -> None:
    base = _address(block)

    def child(base: int) -> list[int]:
        import ctypes

        ctypes.string_at(base + 3 * PAGE, 16)  # read only: still the parent's page
        for n in (5, 9):
            ctypes.c_char.from_address(base + n * PAGE + 100).value = b"x"
        return sorted(_pages(pywarm._written_pages()))

    written = set(_in_child(child, base))
    mine = {base + n * PAGE for n in range(PAGES)}
    assert written & mine == {base + 5 * PAGE, base + 9 * PAGE}


def test_a_members_warm_up_takes_the_faults_and_changes_nothing(block: Any) -> None:
    base = _address(block)
    before = bytes(block)
    text = next(low for low, high, perms in _maps() if perms.startswith("r-x"))
    hint = b"".join(
        a.to_bytes(8, "little")
        for a in (
            base + 2 * PAGE,
            base + 4 * PAGE,
            base + 4 * PAGE,  # twice: written once
            base + 6 * PAGE + 8,  # not page-aligned: passed over
            text,  # program text: read (its window mapped), never written (that would crash)
            8 * PAGE,  # not mapped at all
        )
    )

    def child(base: int) -> tuple[int, list[bool], int, int, bool]:
        import ctypes
        import gc

        gc.disable()  # a collection writes to object headers: copy-on-write faults of its own
        taken = sum(pywarm._profile_steps(hint))
        unchanged = ctypes.string_at(base, PAGES * PAGE) == before
        # Read before any write: the warmed pages are this process's own, the others the parent's.
        own = [_exclusive(base + n * PAGE) for n in (2, 4, 6)]
        # Everything the measurements need is made first, so that only the writes can fault.
        first, second = (ctypes.c_char.from_address(base + n * PAGE + 7) for n in (2, 4))
        other = ctypes.c_char.from_address(base + 6 * PAGE + 7)  # not in the hint
        y = b"y"
        scratch = ctypes.c_char.from_buffer(bytearray(1))
        count = _fault_counter()
        usage = [(ctypes.c_long * 18)() for _ in range(3)]
        start, mid, end = (ctypes.addressof(u) for u in usage)
        for _ in range(3):  # the call's and the setter's own first-use faults, outside the count
            count(start)
            scratch.value = y
        count(start)
        first.value = y  # written back by the warm-up: already this process's own
        second.value = y
        count(mid)
        other.value = y
        count(end)
        warm = usage[1][_RU_MINFLT] - usage[0][_RU_MINFLT]
        cold = usage[2][_RU_MINFLT] - usage[1][_RU_MINFLT]
        return taken, own, warm, cold, unchanged

    # A busy host adds faults of its own to a count (never takes one away), so each count is
    # the least of a few forks: a warm-up that did nothing still shows 2 faults in every one.
    runs = [_in_child(child, base) for _ in range(5)]
    assert {(taken, tuple(own), unchanged) for taken, own, _, _, unchanged in runs} == {
        (3, (True, True, False), True)
    }
    assert min(run[2] for run in runs) == 0  # warm: no fault on the pages the hint named
    assert min(run[3] for run in runs) == 1  # cold: the write to page 6 copied it
    assert bytes(block) == before  # the parent's pages were never the child's to change


def test_a_rehearsal_planned_earlier_touches_the_same_pages_without_reading_maps() -> None:
    """A spare's rehearsal uses the plan its member made in the template: the same ranges a
    fresh read of /proc/self/maps gives (~0.9 s a member in the guest), without that read."""

    def child(base: int) -> tuple[bool, int, int, str]:
        stack = next((low, high) for low, high, _, name in pywarm._maps() if name == b"[stack]")
        plan = pywarm._plan_rehearsal(0)
        fresh = pywarm._rehearse(0, set(), None)  # reads maps itself

        def no_maps() -> list[tuple[int, int, bytes, bytes]]:
            raise AssertionError("read /proc/self/maps")

        pywarm._maps = no_maps
        try:
            planned = pywarm._rehearse(0, set(), plan)
        except AssertionError as exc:
            return False, 0, 0, str(exc)
        reads, writes = plan
        return stack in reads and bool(writes), fresh, planned, ""

    found, fresh, planned, error = _in_child(child, 0)
    assert error == ""
    assert found  # the plan reads the stack and has data to write back
    assert planned == fresh > 0


def test_a_profile_is_whole_addresses_and_bounded() -> None:
    assert valid_profile((4096).to_bytes(8, "little") * 3)
    assert not valid_profile(b"")
    assert not valid_profile(b"\x00" * 12)  # not whole addresses: a traceback, say
    assert not valid_profile(b"\x00" * (MAX_PROFILE_BYTES + 8))
    # A member reads at most PROFILE_MAX_PAGES of whatever it is given.
    assert sum(pywarm._profile_steps(b"\xff" * (MAX_PROFILE_BYTES * 4))) == 0


def _maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            out.append((low, high, fields[1]))
    return out


def test_a_probes_pages_come_hand_over_first_then_ending_then_program() -> None:
    # A refill's warm-up stops for a job, so the pages every program writes (the hand-over's
    # and the ending's) go before those only the probe's own program wrote.
    def of(*pages: int) -> bytes:
        return b"".join((n * PAGE).to_bytes(8, "little") for n in pages)

    handed, ran, ended = of(1, 2), of(1, 2, 7, 8), of(1, 2, 7, 8, 5)
    core_end = pywarm.CORE_END
    assert pywarm._ordered_profile(handed, ran, ended) == of(1, 2, 5) + core_end + of(7, 8)
    # Code pages read go before the program's own writes: every program runs that code.
    read = of(40, 56)
    assert pywarm._ordered_profile(handed, ran, ended, read) == (
        of(1, 2, 5, 40, 56) + core_end + of(7, 8)
    )
    many = of(*range(1, pywarm.PROFILE_MAX_PAGES + 10))
    assert pywarm._ordered_profile(many, many, many) == many[:MAX_PROFILE_BYTES]


CODE_PAGES = 256


@pytest.fixture
def code_file(tmp_path: Any) -> Any:
    """A 1 MiB file mapped private and read-only, as a library's code is, none of it
    touched here: a fork copies no page-table entries of such a mapping."""
    path = tmp_path / "lib.so"
    path.write_bytes(random.randbytes(CODE_PAGES * PAGE))
    with open(path, "rb") as f:
        area = mmap.mmap(f.fileno(), CODE_PAGES * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    yield area
    area.close()


def _present(address: int) -> bool:
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(address // PAGE * 8)
        return bool(int.from_bytes(pagemap.read(8), "little") & pywarm.PM_PRESENT)


def test_a_probe_reports_the_code_windows_it_mapped_and_a_member_maps_them(
    code_file: Any,
) -> None:
    import ctypes

    base = next(low for low, high, perms in _maps() if high - low == CODE_PAGES * PAGE
                and perms == "r--p" and _is_file(low))  # fmt: skip
    touched = base + 19 * PAGE

    def probe(base: int) -> list[int]:
        ctypes.string_at(touched, 1)
        found = _pages(pywarm._read_pages())
        return sorted(a for a in found if base <= a < base + CODE_PAGES * PAGE)

    reported = _in_child(probe, base)
    windows = {a // pywarm.FAULT_AROUND for a in reported}
    assert touched // pywarm.FAULT_AROUND in windows
    assert len(windows) == len(reported)  # one page per window (the kernel may map more
    # than the window around a read: a large folio of the page cache is mapped whole)
    profile = b"".join(a.to_bytes(8, "little") for a in reported)

    def member(base: int) -> tuple[bool, int, bool]:
        before = _present(touched)
        taken = sum(pywarm._profile_steps(profile))
        return before, taken, _present(touched)

    # Before its warm-up a member has none of it (the fork copied nothing); after, the
    # page the probe read is mapped.
    assert _in_child(member, base) == (False, len(reported), True)


def _is_file(low: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.startswith(f"{low:x}-") and line.rstrip().endswith("lib.so") for line in f)


def test_a_member_warms_up_without_reading_maps_or_asking_for_entropy(block: Any) -> None:
    """The mother reads her mappings once, in the template; a member she forks warms up
    with them (reading /proc/self/maps cost ~0.5 s a refill in the guest), and reseeds
    its generators from a constant the hand-over replaces (the kernel's entropy cost
    ~50,000 emulated instructions)."""
    base = _address(block)
    ranges = pywarm._mother_ranges()  # as the mother, before she forks
    hint = b"".join((base + n * PAGE).to_bytes(8, "little") for n in (1, 3))

    def child(base: int) -> tuple[int, list[bool]]:
        def no_maps() -> list[tuple[int, int, bytes, bytes]]:
            raise AssertionError("read /proc/self/maps")

        def no_entropy(n: int) -> bytes:
            raise AssertionError("asked for entropy")

        pywarm._maps = no_maps
        os.urandom = no_entropy
        import random
        import sys

        random.seed(0)
        taken = sum(pywarm._warm_steps(set(), hint, ranges))
        expected = random.Random(pywarm.WARM_SEED)  # reseeded from the constant
        if "numpy.random" in sys.modules:
            expected.getrandbits(32)  # numpy's seed, drawn from it
        assert random.getstate() == expected.getstate()
        return taken, [_exclusive(base + n * PAGE) for n in (1, 2, 3)]

    assert _in_child(child, base) == (2, [True, False, True])


def test_a_live_refill_takes_the_profiles_core_and_a_template_member_all_of_it(
    block: Any,
) -> None:
    """Past CORE_END are the probe's own program's pages: a guess that a refill in a live
    sandbox does not pay for (seconds of faults while the user's next exec waits)."""
    base = _address(block)
    profile = b"".join(
        [(base + 2 * PAGE).to_bytes(8, "little"), pywarm.CORE_END,
         (base + 4 * PAGE).to_bytes(8, "little")]
    )  # fmt: skip

    def child(whole: int) -> tuple[int, list[bool]]:
        taken = sum(pywarm._profile_steps(profile, whole=bool(whole)))
        return taken, [_exclusive(base + n * PAGE) for n in (2, 4)]

    assert _in_child(child, 0) == (1, [True, False])
    assert _in_child(child, 1) == (2, [True, True])
    assert pywarm.core_length(profile) == 1
    assert pywarm.core_length(profile[:8]) == 1  # an older profile, no end marked: all of it
