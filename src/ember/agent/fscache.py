"""Answers about the file system, kept until a directory they depend on changes (inotify).

Handing a Python ``exec`` to a pre-started interpreter first asks the file system what a real
``execvpe`` and python3 would find: which ``python3`` ``PATH`` names, whether a
``pyvenv.cfg`` sits beside it, whether the user's site directory exists. That is ~6 path
lookups, ~14 ms of emulated guest kernel here, on every exec, for answers that almost never
change. Each answer is kept with inotify watches on every directory on the paths it looked
at (each directory and all its ancestors, so a renamed or replaced parent counts too); any
event on any watch, an overflow included, drops every answer at once. Checking costs one
non-blocking ``read`` (~0.3 ms), not the lookups.

Watches are placed *before* an answer is computed, so a change racing the computation is
seen by the next check. Without inotify (no ``CONFIG_INOTIFY_USER``, the watch limit
reached) nothing is kept and every question is computed afresh, as before.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["FsCache", "ancestors"]

T = TypeVar("T")

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Children created, deleted, renamed or chmod-ed, and the directory itself removed or moved:
# all that can change which file a path names or what a stat of it says.
IN_ATTRIB = 0x004
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
MASK = (
    IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
    | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip
MAX_ANSWERS = 64  # different PATHs and homes seen; past this, start afresh


def ancestors(path: str) -> list[str]:
    """``path`` (made absolute and normalised) and each directory above it, up to ``/``."""
    path = os.path.normpath(os.path.abspath(path))
    found = [path]
    while path != "/":
        path = os.path.dirname(path)
        found.append(path)
    return found


class _Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._init = libc.inotify_init1
        self._init.argtypes = [ctypes.c_int]
        self._init.restype = ctypes.c_int
        self.fd = self._new_fd()

    def _new_fd(self) -> int:
        fd = int(self._init(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd

    def add(self, path: str) -> bool:
        """Watch a directory; False if there is none by that name (or not a directory)."""
        if self._add(self.fd, os.fsencode(path), MASK) >= 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return False
        raise OSError(err, os.strerror(err))

    def changed(self) -> bool:
        """Whether any event arrived since the last call (events are read and dropped)."""
        seen = False
        while True:
            try:
                if not os.read(self.fd, 1 << 14):
                    return seen
            except BlockingIOError:
                return seen
            seen = True

    def reset(self) -> None:
        """Forget every watch (a new instance) and any events still queued."""
        old, self.fd = self.fd, self._new_fd()
        os.close(old)


class FsCache:
    """Keyed answers, each valid while no watched directory has changed; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[object, object] = {}
        self._watched: set[str] = set()
        try:
            self._inotify: _Inotify | None = _Inotify()
        except (OSError, AttributeError):
            self._inotify = None
        self.computed = 0  # answers computed (tests and diagnosis read it)

    @property
    def works(self) -> bool:
        return self._inotify is not None

    def get(self, key: object, paths: Iterable[str], compute: Callable[[], tuple[T, bool]]) -> T:
        """The kept answer for ``key``, or the one ``compute()`` returns with whether it may
        be kept: only if it depends on nothing but what the directories on ``paths`` (each
        with its ancestors) contain."""
        with self._lock:
            return self._get(key, paths, compute)

    def _get(self, key: object, paths: Iterable[str], compute: Callable[[], tuple[T, bool]]) -> T:
        inotify = self._inotify
        if inotify is None:
            self.computed += 1
            return compute()[0]
        if inotify.changed() or len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
            self._watched.clear()
            inotify.reset()
        if key in self._answers:
            return self._answers[key]  # type: ignore[return-value]
        try:
            self._watch(inotify, paths)
            watched = True
        except OSError:  # out of watches: answer without keeping
            watched = False
        self.computed += 1
        value, keep = compute()
        if keep and watched:
            self._answers[key] = value
        return value

    def _watch(self, inotify: _Inotify, paths: Iterable[str]) -> None:
        for path in paths:
            for directory in ancestors(path):
                if directory not in self._watched:
                    inotify.add(directory)  # a missing one: its parent reports its creation
                    self._watched.add(directory)

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                os.close(self._inotify.fd)
                self._inotify = None
