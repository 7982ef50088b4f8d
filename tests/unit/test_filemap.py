"""Uploads written through a shared mapping (ember.agent.filemap, used by files.Sink): on a
tmpfs (the host's /dev/shm stands in for the guest's /tmp) and not on a disk file system."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.agent import filemap
from ember.agent.files import HPAGE_PMD_SIZE, Sink

SHM = Path("/dev/shm")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    fd = os.open(SHM, os.O_RDONLY)
    try:
        if filemap.fs_type(fd) != filemap.TMPFS_MAGIC:
            pytest.fail("/dev/shm is not a tmpfs on this host")
    finally:
        os.close(fd)
    made = SHM / f"ember-test-{uuid.uuid4().hex[:8]}"
    made.mkdir()
    try:
        yield made
    finally:
        for child in made.iterdir():
            child.unlink()
        made.rmdir()


def test_the_file_systems_are_told_apart(shm_dir: Path, tmp_path: Path) -> None:
    fd = os.open(shm_dir, os.O_RDONLY)
    try:
        assert filemap.fs_type(fd) == filemap.TMPFS_MAGIC
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert filemap.fs_type(fd) not in filemap.MAPPABLE  # the host's disk (ext4 here)
    finally:
        os.close(fd)
    assert filemap.fs_type(-1) is None


@pytest.mark.parametrize("extra", [0, -12345, 777])  # as said, fewer bytes, more bytes
def test_a_presized_upload_to_tmpfs_goes_through_the_mapping(shm_dir: Path, extra: int) -> None:
    said = 2 * HPAGE_PMD_SIZE + 100
    data = os.urandom(said + extra)
    target = shm_dir / "up.bin"
    sink = Sink(str(target), None, False, said)
    assert sink.mapped is not None
    for start in range(0, len(data), 100_000):  # records as the ring hands them over
        sink.write(memoryview(data)[start : start + 100_000])
    assert (sink.mapped is None) == (extra > 0)  # past the promise: on with write
    sink.commit()
    assert target.read_bytes() == data
    assert sorted(p.name for p in shm_dir.iterdir()) == ["up.bin"]  # no temporary left


def test_an_upload_to_a_disk_or_unsized_is_written_as_before(shm_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(HPAGE_PMD_SIZE + 1)
    for target, size in ((tmp_path / "disk.bin", len(data)), (shm_dir / "unsized.bin", None)):
        sink = Sink(str(target), None, False, size)
        assert sink.mapped is None
        sink.write(data)
        sink.commit()
        assert target.read_bytes() == data


def test_an_aborted_mapped_upload_leaves_the_old_file(shm_dir: Path) -> None:
    target = shm_dir / "kept.bin"
    target.write_bytes(b"old")
    sink = Sink(str(target), None, False, HPAGE_PMD_SIZE)
    assert sink.mapped is not None
    sink.write(b"new" * 1000)
    sink.abort()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in shm_dir.iterdir()) == ["kept.bin"]


def test_no_room_for_the_file_means_write_which_says_so(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    sink = Sink(str(shm_dir / "full.bin"), None, False, HPAGE_PMD_SIZE)
    assert sink.mapped is None  # no mapping that could SIGBUS: write reports ENOSPC itself
    sink.abort()
