"""One sandbox as the daemon holds it, and the arguments of the requests that make one.

An :class:`Entry` is what :class:`~ember.serve.manager.Manager` keeps per id: the
:class:`~ember.serve.state.Record` on disk, the in-process sandbox (None while paused
or once crashed), its :class:`State`, and its activity, which the idle reaper reads.
:class:`CreateArgs` and :class:`ForkArgs` are ``create`` and ``fork`` requests as the
manager takes them, whichever front end (HTTP, MCP) made them.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.errors import SandboxError
from ember.spec import DEFAULT_MEM_MIB

if TYPE_CHECKING:
    from ember.sandbox import Sandbox
    from ember.serve.state import Record

__all__ = ["CreateArgs", "Entry", "ForkArgs", "NotFound", "Paused", "State", "SteadyClock"]


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    CRASHED = "crashed"


class NotFound(LookupError):
    """No sandbox by that id."""


class Paused(SandboxError):
    """The sandbox is paused: resume it first."""


@dataclass
class Entry:
    record: Record
    sandbox: Sandbox | None
    state: State = State.RUNNING
    error: str | None = None
    console: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The last API call's start or end, on the monotonic clock (never stored: a restarted
    #: daemon counts idleness from its start).
    last_active: float = field(default_factory=time.monotonic)
    streams: int = 0  # streams open on it (exec, terminals, watches): never idle then

    def json(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": r.id, "state": self.state.value, "template": r.template,
            "created_at": r.created_at, "expires_at": r.expires_at, "metadata": r.metadata,
            "mem_mib": r.spec.get("mem_mib"), "vcpus": r.spec.get("vcpus"), "error": self.error,
            "idle_timeout": r.idle_timeout, "on_timeout": r.on_timeout,
            "address": self._address(),
        }  # fmt: skip

    def _address(self) -> str | None:
        vmm = self.sandbox._vmm if self.sandbox is not None else None
        return vmm.network.address if vmm is not None and vmm.network is not None else None

    def idle_for(self, now: float) -> float:
        """Seconds since its last API call (``now`` from ``time.monotonic``), 0 while a
        stream is open."""
        return 0.0 if self.streams else now - self.last_active


class SteadyClock:
    """Wall-clock seconds that never step: the daemon's start, plus monotonic time since.

    Deadlines are stored as wall-clock times, because a restarted daemon must read them;
    but an NTP step or a ``date -s`` on the host while the daemon runs must not kill every
    sandbox at once (a step forward), nor keep them past their time (a step back). So the
    daemon computes and compares its deadlines on this clock, which a step does not move.
    A restarted daemon takes the wall clock again."""

    def __init__(self) -> None:
        self._offset = time.time() - time.monotonic()

    def now(self) -> float:
        return time.monotonic() + self._offset


@dataclass(frozen=True)
class CreateArgs:
    template: str | None = None
    mem_mib: int = DEFAULT_MEM_MIB
    vcpus: int = 1
    cpus: float | None = None
    memory_mib: int | None = None
    pids: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    idle_timeout: float | None = None
    on_timeout: str = "kill"
    network: Any = None  # None, True, or NetworkPolicy.to_json()'s form


@dataclass(frozen=True)
class ForkArgs:
    metadata: dict[str, str] | None = None  # None: the parent's
    timeout: float | None = None  # seconds from now; None: no timeout
    keep_timeout: bool = True  # no timeout given: the parent's deadline
