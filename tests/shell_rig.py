"""``ember shell`` on a pseudo-terminal of this host, as a person at a terminal would run it.

The test holds the master side (the "keyboard and screen"); ``ember shell`` gets the
slave as stdin, stdout and stderr. Shared by the unit tests (a daemon route on the real
agent) and the integration tests (a real daemon and VM).
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@dataclass
class HostTerminal:
    """``argv`` (an ``ember shell`` command line) running on a fresh host terminal."""

    argv: Sequence[str]
    env: dict[str, str]
    rows: int = 30
    cols: int = 100
    seen: bytes = b""
    master: int = field(init=False)
    slave: int = field(init=False)
    proc: subprocess.Popen[bytes] = field(init=False)
    mode: list[object] = field(init=False)  # the slave's mode before: it must come back

    def __post_init__(self) -> None:
        self.master, self.slave = os.openpty()
        set_size(self.slave, self.rows, self.cols)
        self.mode = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            list(self.argv), stdin=self.slave, stdout=self.slave, stderr=self.slave,
            env=self.env, start_new_session=True,
        )  # fmt: skip

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_until(self, needle: bytes, timeout: float = 120.0) -> bytes:
        """What the screen showed since the last match, up to and including ``needle``."""
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never showed: {self.seen[-400:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # EIO: nothing holds the slave any more
                    assert self.proc.poll() is not None
                    raise AssertionError(f"{needle!r} never showed: {self.seen[-400:]!r}") from None
        end = self.seen.index(needle) + len(needle)
        shown, self.seen = self.seen[:end], self.seen[end:]
        return shown

    def resize(self, rows: int, cols: int, timeout: float = 120.0) -> None:
        """Resize the window (SIGWINCH to ``ember shell``) until ``stty size`` says so."""
        set_size(self.master, rows, cols)
        self.proc.send_signal(signal.SIGWINCH)
        deadline = time.monotonic() + timeout
        want = f"{rows} {cols}".encode()
        while True:  # the signal and the keys race: ask until the new size shows
            self.type(b"stty size\r")
            try:
                self.read_until(want, timeout=min(5.0, max(deadline - time.monotonic(), 0.1)))
                return
            except AssertionError:
                assert time.monotonic() < deadline, f"the size never became {want!r}"

    def finish(self, timeout: float = 120.0) -> int:
        """The exit status; the terminal's mode is checked to be as it was."""
        try:
            status = self.proc.wait(timeout)
            assert termios.tcgetattr(self.slave) == self.mode, "the terminal was left raw"
            return status
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)
            os.close(self.slave)
