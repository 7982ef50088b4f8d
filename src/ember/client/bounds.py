"""The host's own bounds on the agent: deadlines, output limits, the resume announcement.

An untrusted guest may simply fall silent (or hang with its kernel), so the host never
waits on it without a bound of its own (:class:`Deadline`): then the call raises
:class:`~ember.errors.SandboxTimeout`. Nothing here reads a clock: a deadline is a
moment on the clock its maker was given, and a transport compares it with the same one.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.errors import OutputTooLarge, SandboxTimeout

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_OUTPUT",
    "WORKER_START_ALLOWANCE",
    "CallBounds",
    "Clock",
    "Deadline",
    "ResumeAnnouncer",
    "check_max_output",
    "file_too_large",
    "output_too_large",
]

Clock = Callable[[], float]
"""Seconds on a monotonic clock (``time.monotonic``; a test's fake)."""

DEFAULT_GRACE = 30.0
"""Seconds the host waits beyond a call's own timeout: time for the agent to kill what
overran and say so, on a guest whose kernel may be emulated (slow) or just restored."""
DEFAULT_CALL_TIMEOUT = 120.0
"""The timeout of calls that have none of their own (ping, stat, list, remove; each frame of
a file transfer): they do bounded work, so a guest this late is hung, not busy."""
WORKER_START_ALLOWANCE = 300.0
"""``run_code`` may first have to (re)start the agent's Python worker: the agent allows that
this long (its ``STARTUP_TIMEOUT``) before the call's own timeout starts to run."""
DEFAULT_MAX_OUTPUT = 64 << 20
"""What ``exec()`` and ``files.read()`` hold in memory at most (the guest picks the size)."""
RESUME_ENTROPY_BYTES = 32
"""Host entropy handed to a restored or forked guest with its first request."""


class Deadline:
    """The moment ``at`` the host stops waiting for the agent, and what to say then.

    The agent enforces timeouts itself, but it runs in the guest, which is
    untrusted and may simply fall silent: without a bound of the host's own, a
    blocking call would then never return. A deadline bounds whole frames, not
    single ``recv`` calls, so a peer that drips one byte at a time cannot stretch it.
    """

    __slots__ = ("at", "how", "seconds", "what")

    def __init__(self, seconds: float, what: str, how: str = "", *, at: float) -> None:
        """``seconds`` is the budget (for the message); ``at`` when it runs out."""
        self.seconds = seconds
        self.what = what
        self.how = how
        self.at = at

    def remaining(self, now: float) -> float:
        return self.at - now

    def expired(self) -> SandboxTimeout:
        """The error to raise (the caller then drops the connection: it is out of step)."""
        how = f" ({self.how})" if self.how else ""
        return SandboxTimeout(
            f"{self.what} within {self.seconds:.3g} s{how}, so the host hung up: the guest may "
            "be hung or overloaded. Retry (with a longer timeout, if the call takes one), or "
            "close this sandbox and start a fresh one"
        )


class CallBounds:
    """A client's own bounds on the agent: ``grace`` beyond each call's timeout, and
    ``call_timeout`` for calls without one and for each frame of a transfer."""

    __slots__ = ("call_timeout", "clock", "grace")

    def __init__(self, grace: float, call_timeout: float, clock: Clock = time.monotonic) -> None:
        if not grace >= 0 or not call_timeout > 0:
            raise ValueError(f"need grace >= 0 and call_timeout > 0, got {grace}, {call_timeout}")
        self.grace = grace
        self.call_timeout = call_timeout
        self.clock = clock

    def _after(self, seconds: float, what: str, how: str = "") -> Deadline:
        return Deadline(seconds, what, how, at=self.clock() + seconds)

    def call(self, op: str, timeout: float | None, extra: float = 0.0) -> Deadline:
        """When the host gives up on ``op``: its timeout (or ``call_timeout``) + ``extra``
        (time the agent may take to start it) + ``grace``."""
        budget = self.call_timeout if timeout is None else timeout
        how = f"timeout {budget:g} s" + (f" + {extra:g} s to start" if extra else "")
        return self._after(budget + extra + self.grace, f"the agent did not finish {op!r}",
                           f"{how} + grace")  # fmt: skip

    def send(self) -> Deadline:
        """A request must leave within the bound even when the answer may take for ever."""
        return self._after(self.call_timeout + self.grace, "the agent did not take the request")

    def frame(self, path: str) -> Deadline:
        """A transfer may take any time, but each frame of it must move within the bound."""
        return self._after(
            self.call_timeout + self.grace, f"the transfer of {path} made no progress"
        )


def resume_announcement() -> dict[str, Any]:
    """The ``resume`` object of the first request to a restored or forked sandbox.

    Siblings restored from one template share its memory: its clock as of the snapshot, its
    kernel random state, the ``random`` state of its warm interpreters. The agent applies this
    before serving the request (``ember.agent.resume``): clock stepped to ours, these bytes fed
    to the kernel's CRNG, ``random`` reseeded. Stamped when the request is encoded, so the time
    is as fresh as it can be.
    """
    return {
        "realtime_ns": time.clock_gettime_ns(time.CLOCK_REALTIME),
        "entropy": base64.b64encode(os.urandom(RESUME_ENTROPY_BYTES)).decode("ascii"),
    }


class ResumeAnnouncer:
    """Stamps :func:`resume_announcement` on the first request only (any thread, any call)."""

    def __init__(self, armed: bool) -> None:
        self._armed = armed
        self._lock = threading.Lock()

    def stamp(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            armed, self._armed = self._armed, False
        return {**request, "resume": resume_announcement()} if armed else request


def check_max_output(max_output: int | None) -> int | None:
    """``max_output`` as given, checked early: a bad one should fail before the call runs."""
    if max_output is not None and (
        not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 0
    ):
        raise ValueError(f"max_output must be a number of bytes >= 0 or None, got {max_output!r}")
    return max_output


def output_too_large(limit: int) -> OutputTooLarge:
    """exec() got more than ``limit`` bytes: the caller hangs up, which kills the command."""
    return OutputTooLarge(
        f"the command wrote more than max_output={limit} bytes (stdout and stderr together) "
        "and was stopped; pass a larger max_output= (None: no limit), or use exec_stream() to "
        "handle output as it comes",
        limit,
    )


def file_too_large(path: str, limit: int) -> OutputTooLarge:
    """files.read() got more than ``limit`` bytes of ``path``: the caller hangs up."""
    return OutputTooLarge(
        f"{path} is larger than max_output={limit} bytes and was not read; use "
        "files.read_into() to stream it into a file, or pass a larger max_output= "
        "(None: no limit)",
        limit,
    )
