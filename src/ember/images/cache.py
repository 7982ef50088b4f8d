"""Where built guest artifacts live, and how their cache keys are made.

Layout under the cache root (``$EMBER_CACHE_DIR``, else ``~/.cache/ember``)::

    kernel/<key>/vmlinux, bzImage, config, release, inputs.txt, build.log
    initrd/<key>/initrd.cpio
    build/<temporary build dirs>, <key>.log of a failed build, <key>.lock

A key is the sha256 of everything that decides an artifact's bytes, so a
changed input builds a new directory next to the old one instead of silently
reusing stale output.  Artifacts are installed by renaming a complete
``<key>.tmp`` directory into place: a reader sees either nothing or everything,
even if a build is interrupted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CACHE_ENV = "EMBER_CACHE_DIR"


def cache_root() -> Path:
    """The cache root, absolute; not created here (a lookup must not write)."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path.home() / ".cache" / "ember"
    return root.expanduser().absolute()


def artifact_dir(kind: str, key: str) -> Path:
    """Final directory of one artifact: ``<root>/<kind>/<key>``."""
    return cache_root() / kind / key


def build_root() -> Path:
    """Scratch space for builds, on the cache's file system so installs are renames."""
    return cache_root() / "build"


class KeyHasher:
    """sha256 over a sequence of labelled, length-prefixed fields.

    Length prefixes keep field boundaries unambiguous: ``("ab", "c")`` and
    ``("a", "bc")`` must not hash alike.
    """

    def __init__(self, purpose: str) -> None:
        self._hash = hashlib.sha256()
        self.add("purpose", purpose.encode())

    def add(self, label: str, value: bytes | str | int) -> None:
        """Mix in one field; ``label`` documents it and is hashed with it."""
        if isinstance(value, int):
            value = str(value)
        data = value.encode() if isinstance(value, str) else value
        for part in (label.encode(), data):
            self._hash.update(len(part).to_bytes(8, "little"))
            self._hash.update(part)

    def hexdigest(self) -> str:
        """The key: 64 lowercase hex digits."""
        return self._hash.hexdigest()


@contextlib.contextmanager
def build_lock(key: str) -> Iterator[None]:
    """Serialise builds of one key across processes (a second build waits, then hits the cache)."""
    root = build_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def staging_dir(final: Path) -> Path:
    """A fresh, empty ``<final>.tmp`` directory to assemble an artifact in."""
    staging = final.with_name(final.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted build of the same key
    staging.mkdir(parents=True)
    return staging


def install(staging: Path, final: Path) -> None:
    """Atomically move a complete staging directory to ``final``, replacing any old one.

    ``rename`` cannot replace a non-empty directory, so an existing ``final``
    (a ``--force`` rebuild) is first renamed aside, then deleted.
    """
    for path in staging.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old: Path | None = None
    if final.exists():
        old = final.with_name(f"{final.name}.old.{os.getpid()}")
        os.rename(final, old)
    os.rename(staging, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_tree(root: Path, *, workers: int = 16) -> None:
    """Delete a large directory tree (a ~1.5 GB kernel build tree: ~85,000 files).

    Unlinking is bound by file-system latency rather than CPU (ext4 mounted
    with ``discard`` here: one ``rm -rf`` of a kernel tree took minutes while
    another build was writing).  Deleting the subtrees two levels down from
    several threads overlaps that latency; ``os.unlink`` releases the GIL.
    Errors are ignored: this is scratch space, and a leftover is harmless.
    """
    if not root.is_dir() or root.is_symlink():
        return
    jobs: list[Path] = []
    with contextlib.suppress(OSError):
        for top in root.iterdir():
            if top.is_dir() and not top.is_symlink():
                jobs.extend(top.iterdir())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path in jobs:
            pool.submit(_remove, path)
    shutil.rmtree(root, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
