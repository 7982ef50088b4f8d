"""Which ``python3`` a command line names, as ``execvpe`` and python3's start-up would decide.

The interpreter pool (:mod:`ember.agent.pool`) may take a Python ``exec`` only when the
program would get the very interpreter the pool started (same file, same ``sys.prefix``, no
virtual environment, no user site directory it lacks). Finding that out is path lookups,
each ~1-3 ms of emulated guest kernel here, on every exec; the answers are kept
(:class:`ember.agent.fscache.FsCache`) until a directory they looked at changes.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
import stat

from ember.agent.fscache import FsCache

__all__ = ["PythonFinder", "find_python"]


def find_python(path_env: str) -> str | None:
    """The first executable ``python3`` on ``path_env`` (the pool's own interpreter)."""
    for directory in path_env.split(os.pathsep):
        candidate = os.path.join(directory or ".", "python3")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


class PythonFinder:
    """The pool's interpreter, and whether a command line names it; thread-safe."""

    def __init__(self, path_env: str) -> None:
        self.python = find_python(path_env)
        self._python_real = os.path.realpath(self.python) if self.python else ""
        info = _stat(self.python) if self.python else None
        self._python_id = (info.st_dev, info.st_ino) if info else (-1, -1)
        self._fs = FsCache()

    @property
    def lookups(self) -> int:
        """Answers computed rather than kept (tests and diagnosis)."""
        return self._fs.computed

    def interpreter(self, argv0: str, env: dict[str, str], cwd: str | None) -> str | None:
        """What ``sys.executable`` would be if ``argv0`` names the pool's python3, else None.

        As ``execvpe`` searches ``PATH`` and python3's getpath names the result: one ``stat``
        per ``PATH`` entry tried, whose inode is compared with the pool's interpreter; a
        name other than the one the pool was started as (``python3.11``, a symlink
        elsewhere) costs a ``realpath`` too. A virtual environment (``pyvenv.cfg`` beside
        the program or one level up) has another ``sys.prefix``: a real process runs it.
        """
        if "/" not in argv0 and not argv0.startswith("python"):
            return None  # the common case, decided without a system call
        path_var = env.get("PATH", "")
        if "/" in argv0:
            dirs = [os.path.dirname(argv0) or "."]
        else:
            dirs = [d or "." for d in path_var.split(os.pathsep)]
        relative = any(not d.startswith("/") for d in dirs)
        base = (cwd or os.getcwd()) if relative else ""
        absolute = [os.path.join(base, d) for d in dirs]
        key = ("interpreter", argv0, path_var, base)
        return self._fs.get(key, absolute, lambda: self._find(argv0, absolute))

    def is_dir(self, path: str) -> bool:
        """``os.path.isdir(path)``, kept (a user site directory is asked about every exec)."""
        return self._fs.get(("is_dir", path), [path], lambda: (os.path.isdir(path), True))

    def _find(self, argv0: str, dirs: list[str]) -> tuple[str | None, bool]:
        """The interpreter's path, and whether that answer may be kept: not when it rests on
        a symbolic link that may lead through directories nobody watches."""
        name = os.path.basename(argv0) if "/" in argv0 else argv0
        candidate, info = "", None
        for directory in dirs:
            path = os.path.join(directory, name)
            found = _stat(path)
            if "/" in argv0:
                candidate, info = path, found
                break
            if found is not None and stat.S_ISREG(found.st_mode) and found.st_mode & 0o111:
                candidate, info = path, found
                break
        if info is None or (info.st_dev, info.st_ino) != self._python_id:
            return None, True
        keep = candidate == self.python
        if not keep and os.path.realpath(candidate) != self._python_real:
            return None, False  # the same file under another directory: another prefix
        here = os.path.dirname(candidate)
        for directory in (here, os.path.dirname(here)):
            if _stat(os.path.join(directory, "pyvenv.cfg")) is not None:
                return None, keep
        return candidate, keep
