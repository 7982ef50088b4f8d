"""The newc writer, checked against an independent parser and the system `cpio`."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import BuildError
from ember.images import initrd
from ember.images.cpio import HEADER_SIZE, CpioWriter

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")


@dataclass
class Entry:
    offset: int
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def parse(archive: bytes) -> list[Entry]:
    """A deliberately separate newc reader: checks magic, padding and the trailer."""
    entries: list[Entry] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at {pos} not 4-byte aligned"
        header = archive[pos : pos + HEADER_SIZE]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_end = pos + HEADER_SIZE + namesize
        assert archive[name_end - 1] == 0, "name not NUL-terminated"
        name = archive[pos + HEADER_SIZE : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end)
        data = archive[data_start : data_start + size]
        entry = Entry(pos, name, ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), data)
        pos = data_start + size
        pad = -pos % 4
        assert archive[pos : pos + pad] == b"\0" * pad
        pos += pad
        if name == "TRAILER!!!":
            assert pos == len(archive), "bytes after the trailer"
            return entries
        entries.append(entry)


def sample() -> bytes:
    out = io.BytesIO()
    w = CpioWriter(out)
    w.add_dir("bin")
    w.add_dir("dev")
    w.add_char_device("dev/console", 5, 1)
    w.add_char_device("dev/null", 1, 3, 0o666)
    w.add_block_device("dev/vda", 254, 0)
    w.add_file("bin/hello", b"hello world\n", 0o755)
    w.add_file("empty", b"")
    w.add_file("odd", b"abc")  # 3 bytes: needs padding
    w.add_symlink("bin/sh", "hello")
    w.finish()
    return out.getvalue()


def test_entries_round_trip_through_parser() -> None:
    archive = sample()
    assert len(archive) % 4 == 0
    entries = {e.name: e for e in parse(archive)}
    assert list(entries) == [
        "bin",
        "dev",
        "dev/console",
        "dev/null",
        "dev/vda",
        "bin/hello",
        "empty",
        "odd",
        "bin/sh",
    ]
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())
    assert len({e.ino for e in entries.values()}) == len(entries)
    assert entries["bin"].mode == stat.S_IFDIR | 0o755
    assert entries["dev/console"].mode == stat.S_IFCHR | 0o600
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["dev/null"].mode == stat.S_IFCHR | 0o666
    assert entries["dev/null"].rdev == (1, 3)
    assert entries["dev/vda"].mode == stat.S_IFBLK | 0o600
    assert entries["bin/hello"].mode == stat.S_IFREG | 0o755
    assert entries["bin/hello"].data == b"hello world\n"
    assert entries["odd"].data == b"abc"
    assert entries["empty"].data == b""
    assert entries["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert entries["bin/sh"].data == b"hello"


def test_output_is_deterministic() -> None:
    assert sample() == sample()


@needs_cpio
def test_system_cpio_lists_names_modes_and_devices() -> None:
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=sample(), capture_output=True, check=True
    ).stdout.decode()
    rows = [line.split() for line in listing.splitlines()]
    by_name = {row[-1] if "->" not in row else row[-3]: row for row in rows}
    assert set(by_name) == {
        "bin",
        "dev",
        "dev/console",
        "dev/null",
        "dev/vda",
        "bin/hello",
        "empty",
        "odd",
        "bin/sh",
    }
    assert by_name["dev/console"][0] == "crw-------"
    assert by_name["dev/console"][4:6] == ["5,", "1"]
    assert by_name["dev/null"][0] == "crw-rw-rw-"
    assert by_name["dev/null"][4:6] == ["1,", "3"]
    assert by_name["dev/vda"][0].startswith("b")
    assert by_name["bin"][0] == "drwxr-xr-x"
    assert by_name["bin/hello"][0] == "-rwxr-xr-x"
    assert by_name["bin/sh"][0] == "lrwxrwxrwx"
    assert by_name["bin/sh"][-2:] == ["->", "hello"]
    assert all(row[2:4] == ["root", "root"] for row in rows)


@needs_cpio
def test_system_cpio_extracts_file_contents() -> None:
    for name, expected in [("bin/hello", b"hello world\n"), ("odd", b"abc")]:
        out = subprocess.run(
            ["cpio", "-i", "--to-stdout", "--quiet", name],
            input=sample(),
            capture_output=True,
            check=True,
        ).stdout
        assert out == expected


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=40).filter(
            lambda s: s not in (".", "..")
        ),
        st.binary(max_size=300),
        max_size=8,
    )
)
def test_any_files_round_trip(files: dict[str, bytes]) -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    for name, data in files.items():
        w.add_file(name, data)
    w.finish()
    assert {e.name: e.data for e in parse(out.getvalue())} == files


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a", "a\0b", "trailing/"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        CpioWriter(io.BytesIO()).add_file(name, b"")


def test_duplicates_and_writes_after_finish_are_refused() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_dir("bin")
    with pytest.raises(ValueError):
        w.add_dir("bin")
    w.finish()
    with pytest.raises(ValueError):
        w.add_dir("sbin")


def test_initrd_layout() -> None:
    out = io.BytesIO()
    initrd.write_initrd(out, b"\x7fELF ember-init")
    entries = {e.name: e for e in parse(out.getvalue())}
    assert set(entries) == {"dev", "proc", "dev/console", "dev/null", "init"}
    for d in ("dev", "proc"):
        assert stat.S_ISDIR(entries[d].mode)
    assert entries["dev/console"].rdev == (5, 1) and stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["dev/null"].rdev == (1, 3) and stat.S_ISCHR(entries["dev/null"].mode)
    assert entries["init"].data == b"\x7fELF ember-init"
    assert entries["init"].mode == stat.S_IFREG | 0o755


def test_dynamic_or_non_elf_init_is_refused() -> None:
    dynamic = Path(shutil.which("ls") or "/bin/ls")
    with pytest.raises(BuildError, match=r"dynamically linked"):
        initrd.check_static_elf(dynamic.read_bytes(), dynamic)
    with pytest.raises(BuildError, match="not an ELF"):
        initrd.check_static_elf(b"#!/bin/sh\n" + b"\0" * 100, Path("script"))


def test_shipped_ember_init_compiles_static() -> None:
    source = initrd.load_init_source()
    binary = initrd.compile_init(source)
    initrd.check_static_elf(binary, Path("ember-init"))
    assert len(binary) < 64 * 1024
    assert initrd.compile_init(source) == binary  # reproducible: the cache key relies on it


def test_broken_init_source_is_a_build_error() -> None:
    with pytest.raises(BuildError, match=r"compiling ember-init"):
        initrd.compile_init(b"void _start(void) { this is not C }\n")
