"""Input keys, made again only when a file they were made from has changed.

Every ``Sandbox()`` restored on demand looks up the default template, whose name holds the
keys of the kernel, the initramfs and the root file system built from the current inputs:
~70 source files read and hashed, ~3 ms of a ~30 ms restore (``bench/restore.py``). In one
process those files rarely change, so a key is kept beside the ``stat`` of every file and
directory it was made from, and reused while all of them match. An edit changes its file's
mtime and ctime, and an added, removed or renamed file changes its directory's, so a
long-lived process (``ember serve``, a notebook) still sees a source file edited under it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ember.stamps import Stamp, stamp

_KEYS: dict[tuple[str, ...], tuple[tuple[Stamp | None, ...], str]] = {}
_TREES: dict[tuple[tuple[str, ...], str], tuple[list[tuple[str, Stamp | None]], list[str]]] = {}
_LOCK = threading.Lock()


def tree(roots: Iterable[Path], suffix: str) -> list[str]:
    """``roots`` and, under those that are directories, every directory and every file
    ending in ``suffix`` (``__pycache__`` left out: the interpreter writes there). Plain
    strings: pathlib's objects would cost more than the stat calls they name.

    The listing is kept, and walked again only when one of its directories' stamps has
    changed (an entry added, removed or renamed there): the walk was most of a key's cost.
    """
    names = tuple(map(str, roots))
    with _LOCK:
        kept = _TREES.get((names, suffix))
    if kept is not None and all(stamp(d) == s for d, s in kept[0]):
        return list(kept[1])
    found: list[str] = []
    directories: list[tuple[str, Stamp | None]] = []
    join = os.path.join
    for root in names:
        found.append(root)
        for directory, subdirs, files in os.walk(root):
            directories.append((directory, stamp(directory)))  # before it is listed
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            found.extend(join(directory, d) for d in subdirs)
            found.extend(join(directory, f) for f in sorted(files) if f.endswith(suffix))
        if not os.path.isdir(root):
            directories.append((root, stamp(root)))  # a root made a directory later
    with _LOCK:
        _TREES[(names, suffix)] = (directories, found)
    return list(found)


def key(tag: tuple[str, ...], watched: Sequence[str | Path] | None, make: Callable[[], str]) -> str:
    """``make()``, or what it returned last time for ``tag`` if no file in ``watched`` has
    changed since (None: the inputs are not plain files; always ``make()``). The files are
    looked at before ``make`` reads them: a change while it runs is seen on the next call.
    An exception from ``make`` is not remembered."""
    if watched is None:
        return make()
    now = tuple(stamp(path) for path in watched)
    with _LOCK:
        kept = _KEYS.get(tag)
    if kept is not None and kept[0] == now:
        return kept[1]
    made = make()
    with _LOCK:
        _KEYS[tag] = (now, made)
    return made
