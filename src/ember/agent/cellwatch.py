"""The pool's view of ``run_code`` cells served over the code ring, which the agent never sees.

Why: the pool refills (a fork of the mother, its warm-up, freeing old programs' memory) only
while the sandbox is idle, and learns of requests from the agent's server
(:meth:`ember.agent.pool.InterpreterPool.busy`). A cell the worker serves from the code ring
(:mod:`ember.agent.codering`) reaches neither: a refill forked 0.2 s after an exec ran beside
the cells that followed and slowed them ~1.5-2x here (p50 of 8 s of 0.1 s-apart cells: 32-47
-> 59-70 ms), nice 19 or not, since its faults and fork are emulated guest-kernel work.

How: the worker counts each ring request twice, as it begins and as it ends
(``ring.CODE_CELLS``, a store to the region, no system call), so the word is odd while one
runs; when a worker dies the agent closes its cell. The pool's thread reads it (one load)
each time it would start work and while a start runs, and only then: with no work waiting it
does not look at all. Runs in the guest: standard library only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CellWatch", "cells_after"]


def cells_after(cells: int, *, ends: bool) -> int:
    """``CODE_CELLS`` once a cell begins (odd) or ends (even): always a new value. The worker
    continues from the word itself, so a replacement, or the agent closing a dead worker's
    cell (``DeathNotice.publish``), never repeats a value the pool last saw."""
    return ((cells | 1) + 1 if ends else cells + 1 | 1) % (1 << 62)


class CellWatch:
    """Whether ring cells ran since the last look (:meth:`ran`)."""

    def __init__(self) -> None:
        self._read: Callable[[], int] | None = None
        self._seen = 0
        self.lately = False  # the last look found cells: the pool waits a whole idle time

    def watch(self, read: Callable[[], int]) -> None:
        """Follow the word ``read`` loads (``DeathNotice.read_cells``)."""
        self._read = read
        self._seen = self._peek()

    def _peek(self) -> int:
        if self._read is None:
            return 0
        try:
            return self._read()
        except (OSError, ValueError):  # the region went away: no more ring cells
            self._read = None
            return 0

    def ran(self) -> bool:
        """A cell runs now, or one began or ended since the last look."""
        cells = self._peek()
        self.lately = cells != self._seen or cells % 2 == 1
        self._seen = cells
        return self.lately
