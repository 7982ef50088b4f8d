"""Uploads land in huge pages of the guest's tmpfs (``huge=within_size``, mounted by ember-init;
the agent sizes an upload's file before its bytes); small files keep small pages."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ember import Sandbox

from .conftest import Images

HUGE_KIB = (
    "[int(line.split()[1]) for line in open('/proc/meminfo')"
    " if line.startswith('ShmemHugePages:')][0]"
)


@pytest.fixture
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as box:
        yield box


def huge_kib(sb: Sandbox) -> int:
    cell = sb.run_code(HUGE_KIB, timeout=600)
    assert cell.error is None, cell
    return int(str(cell.value))


def test_tmp_is_mounted_for_huge_pages(sb: Sandbox) -> None:
    cell = sb.run_code("[x.split()[3] for x in open('/proc/mounts') if x.split()[1] == '/tmp']")
    assert cell.error is None and "huge=within_size" in str(cell.value), cell


def test_an_upload_lands_in_huge_pages_and_a_small_file_does_not(sb: Sandbox) -> None:
    before = huge_kib(sb)
    data = os.urandom((4 << 20) + 123)  # two whole huge pages and a tail
    assert sb.files.write("/tmp/up.bin", data) == len(data)
    grown = huge_kib(sb) - before
    assert grown == 4096, grown  # the tail stays in small pages
    assert sb.files.read("/tmp/up.bin") == data
    # and its preferred I/O size is still a page (kernel patch 0016): 2 MiB would make cat,
    # cp and buffered readers allocate 2 MiB buffers, 512 first touches each
    cell = sb.run_code("import os\nos.stat('/tmp/up.bin').st_blksize", timeout=600)
    assert cell.error is None and cell.value == "4096", cell
    sb.files.write("/tmp/small.txt", b"x" * 1000)
    sb.files.write("/tmp/up.bin", b"shorter")  # replaced: its huge pages are freed
    assert huge_kib(sb) == before, "a small file took a huge page, or the old one stayed"
    assert sb.files.read("/tmp/up.bin") == b"shorter"


def test_a_guest_program_gets_huge_pages_only_for_a_length_it_set(sb: Sandbox) -> None:
    code = (
        "import os\nbuf = bytes(4 << 20)\n"
        "with open('/tmp/grown', 'wb') as f:\n    f.write(buf)\n"  # grows as it writes
        "a = " + HUGE_KIB + "\n"
        "with open('/tmp/sized', 'wb') as f:\n    f.truncate(len(buf))\n    f.write(buf)\n"
        "b = " + HUGE_KIB + "\n"
        # outside /tmp: the root's writable layer, a tmpfs mounted the same way
        "with open('/root/sized', 'wb') as f:\n    f.truncate(len(buf))\n    f.write(buf)\n"
        "c = " + HUGE_KIB + "\n"
        "(a, b, c)"
    )
    before = huge_kib(sb)
    cell = sb.run_code(code, timeout=600)
    assert cell.error is None, cell
    grown, sized, rooted = (int(x) for x in str(cell.value).strip("()").split(","))
    got = (grown - before, sized - grown, rooted - sized)
    assert got == (0, 4096, 4096), (before, grown, sized, rooted)
