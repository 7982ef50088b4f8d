"""Copying a template from one node's store to another's: content-hashed, verified, atomic.

No Ray here (the node agent moves the chunks; :mod:`.node`), so the rules are unit-tested
on plain directories:

* **The manifest names the content.**  A template is its files (``state``, ``memory``,
  ``template.json``; ``verified.json`` is a per-host cache and stays behind), each with
  its size, its SHA-256 and where its data lie.  The memory file's digest is the one its
  ``state`` records (the snapshot's own checksum), so the sender never hashes hundreds of
  MiB; the small files are hashed as they are.  :attr:`Manifest.digest`, a hash over the
  names, sizes and digests, is the template's content hash.
* **Only data travels.**  A template's memory file is mostly holes (512 MiB, ~120 MiB of
  data here): the sender lists its data extents (``SEEK_DATA``/``SEEK_HOLE``) and the
  receiver writes them into a file of the right size, which stays sparse.
* **Nothing is usable until verified.**  The receiver assembles the copy in
  ``.incoming/<name>`` in the store (a name no restore can ask for), hashes every file
  as written on its disk against the manifest, decodes the state (its own checksum),
  checks the memory against it (:func:`ember.templates.verify`) and that this node has
  the images it restores onto, and only then renames the directory into place.  A
  short chunk, a flipped bit, a dead peer or any exception removes the staging directory:
  a restore can never find half a template.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import SnapshotError
from ember.images.cache import build_lock, install
from ember.snapshot import MEMORY_FILE, STATE_FILE
from ember.snapshot.format import read_state
from ember.snapshot.memory_file import memory_digest
from ember.templates import VERIFIED_FILE, verify

CHUNK = 8 << 20  # bytes per read: a few in flight stay well inside Ray's object store
MAX_FILES = 16  # a template has 7 (state, memory, template.json, hugepages.json, 3 prefault-*.json)
INCOMING = ".incoming"  # copies under way, in the store (renames are atomic on one fs)
Extent = tuple[int, int]  # (offset, length)


class TransferError(SnapshotError):
    """A copy that does not match its manifest (or a manifest that is not a template's)."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    extents: tuple[Extent, ...]  # where its data are; the rest is holes (zeros)


@dataclass(frozen=True)
class Manifest:
    template: str  # the directory name in the store (``sci``, ``default-<key>``)
    files: tuple[FileEntry, ...]

    @property
    def digest(self) -> str:
        """The template's content hash: names, sizes and file digests (not the extents, so a
        sparse and a dense copy of the same bytes are the same template)."""
        listing = [[f.name, f.size, f.sha256] for f in sorted(self.files, key=lambda f: f.name)]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def data_bytes(self) -> int:
        return sum(length for f in self.files for _, length in f.extents)


def data_extents(path: Path) -> tuple[Extent, ...]:
    """The data regions of ``path`` (one region, the whole file, where the file system
    cannot tell holes)."""
    size = path.stat().st_size
    found: list[Extent] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                return ((0, size),) if size else ()
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, end - start))
            offset = end
    return tuple(found)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(directory: Path) -> Manifest:
    """What a template in ``directory`` is made of (see the module docstring)."""
    if not (directory / STATE_FILE).is_file():
        raise TransferError(f"{directory} is not a template (no {STATE_FILE})")
    recorded = read_state(directory / STATE_FILE).get("memory", {}).get("sha256")
    files = []
    for path in sorted(directory.iterdir()):
        if path.name == VERIFIED_FILE or not path.is_file():
            continue
        if path.name == MEMORY_FILE and isinstance(recorded, str):
            digest = recorded
        elif path.name == MEMORY_FILE:
            digest = memory_digest(path)
        else:
            digest = _sha256(path)
        files.append(FileEntry(path.name, path.stat().st_size, digest, data_extents(path)))
    return Manifest(directory.name, tuple(files))


def read_chunk(directory: Path, file: str, offset: int, length: int) -> bytes:
    """``length`` bytes of one of the template's files (what a peer serves)."""
    if not 0 < length <= CHUNK or offset < 0:
        raise TransferError(f"chunk of {length} bytes at {offset}: out of bounds")
    path = directory / _plain(file)
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def requests(m: Manifest) -> Iterator[tuple[str, int, int]]:
    """The reads a copy makes, in order: (file, offset, length), at most :data:`CHUNK`."""
    for entry in m.files:
        for start, length in entry.extents:
            for offset in range(start, start + length, CHUNK):
                yield entry.name, offset, min(CHUNK, start + length - offset)


Fetch = Callable[[list[tuple[str, int, int]]], Iterator[bytes]]


def receive(root: Path, m: Manifest, fetch: Fetch) -> Path:
    """Copy the template ``m`` describes into the store ``root``: ``fetch(requests)``
    yields each request's bytes in order.  Returns the installed directory; raises
    :class:`TransferError` (and leaves nothing) if the copy does not match."""
    _check(m)
    final = root / m.template
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(f"template-{final.name}"):
        if (final / STATE_FILE).is_file():  # a build or another copy got here first
            return final
        staging = root / INCOMING / m.template  # not a name a restore can ask for
        _remove(staging)  # left by a copy that was killed
        staging.mkdir(parents=True)
        try:
            _write(staging, m, fetch)
            for entry in m.files:
                path = staging / entry.name
                got = memory_digest(path)  # the bytes on this disk, holes included
                if path.stat().st_size != entry.size or got != entry.sha256:
                    raise TransferError(
                        f"template {m.template}: {entry.name} arrived with sha256 {got[:16]}…, "
                        f"expected {entry.sha256[:16]}…: the copy is discarded"
                    )
            verify(staging)  # the state's own checksum, the memory against it
            _check_disks(staging, m.template)
            install(staging, final)
        except BaseException:
            _remove(staging)
            raise
    return final


def _write(staging: Path, m: Manifest, fetch: Fetch) -> None:
    handles = {}
    try:
        for entry in m.files:
            f = open(staging / entry.name, "wb")  # noqa: SIM115 (closed below, all at once)
            handles[entry.name] = f
            f.truncate(entry.size)
        wanted = list(requests(m))
        got = 0
        for (name, offset, length), data in zip(wanted, fetch(wanted), strict=False):
            if len(data) != length:
                raise TransferError(
                    f"template {m.template}: {name} at {offset}: {len(data)} bytes, "
                    f"asked for {length}"
                )
            os.pwrite(handles[name].fileno(), data, offset)
            got += 1
        if got != len(wanted):
            raise TransferError(f"template {m.template}: {got} of {len(wanted)} chunks came")
    finally:
        for f in handles.values():
            f.close()


def _check_disks(directory: Path, name: str) -> None:
    """A template restores onto the image files its state names (by absolute path, in the
    image cache, keyed by their inputs): a node without them could not use the copy."""
    config = read_state(directory / STATE_FILE).get("config", {})
    disks = [config.get("rootfs"), *(config.get("disks") or [])]
    missing = [d for d in disks if isinstance(d, str) and not Path(d).is_file()]
    if missing:
        raise TransferError(
            f"template {name} restores onto {', '.join(missing)}, which this node lacks: "
            "build the image here first (ember image build, or ember template build with the "
            "same packages)"
        )


def _check(m: Manifest) -> None:
    """A peer's manifest is input: plain names, the files a template has, sane extents."""
    _plain(m.template)
    names = [f.name for f in m.files]
    if len(names) > MAX_FILES or len(set(names)) != len(names) or STATE_FILE not in names:
        raise TransferError(f"template {m.template}: not a template's files: {names}")
    for f in m.files:
        _plain(f.name)
        end = 0
        for offset, length in f.extents:
            if offset < end or length <= 0 or offset + length > f.size:
                raise TransferError(f"template {m.template}: {f.name}: extent {offset}+{length}")
            end = offset + length


def _plain(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith(".") or "\0" in name:
        raise TransferError(f"{name!r} is not a plain file name")
    return name


def _remove(staging: Path) -> None:
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
