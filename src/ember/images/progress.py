"""Progress reporting for long image builds.

A kernel build takes minutes; silence for that long looks like a hang.  Every
step prints its name and, when done, how long it took, prefixed with the time
since the build started.  While a command runs, a status line says what it is
doing: on a terminal it is one line rewritten in place, in a CI log (stderr is
not a TTY) it becomes a plain line every ``interval`` seconds, so logs stay
short but still show the build is alive.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Final, TextIO

# Kbuild's quiet output: "  CC      kernel/fork.o", "  LD      vmlinux.o", ...
_OBJECT_LINE: Final = re.compile(r"^\s+(CC|LD)\s+(?:\[M\]\s+)?(\S+)")


class Progress:
    """Writes step and status lines to ``stream`` (stderr by default)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        interval: float = 30.0,
        quiet: bool = False,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.quiet = quiet
        self._start = time.monotonic()
        self._status_shown = False
        self._last_periodic = self._start
        self._last_tty = 0.0

    def elapsed(self) -> float:
        """Seconds since this reporter was created (the build's start)."""
        return time.monotonic() - self._start

    def _stamp(self, message: str) -> str:
        return f"[{self.elapsed():6.1f}s] {message}"

    def note(self, message: str) -> None:
        """A permanent line (clears a pending status line first)."""
        if self.quiet:
            return
        self.clear_status()
        print(self._stamp(message), file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Announce ``name``, run the block, then report its duration (or its failure)."""
        self.note(f"{name} ...")
        began = time.monotonic()
        self._last_periodic = began
        try:
            yield
        except BaseException:
            self.note(f"{name}: failed after {time.monotonic() - began:.1f}s")
            raise
        self.note(f"{name}: done in {time.monotonic() - began:.1f}s")

    def status(self, message: str, *, force: bool = False) -> None:
        """A transient line: rewritten in place on a TTY, else printed every ``interval`` s."""
        if self.quiet:
            return
        if self.tty:
            now = time.monotonic()
            if not force and now - self._last_tty < 0.1:  # a redraw per make line is wasteful
                return
            self._last_tty = now
            width = max(20, shutil.get_terminal_size().columns - 1)
            line = self._stamp(message)[:width]
            self.stream.write(f"\r\x1b[K{line}")
            self.stream.flush()
            self._status_shown = True
            return
        now = time.monotonic()
        if force or now - self._last_periodic >= self.interval:
            self._last_periodic = now
            print(self._stamp(message), file=self.stream, flush=True)

    def clear_status(self) -> None:
        """Erase the in-place status line so the next permanent line starts clean."""
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._status_shown = False


class ObjectCounter:
    """Counts compiled objects in Kbuild output, for the status line during ``make``.

    The total is unknown in advance (it depends on the config), so the line
    shows a running count and the object being built, not a percentage.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self.current = ""

    def feed(self, line: str) -> bool:
        """Take one output line; True when it was a ``CC``/``LD`` line."""
        match = _OBJECT_LINE.match(line)
        if match is None:
            return False
        self.count += 1
        self.current = f"{match.group(1)} {match.group(2)}"
        return True

    def message(self) -> str:
        """The status line text, e.g. ``kernel: make: 812 objects (CC fs/open.o)``."""
        suffix = f" ({self.current})" if self.current else ""
        return f"{self.label}: {self.count} objects compiled{suffix}"
