"""Template transfer between node stores (``ember.ray.transfer``): no Ray, no KVM.

A fake template (a real state file with its checksum and the memory's SHA-256, a sparse
memory file) is copied store to store through a ``fetch`` that may lie: the copy must
come out byte-identical and still sparse, and any damage must leave nothing a restore
could find.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.ray import transfer
from ember.ray.transfer import CHUNK, TransferError, manifest, read_chunk, receive
from ember.snapshot import MEMORY_FILE, STATE_FILE
from ember.snapshot.format import encode
from ember.templates import find

MEM = 64 << 20


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))  # build locks live there


def _template(root: Path, name: str, rootfs: Path) -> Path:
    d = root / name
    d.mkdir(parents=True)
    memory = d / MEMORY_FILE
    with open(memory, "wb") as f:
        f.truncate(MEM)
        for offset in (0, 5 << 20, 40 << 20):  # three data regions, one over a chunk long
            f.seek(offset)
            f.write(os.urandom(CHUNK + 4096 if offset == 5 << 20 else 3000))
    digest = hashlib.sha256(memory.read_bytes()).hexdigest()
    state = {"memory": {"sha256": digest}, "config": {"rootfs": str(rootfs), "disks": []}}
    (d / STATE_FILE).write_bytes(encode(state))
    (d / "template.json").write_text(json.dumps({"name": name}))
    (d / "verified.json").write_text("[]")  # a per-host cache: never sent
    return d


def _serve(src: Path, corrupt_at: int | None = None, short: bool = False) -> transfer.Fetch:
    def fetch(reqs: list[tuple[str, int, int]]) -> Iterator[bytes]:
        for i, (name, offset, length) in enumerate(reqs):
            data = read_chunk(src, name, offset, length)
            if i == corrupt_at:
                data = bytes([data[0] ^ 1]) + data[1:]  # one flipped bit
            if short and i == len(reqs) - 1:
                data = data[:-1]
            yield data

    return fetch


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path, Path]:
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"img")
    src = _template(tmp_path / "a", "sci", rootfs)
    return src, tmp_path / "b", rootfs


def test_copy_is_identical_sparse_and_usable(
    stores: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest_root, _ = stores
    m = manifest(src)
    assert sorted(f.name for f in m.files) == [MEMORY_FILE, STATE_FILE, "template.json"]
    mem = next(f for f in m.files if f.name == MEMORY_FILE)
    assert mem.size == MEM and len(mem.extents) >= 3  # holes are not sent
    assert m.data_bytes < MEM // 4
    got = receive(dest_root, m, _serve(src))
    assert got == dest_root / "sci"
    for name in (MEMORY_FILE, STATE_FILE, "template.json"):
        assert (got / name).read_bytes() == (src / name).read_bytes()
    assert os.stat(got / MEMORY_FILE).st_blocks * 512 < MEM // 2  # still sparse
    assert manifest(got).digest == m.digest
    monkeypatch.setenv("EMBER_TEMPLATES_DIR", str(dest_root))
    assert find("sci").dir == got  # a restore finds it (and its checksum passes)
    assert [p.name for p in (dest_root / transfer.INCOMING).iterdir()] == []


@pytest.mark.parametrize("damage", ["flipped", "short", "missing"])
def test_damaged_copy_leaves_nothing(stores: tuple[Path, Path, Path], damage: str) -> None:
    src, dest_root, _ = stores
    m = manifest(src)
    if damage == "flipped":
        fetch = _serve(src, corrupt_at=2)
    elif damage == "short":
        fetch = _serve(src, short=True)
    else:

        def fetch(reqs: list[tuple[str, int, int]]) -> Iterator[bytes]:
            yield from list(_serve(src)(reqs))[:-1]  # the peer died before the last chunk

    with pytest.raises(TransferError):
        receive(dest_root, m, fetch)
    assert not (dest_root / "sci").exists()
    assert list((dest_root / transfer.INCOMING).iterdir()) == []


def test_lying_manifest_is_refused(stores: tuple[Path, Path, Path]) -> None:
    src, dest_root, _ = stores
    m = manifest(src)
    wrong = transfer.Manifest(m.template, tuple(
        transfer.FileEntry(f.name, f.size, "0" * 64 if f.name == MEMORY_FILE else f.sha256,
                           f.extents) for f in m.files))  # fmt: skip
    with pytest.raises(TransferError, match="expected"):
        receive(dest_root, wrong, _serve(src))
    assert not (dest_root / "sci").exists()
    for bad in ("../x", ".hidden", "a/b"):
        with pytest.raises(TransferError):
            receive(dest_root, transfer.Manifest(bad, m.files), _serve(src))
        with pytest.raises(TransferError):
            read_chunk(src, bad, 0, 10)
    with pytest.raises(TransferError):
        read_chunk(src, STATE_FILE, 0, CHUNK + 1)


def test_missing_image_is_refused(stores: tuple[Path, Path, Path]) -> None:
    src, dest_root, rootfs = stores
    m = manifest(src)
    rootfs.unlink()
    with pytest.raises(TransferError, match="lacks"):
        receive(dest_root, m, _serve(src))
    assert not (dest_root / "sci").exists()


def test_manifest_digest_is_content(stores: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, _, rootfs = stores
    other = _template(tmp_path / "c", "sci", rootfs)
    assert manifest(src).digest == manifest(src).digest
    assert manifest(src).digest != manifest(other).digest  # other memory bytes
