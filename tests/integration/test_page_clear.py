"""The VMM clears the guest kernel's fresh pages (kernel patch 0017, ``ember.host_clear``).

On kvm_pvm the pvm CPU template asks for it and every fresh anonymous huge page, 4 KiB page
and huge tmpfs page is cleared by the VMM; on hardware KVM nothing is handed over. Either way
what a program gets must read as zeros, although the memory it reuses held another
program's bytes a moment before: a clear at the wrong place, or none, shows here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from ember import Sandbox
from ember.arch.x86_64.cpuid import host_is_pvm

from .conftest import Images

MIB = 1 << 20

# Fill 48 MiB with a pattern and free it, then map 48 MiB again (huge pages asked for),
# touch one byte per 4 KiB page and count the bytes that are not zero: the second mapping
# reuses the freed memory, so only a clear makes it zero.
REUSED = """
import mmap
n = 48 << 20
private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # (shared anonymous memory is tmpfs)
old = mmap.mmap(-1, n, flags=private)
old.madvise(mmap.MADV_HUGEPAGE)
old.write(b"\\xa5" * n)
old.close()
new = mmap.mmap(-1, n, flags=private)
new.madvise(mmap.MADV_HUGEPAGE)
for i in range(0, n, 4096):
    new[i] = 1
image = new[:]
(image.count(0), image.count(1), n)
"""

# A sized tmpfs file written through a mapping: its huge pages are cleared when first
# faulted (shmem's fallocate path), then one byte per page is written.
TMPFS = """
import mmap, os
n = 8 << 20
fd = os.open("/tmp/page-clear", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, n)  # huge=within_size: sized first, as the agent's uploads are
os.posix_fallocate(fd, 0, n)
m = mmap.mmap(fd, n)
for i in range(0, n, 4096):
    m[i] = 2
image = m[:]
m.close(); os.close(fd); os.unlink("/tmp/page-clear")
(image.count(0), image.count(2), n)
"""


@pytest.fixture
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as box:
        yield box


def cleared(sb: Sandbox) -> dict[str, int]:
    counters: dict[str, int] = sb._vmm.control("status")["devices"]["page_clear"]
    return counters


def run(sb: Sandbox, code: str) -> tuple[int, int, int]:
    cell = sb.run_code(code, timeout=600)
    assert cell.error is None, cell
    zeros, ones, n = ast.literal_eval(str(cell.value))  # three ints, as the guest printed them
    return int(zeros), int(ones), int(n)


def test_reused_memory_reads_as_zeros_and_the_vmm_cleared_it(sb: Sandbox) -> None:
    before = cleared(sb)
    zeros, touched, n = run(sb, REUSED)
    assert touched == n // 4096 and zeros == n - touched
    after = cleared(sb)
    assert after["refused"] == before["refused"] == 0
    if host_is_pvm():  # 48 MiB in huge pages where the kernel found them, else in 4 KiB
        grown = (
            (after["huge_pages"] - before["huge_pages"]) * 512 + after["pages"] - before["pages"]
        )
        assert grown >= n // 4096 // 2, (before, after)
        assert after["huge_pages"] > before["huge_pages"], (before, after)
    else:
        assert after == before
    result = sb.exec(["python3", "-c", "print(sum(range(10)))"], timeout=600)
    assert (result.exit_code, result.stdout) == (0, b"45\n")  # the guest is intact


def test_a_huge_tmpfs_page_is_cleared_in_one_go(sb: Sandbox) -> None:
    sb.run_code(REUSED, timeout=600)  # leave freed memory holding a pattern behind
    before = cleared(sb)
    zeros, written, n = run(sb, TMPFS)
    assert written == n // 4096 and zeros == n - written
    after = cleared(sb)
    if host_is_pvm():
        assert after["huge_pages"] - before["huge_pages"] >= 4, (before, after)
    else:
        assert after == before


# A real python3 (started by a shell, not a pre-started interpreter): where its big blocks
# start, and how much of them is in huge pages.
FRESH = r"""
import ctypes, mmap
m = mmap.mmap(-1, 5 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
start = ctypes.addressof(ctypes.c_char.from_buffer(m)) % (2 << 20)
block = bytearray(16 << 20)
huge = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHuge")]
print(start, huge[0] << 10)
"""


def test_a_fresh_programs_big_blocks_start_on_2_mib_and_get_huge_pages(sb: Sandbox) -> None:
    """ember.thp_align (kernel patch 0018) and ember-init's glibc.malloc.hugetlb=1: a 16 MiB
    bytearray in a new python3 is huge pages, not 4,096 faults of the emulated kernel."""
    result = sb.exec(["sh", "-c", 'exec python3 -c "$0"', FRESH], timeout=600)
    assert result.exit_code == 0, result
    start, huge = (int(x) for x in result.stdout.split())
    if host_is_pvm():
        assert start == 0
        assert huge >= 14 * MIB, huge
