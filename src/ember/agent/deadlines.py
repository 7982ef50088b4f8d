"""One thread for every exec's deadline, started with the agent.

Why: an ``exec`` with a timeout used to start a ``threading.Timer``, a new thread each time.
In the guest a new thread is a ``clone``, a fresh stack whose first touches fault, and the
hand-overs of its start, its cancel and its end; measured here, an ``exec`` of
``python3 -c`` took ~95 ms longer with a timeout than without (~370 against ~275 ms), and
the MCP server and most agents always pass one. This thread is started when the agent
starts, so it is part of the template and every restored sandbox has it, already warm. The
relay hands it a deadline only when it may block past it (``ember.agent.relay._Run.arm``):
waking this thread costs a GIL hand-over between two of the agent's threads (~44k emulated
instructions), so an exec that finishes without blocking never wakes it.

How: a heap of (when, key) and a :class:`threading.Condition`. :meth:`Deadlines.add` wakes
the thread only when the new deadline is the earliest (the thread sleeps towards the
earliest one), :meth:`Deadlines.cancel` never wakes it: a cancelled entry is dropped when
its time comes or when it reaches the top of the heap. An idle agent's thread sleeps with
no timeout at all. An action runs on this thread with the lock released, so it must be
short (the relay's ``kill``: one ``killpg``); one that raises is logged, not fatal.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from ember.agent.common import log

__all__ = ["DEADLINES", "Deadlines"]


class Deadlines:
    """Actions to run at a time, all on one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._actions: dict[int, Callable[[], object]] = {}  # the live entries
        self._keys = itertools.count(1)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent): at the agent's start, so the template has it."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="ember-deadlines", daemon=True
                )
                self._thread.start()

    def add(self, seconds: float, action: Callable[[], object]) -> int:
        """Run ``action`` in ``seconds`` unless cancelled first; returns the key to cancel."""
        self.start()
        with self._cond:
            key = next(self._keys)
            when = self._clock() + max(0.0, seconds)
            self._actions[key] = action
            heapq.heappush(self._heap, (when, key))
            if self._heap[0][1] == key:  # earlier than what the thread sleeps towards
                self._cond.notify()
            return key

    def cancel(self, key: int) -> bool:
        """Forget ``key``'s action; False if it already ran (or is running)."""
        with self._cond:
            return self._actions.pop(key, None) is not None

    def pending(self) -> int:
        """Actions still to run (tests)."""
        with self._cond:
            return len(self._actions)

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._actions:
                    heapq.heappop(self._heap)  # cancelled
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                _, key = heapq.heappop(self._heap)
                action = self._actions.pop(key)
                self._cond.release()
                try:
                    action()
                except Exception as exc:
                    log(f"a deadline's action failed: {exc!r}")
                finally:
                    self._cond.acquire()


DEADLINES = Deadlines()  # the agent's; AgentServer starts its thread
