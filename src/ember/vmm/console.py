"""Where the guest's serial output goes: a stream, a bounded tail, and line watchers.

The tail is what a crash report shows; the watchers let the VMM notice a
kernel panic (the guest then reboots because of ``panic=-1``, which must not
be mistaken for a clean reboot).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

PANIC_PREFIX = b"Kernel panic - not syncing"
# kernel_restart() prints this with the command ember-init passes to reboot(2).
EXIT_STATUS = re.compile(rb"reboot: Restarting system with command 'ember-exit=(\d{1,3})'")
# That line is plumbing, not the workload's output: it is held back and not shown.
_EXIT_LINE_PREFIX = b"reboot: Restarting system with command 'ember-exit="
TAIL_BYTES = 16 * 1024
MAX_LINE = 4096


_TIMESTAMP = re.compile(rb"\[[ 0-9.]*(\] ?)?")


def _could_be_exit_line(start: bytes) -> bool:
    """Whether ``start`` may still grow into the exit-status line (printk time prefix allowed)."""
    stamp = _TIMESTAMP.match(start)
    if stamp is not None:
        if stamp.end() == len(start) and not stamp.group(1):
            return True  # still inside "[   12.345"
        start = start[stamp.end() :]
    return _EXIT_LINE_PREFIX.startswith(start[: len(_EXIT_LINE_PREFIX)])


class ConsoleSink:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._line = bytearray()
        self._held = bytearray()  # the start of a line that may be the exit-status line
        self._lock = threading.Lock()
        self.watchers: list[Callable[[bytes], None]] = []
        self.panic_line: bytes | None = None
        self.exit_status: int | None = None

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self._stream is not None:
                self._show(data)
            self._remember(data)
            for byte in data:
                if byte == 0x0A:
                    self._end_line()
                elif len(self._line) < MAX_LINE:
                    self._line.append(byte)

    def _show(self, data: bytes) -> None:
        assert self._stream is not None
        for byte in data:
            held = self._held
            held.append(byte)
            if byte == 0x0A:
                if not EXIT_STATUS.search(bytes(held)):
                    self._stream.write(bytes(held))
                self._stream.flush()
                held.clear()
            elif not _could_be_exit_line(bytes(held)):
                self._stream.write(bytes(held))
                held.clear()

    def _remember(self, data: bytes) -> None:
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size > TAIL_BYTES and len(self._tail) > 1:
            self._tail_size -= len(self._tail.popleft())

    def _end_line(self) -> None:
        line = bytes(self._line).rstrip(b"\r")
        self._line.clear()
        if self.panic_line is None and PANIC_PREFIX in line:
            self.panic_line = line[line.index(PANIC_PREFIX) :]
        match = EXIT_STATUS.search(line)
        if match:
            self.exit_status = int(match.group(1))
        for watcher in self.watchers:
            watcher(line)

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                if self._held and not EXIT_STATUS.search(bytes(self._held)):
                    self._stream.write(bytes(self._held))
                self._held.clear()
                self._stream.flush()

    def tail(self, lines: int = 20) -> str:
        with self._lock:
            text = b"".join(self._tail).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])
