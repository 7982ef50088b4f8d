"""``run_code`` over memory: the host's end of the code rings (``ember.agent.codering``).

A call writes its request into the request ring of the sandbox's shared region and
waits for the reply in the reply ring: no vsock packet, no guest-kernel wake-up while
the worker polls. When the worker sleeps, the request is written all the same and the
guest bell is rung (an interrupt that wakes the worker: ``ember.vmm.shm``), or, without one
(an older template or kernel) or when the worker has not woken :data:`BELL_GRACE_S` later,
the agent is asked over vsock to wake it (``code_ring`` ``wake``). A call past its timeout
asks the agent to interrupt the cell (``code_ring`` ``interrupt``: ``KeyboardInterrupt`` in
the cell, the worker and its namespace kept) and waits the agent's grace for the reply;
when the worker dies, or the cell is still running then, the agent is asked for the RESULT
a vsock call would have had (``code_ring`` ``stop``: it kills an overrunning worker first).
So a caller sees exactly the vsock path's results, ``WorkerCrashed`` and ``WorkerTimeout``
included. An agent from before interrupts refuses the op, and the call goes on to ``stop``.

:meth:`CodeRing.call` returns None, having sent nothing, whenever the rings are not
usable (no region, an older agent, no worker has announced itself in this region yet):
the caller then uses vsock, which also makes the worker announce itself for next time.

Everything read from the region is the guest's: the reply ring is read by
:class:`ember.ring.RingReader` (bounded, checked), the request ring is written at the
host's own offsets only, and a reply must carry the request's id, so a stale one (a call
that failed after its request was published) is skipped. One call at a time per sandbox
(the worker runs one cell at a time anyway).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ember import ring
from ember.client.shm import HostRegion, drain_doorbell, spin
from ember.client.wire import decode
from ember.errors import AgentError, ProtocolError
from ember.protocol import MAX_FRAME, encode_json, interrupted_result
from ember.ring import RingError, RingReader, RingWriter
from ember.vmm.shm import CODE_HOST_WAITING

__all__ = ["Agent", "CodeRing"]

SPIN_S = 200e-6  # a short cell's reply often follows within this: poll before sleeping
SLEEP_S = 0.1  # a sleeping caller looks again (the worker's epoch, the VM) at least this often
ROOM_WAIT_S = 0.0002  # the request ring is full (a huge cell): the worker frees room soon
BELL_GRACE_S = 0.5  # a worker still asleep this long after the bell: ask the agent instead
ANNOUNCE_WAIT_S = 0.15  # a restored worker announces itself when it first runs (~40 ms here)
MAX_INTERRUPT_GRACE_S = 10.0  # the most of the agent's word on how long an interrupt may take
REPLY_TRANSIT_S = 0.25  # beyond the agent's grace: the reply still has to be read

#: Runs a ``code_ring`` op over vsock and returns its RESULT object.
Agent = Callable[[dict[str, Any]], dict[str, Any]]


class _Stalled(Exception):
    """The worker did not free room for the request before the call's deadline."""


class _WakeFailed(Exception):
    """The agent could not be asked to wake the worker, after the request was published.

    Kept apart from the BrokenPipeError that means "nothing was sent": the request is
    in the ring already, so falling back to vsock could run the cell twice.
    """


class _Waker:
    """The request ring's doorbell: the worker sleeps, so ring its bell or ask the agent."""

    def __init__(self, owner: CodeRing) -> None:
        self._owner = owner

    def __setitem__(self, index: int, value: int) -> None:
        if not self._owner.ring_bell():
            self._owner.wake_by_agent()


class CodeRing:
    """One sandbox's code rings as this process drives them.

    ``region`` gives the VMM's region (asked once, at the first call); ``alive`` says
    whether the VM still runs (a dead one ends a waiting call with ConnectionResetError).
    ``expect``: the VM was restored from a snapshot whose worker was likely polling (a
    template), so the first call waits up to :data:`ANNOUNCE_WAIT_S` for the worker to
    announce itself rather than taking the slow path at once.
    """

    def __init__(
        self,
        region: Callable[[], HostRegion | None],
        alive: Callable[[], bool],
        *,
        expect: bool = False,
    ) -> None:
        self._factory: Callable[[], HostRegion | None] | None = region
        self._alive = alive
        self._expect = expect
        self._region: HostRegion | None = None
        self._lock = threading.Lock()
        self._leases: tuple[int, int] | None = None  # the worker's layout we are attached to
        self._writer: RingWriter | None = None
        self._reader: RingReader | None = None
        self._deadline: float | None = None
        self._next_id = 0
        self._closed = False
        self.agent: Agent | None = None  # the current call's (the waker uses it)
        self._req_ctl: memoryview | None = None  # the current call's (the waker reads it)
        self._rang_at: float | None = None  # when this call rang the guest bell
        self.calls = 0  # calls answered through the rings (tests and benchmarks read these)
        self.wakes = 0  # wakes asked of the agent over vsock
        self.bells = 0  # wakes by the guest bell

    def call(
        self, request: dict[str, Any], timeout: float | None, agent: Agent
    ) -> dict[str, Any] | None:
        """The worker's RESULT object for ``request`` (``{"op": "run", "code", ...}``), or
        None when the rings cannot carry it (nothing was sent: use vsock)."""
        with self._lock:
            region = self._open()
            if region is None:
                return None
            try:
                request_slot, reply_slot = ring.code_slots(region.slot_count)
                req_ctl, req_data, _ = region.slot(request_slot)
                rep_ctl, rep_data, doorbell = region.slot(reply_slot)
                generation = region.generation
                if self._expect:
                    self._expect = False
                    _await_announcement(req_ctl, generation)
                if not _announced(req_ctl, generation) or not self._attach(
                    req_ctl, req_data, rep_ctl, rep_data, agent
                ):
                    return None
                epoch = int(req_ctl[ring.CODE_EPOCH])
            except ValueError:  # closed under us
                return None
            self._next_id += 1
            ident = self._next_id
            self.agent = agent
            self._req_ctl = req_ctl
            self._rang_at = None
            self._deadline = None if timeout is None else time.monotonic() + timeout
            assert self._writer is not None
            req_ctl[CODE_HOST_WAITING] = 1  # the VMM must not park a guest working for us
            try:
                try:
                    self._writer.send(memoryview(encode_json({**request, "id": ident})))
                except BrokenPipeError:  # a new worker laid the rings out again: nothing sent
                    self._leases = None
                    return None
                except _Stalled:
                    return self._stop(agent, epoch, "timeout", timeout)
                except ValueError:  # the region was unmapped under us (close)
                    raise ConnectionResetError("the sandbox was closed") from None
                return self._wait(ident, epoch, timeout, req_ctl, rep_ctl, doorbell, agent)
            except _WakeFailed as exc:  # published, maybe run: never resend over vsock
                self._leases = None
                cause = exc.__cause__
                raise ConnectionResetError(
                    f"the agent could not wake the run_code worker: {cause}"
                ) from cause
            finally:
                with contextlib.suppress(ValueError):  # unmapped by close()
                    req_ctl[CODE_HOST_WAITING] = 0

    def ring_bell(self) -> bool:
        """Wake the sleeping worker by the guest bell, if it listens for it; False if not
        (the caller asks the agent)."""
        region, req_ctl = self._region, self._req_ctl
        if region is None or region.guest_bell < 0 or req_ctl is None:
            return False
        if not req_ctl[ring.CODE_BELL]:
            return False
        try:
            os.eventfd_write(region.guest_bell, 1)
        except OSError:
            return False
        self.bells += 1
        self._rang_at = time.monotonic()
        return True

    def wake_by_agent(self) -> None:
        """Ask the agent over vsock to wake the worker (the request is already published:
        a failure is :class:`_WakeFailed`, never a resend)."""
        self.wakes += 1
        assert self.agent is not None  # set by the call that publishes
        try:
            self.agent({"op": "code_ring", "action": "wake"})
        except OSError as exc:
            raise _WakeFailed(exc) from exc

    def _bell_unheard(self, req_ctl: memoryview, now: float) -> bool:
        """The bell rang :data:`BELL_GRACE_S` ago and the worker still sleeps."""
        rang = self._rang_at
        if rang is None or now - rang < BELL_GRACE_S:
            return False
        self._rang_at = None
        return bool(req_ctl[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING)

    def not_yet(self) -> None:
        """A request that is not a ``run_code`` is on its way: tell a worker polling the
        ring to stop (on one vCPU its poll slows the agent answering that request: a
        ``files.write`` 30 ms into a poll took ~60 ms against ~37). A store into shared
        memory, no system call, and only while the worker polls: after a restore (it
        polls for the host's first request) or after this client's calls. The next call
        then finds it asleep and rings its bell (~5 ms)."""
        if self._expect:
            with self._lock:
                if self._expect:
                    self._expect = False  # the first call takes the slow path, as it would
                    self._open()
        region = self._region
        if region is None:
            return
        try:
            req_ctl, _, _ = region.slot(ring.code_slots(region.slot_count)[0])
            if not req_ctl[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING:
                req_ctl[ring.CODE_NOT_YET] = 1
        except ValueError:  # closed under us
            pass

    def close(self) -> None:
        """Unmap the region (a call still waiting ends with ConnectionResetError)."""
        self._closed = True
        with self._lock:
            self._factory = None
        region, self._region = self._region, None
        if region is not None:
            region.close()

    # -- inside a call (lock held) ---------------------------------------------------

    def _open(self) -> HostRegion | None:
        if self._closed:
            return None
        factory, self._factory = self._factory, None
        if factory is not None:
            self._region = factory()
            if self._region is not None and not self._region.code:
                self._region = None  # no code slots: vsock (the region may serve channels)
        return self._region

    def _attach(
        self,
        req_ctl: memoryview,
        req_data: memoryview,
        rep_ctl: memoryview,
        rep_data: memoryview,
        agent: Agent,
    ) -> bool:
        """Attach to the worker's current layout (again, after a new worker laid it out)."""
        leases = (int(req_ctl[ring.LEASE]), int(rep_ctl[ring.LEASE]))
        if leases == self._leases:
            return True
        self._leases = None
        # The worker's capacities, read once here and checked: from now on only these copies.
        req_cap, rep_cap = _capacity(req_ctl, req_data), _capacity(rep_ctl, rep_data)
        if not req_cap or not rep_cap:
            return False  # not a geometry this host knows: vsock
        req_data, rep_data = req_data[:req_cap], rep_data[:rep_cap]
        head, tail = int(req_ctl[ring.HEAD]), int(req_ctl[ring.TAIL])
        if head % 8 or not 0 <= head - tail <= req_cap:
            return False
        reader = RingReader(rep_ctl, rep_data, rep_cap, MAX_FRAME)
        try:
            reader.attach()
        except RingError:
            return False
        self._writer = RingWriter(req_ctl, req_data, _Waker(self), self._room_wait)
        self._reader = reader
        self._leases = leases
        return True

    def _room_wait(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise _Stalled
        if not self._alive():
            raise ConnectionResetError("the sandbox's VM is gone")
        time.sleep(ROOM_WAIT_S)

    def _interrupt(self, agent: Agent, epoch: int) -> float | None:
        """Ask the agent to interrupt the worker of ``epoch``'s cell; how long to wait for
        its reply then, or None (no interrupt was sent: an older agent, a worker gone)."""
        try:
            answer = agent({"op": "code_ring", "action": "interrupt", "epoch": epoch})
        except AgentError:  # an agent from before interrupts: stop kills, as it did
            return None
        grace = answer.get("grace")
        if answer.get("interrupted") is not True or not isinstance(grace, (int, float)):
            return None
        if not math.isfinite(grace):  # the guest's word: NaN would never pass a deadline
            return None
        return min(max(float(grace), 0.0), MAX_INTERRUPT_GRACE_S) + REPLY_TRANSIT_S

    def _stop(self, agent: Agent, epoch: int, why: str, timeout: float | None) -> dict[str, Any]:
        """No reply: the agent says what happened (and kills an overrunning worker)."""
        self._leases = None  # the next worker lays the rings out afresh
        request: dict[str, Any] = {"op": "code_ring", "action": "stop", "epoch": epoch}
        return agent({**request, "why": why, "timeout": timeout})

    def _wait(
        self,
        ident: int,
        epoch: int,
        timeout: float | None,
        req_ctl: memoryview,
        rep_ctl: memoryview,
        doorbell: int,
        agent: Agent,
    ) -> dict[str, Any]:
        reader = self._reader
        assert reader is not None and self._leases is not None
        reply_lease = self._leases[1]
        poller = select.poll()
        poller.register(doorbell, select.POLLIN)

        def gone() -> bool:  # the worker died, or a new one laid the rings out again
            return bool(
                req_ctl[ring.CODE_EPOCH] != epoch
                or not req_ctl[ring.CODE_READY]
                or rep_ctl[ring.LEASE] != reply_lease
            )

        interrupted = False  # the deadline passed and the agent interrupted the cell
        try:
            while True:
                messages = reader.read()
                for message in messages:
                    reply = decode(message)
                    if reply.get("id") == ident:
                        self.calls += 1
                        return interrupted_result(reply, timeout) if interrupted else reply
                if messages:
                    continue
                if gone():
                    return self._stop(agent, epoch, "crashed", timeout)
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    grace = None if interrupted else self._interrupt(agent, epoch)
                    if grace is None:
                        return self._stop(agent, epoch, "timeout", timeout)
                    interrupted = True
                    self._deadline = time.monotonic() + grace
                    continue
                if spin(reader, SPIN_S):
                    continue
                if self._bell_unheard(req_ctl, now):
                    self.wake_by_agent()  # a failure is call()'s _WakeFailed
                    continue
                reader.sleep(True)
                if not gone() and not reader.available():
                    limit = SLEEP_S if self._deadline is None else self._deadline - now
                    if poller.poll(max(0.0, min(SLEEP_S, limit)) * 1000):
                        drain_doorbell(doorbell)
                reader.sleep(False)
                if not self._alive():
                    raise ConnectionResetError("the sandbox's VM is gone")
        except RingError as exc:
            if gone():  # a replacement's fresh ring, not a broken one
                return self._stop(agent, epoch, "crashed", timeout)
            self._leases = None
            raise ProtocolError(f"the guest broke its run_code ring: {exc}") from None
        except ValueError:  # the region was unmapped under us (close)
            raise ConnectionResetError("the sandbox was closed") from None


def _capacity(ctl: memoryview, data: memoryview) -> int:
    """The capacity the worker laid a code ring out with, or 0 if this host cannot use it:
    the slot's whole data area (the template's worker) or less (a replacement, which maps
    only part of its slots), a multiple of 8 and at least ``ring.CODE_MIN_CAPACITY``."""
    capacity = int(ctl[ring.CAPACITY])
    if capacity % 8 or not ring.CODE_MIN_CAPACITY <= capacity <= len(data):
        return 0
    return capacity


def _announced(req_ctl: memoryview, generation: int) -> bool:
    """A worker serves rings it laid out for this region (not for the one a snapshot was
    taken from while it laid them out: it lays them out again, and a request sent on the
    old layout would be lost; 0 is a worker from before ``CODE_GENERATION``)."""
    return bool(req_ctl[ring.CODE_READY]) and req_ctl[ring.CODE_GENERATION] in (0, generation)


def _await_announcement(req_ctl: memoryview, generation: int) -> None:
    deadline = time.monotonic() + ANNOUNCE_WAIT_S
    while not _announced(req_ctl, generation) and time.monotonic() < deadline:
        time.sleep(0.0005)
