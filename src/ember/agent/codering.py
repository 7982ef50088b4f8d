"""``run_code`` over memory: the worker's end of the code rings, and its spin-then-sleep loop.

A ``run_code`` over vsock costs ~40 ms here, nearly all of it the emulated guest kernel:
vsock packets, the agent's threads waking, a socketpair to the worker. The worker's own
work for a small cell is well under a millisecond. So the worker also serves requests
from the shared region (:mod:`ember.ring`, the last two slots): the host writes a request
into one ring, the worker, polling it from user space, runs the cell and writes the reply
into the other. Nothing in between enters the guest kernel.

Polling costs a vCPU, so the worker polls only for a while after activity (after a call,
as long as :class:`SpinWindow` has learnt the host's pace calls for; :data:`AFTER_RESTORE_S`
after it finds a new region, i.e. after a restore or a fork; or what a request's ``linger``
asks), then sleeps on its socketpair to the agent and says so in the request ring
(``CONSUMER_SLEEPING``). A host
that finds it asleep writes the request all the same and rings the guest bell (an
interrupt, ``/dev/ember-doorbell``: kernel patch ``0007``), which the sleeping worker also
waits on when it could open it (``CODE_BELL`` says so); otherwise, or if the bell goes
unheard, it asks the agent to wake it (``{"op": "code_ring", "action": "wake"}`` over
vsock): ~15,000 emulated guest-kernel instructions against a few thousand. Templates are
snapshotted while the worker polls, so a restored sandbox answers its first ``run_code``
with no guest-kernel wake-up at all. A host about to send the agent anything else while the
worker polls (after a restore or a call) stores ``CODE_NOT_YET``, and the worker stops that
poll at once (on one vCPU it would slow the agent serving that request).

The worker lays out both rings itself (fresh capacity and leases) the first time it sees a
region (a new VMM, restore or fork: the header's generation changed) and only then stores
``CODE_READY``; until then the host uses vsock. When the worker dies, the agent
(:class:`DeathNotice`) clears ``CODE_READY``, bumps ``CODE_EPOCH`` and rings the reply
slot's doorbell, so a host waiting for a reply learns it at once.

Runs in the guest: standard library only.
"""

from __future__ import annotations

import os
import select
import socket
import time

from ember import ring
from ember.agent import shm
from ember.agent.cellwatch import cells_after
from ember.protocol import MAX_FRAME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "AFTER_RESTORE_S",
    "MAX_LINGER_S",
    "SPIN_MAX_S",
    "SPIN_MIN_S",
    "DeathNotice",
    "SpinWindow",
    "WorkerRing",
]

SPIN_MIN_S = 0.02  # poll at least this long after a call: a few wake-ups' worth, and the
# few ms of host code between two calls (reading the result, the caller's own Python)
SPIN_MAX_S = 0.05  # and at most this long (unless a request asks): calls further apart wake it
AFTER_RESTORE_S = 0.1  # and after a restore or fork, for the host's first request
MAX_LINGER_S = 120.0  # the most a request may ask for (a template build asks for a while)
BELL_PATH = "/dev/ember-doorbell"
# Set to "1" for the agent's first worker (the template's): it maps the whole region, which
# every restored sandbox inherits; a replacement maps its code slots only (WorkerRing.open).
PREMAP_ENV = "EMBER_WORKER_PREMAP"
# A replacement's code rings (a multiple of 8, at least ring.CODE_MIN_CAPACITY): mapping its two
# whole 8 MiB slots took ~1.1 s of a replacement's start; larger requests and replies are cut
# into fragments of a quarter of this, as on any ring.
REPLACEMENT_CAPACITY = 1 << 20
SOCKET_CHECK_S = 0.01  # while polling, look at the agent's socket this often (a syscall)
FULL_WAIT_S = 0.0005  # a reply that does not fit yet: the host frees room as it reads


def _code_region() -> shm.Region | None:
    """This process's region if it has code slots (and one for channels besides)."""
    region = shm.region()
    if region is None or region.slot_count < ring.CODE_SLOTS + 1:
        return None
    return region


def _views(region: shm.Region, index: int) -> tuple[memoryview, memoryview]:
    """A code slot's control words and the data area its ring is laid out on: all of it
    when the region is mapped whole (the template's worker), else
    :data:`REPLACEMENT_CAPACITY`, so that a replacement maps 2 x 257 pages, not 2 x 2,048."""
    size = 0 if region.mapped_whole else ring.PAGE + REPLACEMENT_CAPACITY
    slot = region.slot(index, size)
    return slot[: ring.PAGE].cast("Q"), slot[ring.PAGE :]


class SpinWindow:
    """How long the worker polls after a call, learnt from the gaps between calls.

    Polling holds a vCPU, which is a host core, for as long as it lasts; a sleeping worker
    woken by the bell costs its next call ~5 ms and ~5,000 emulated guest-kernel
    instructions. So polling much longer than that pays only when the next call comes soon:
    after a call that came ``gap`` seconds after the previous reply, the window is ``2 * gap``
    (enough to catch a caller at the same pace, with its jitter), at least
    :data:`SPIN_MIN_S` (a few wake-ups: whatever the next gap, a small multiple of the
    cheaper choice in hindsight) and at most :data:`SPIN_MAX_S`; a longer gap (the
    caller paused) shrinks it to :data:`SPIN_MIN_S` again. A shorter gap halves it at most,
    so one quick pair of calls in a slower loop does not make the next call miss.

    A fixed 0.25 s window burnt a quarter of a host core's second after every call,
    measured: 260 ms of VMM CPU and ~67,000 emulated instructions (the socket checks and
    yields) per call, and slowed whatever else the guest did meanwhile.
    """

    def __init__(self) -> None:
        self.seconds = SPIN_MIN_S
        self._replied: float | None = None

    def replied(self, now: float) -> None:
        self._replied = now

    def arrived(self, now: float) -> None:
        """A request was taken at ``now``: learn the caller's pace from the gap."""
        if self._replied is None:
            return
        gap, self._replied = now - self._replied, None
        if gap < 0:  # a restore moved the clock: no pace to learn
            return
        if gap > SPIN_MAX_S:
            self.seconds = SPIN_MIN_S
        else:
            self.seconds = min(SPIN_MAX_S, max(SPIN_MIN_S, 2 * gap, self.seconds / 2))

    def forget(self) -> None:
        """A new region (restore, fork): the last reply was another VM's."""
        self._replied = None
        self.seconds = SPIN_MIN_S


class WorkerRing:
    """The worker's end: requests in, replies out, and how long to keep polling."""

    def __init__(self, region: shm.Region) -> None:
        self._region = region
        request, reply = ring.code_slots(region.slot_count)
        self._req_ctl, self._req_data = _views(region, request)
        self._rep_ctl, self._rep_data = _views(region, reply)
        self._bell = region.bell(reply)
        self._generation = 0
        self._layouts = 0
        self._pid = os.getpid() or 1  # a system call costs ~0.3 ms here: once, not per layout
        self._reader: ring.RingReader | None = None
        self._writer: ring.RingWriter | None = None
        self._start = 0.0
        self._window = 0.0
        self.spin = SpinWindow()
        self.served = 0
        self.guest_bell = _open_bell()  # opened in the template: every restored worker has it

    @classmethod
    def open(cls) -> WorkerRing | None:
        """This process's rings, or None without a region (vsock only, as before). Maps the
        two code slots unless the region is already mapped whole (the template's worker:
        ``shm.premap``); a cell's channel maps its own slot when it asks for one."""
        region = _code_region()
        if region is None:
            return None
        try:
            return cls(region)
        except (OSError, ValueError):
            return None

    @property
    def generation(self) -> int:
        """The region's generation: new on every VMM start, restore and fork."""
        return self._region.generation

    def refresh(self) -> bool:
        """Lay the rings out and announce them in a region not seen yet; True if it was new."""
        generation = self._region.generation
        if generation == self._generation or not self._region.valid():
            return False
        self._req_ctl[ring.CODE_READY] = 0
        # Leases only tell one layout from the next (the generation is the VMM's random
        # number): no system call on the way to the first request after a restore.
        self._layouts += 1
        lease = (generation ^ self._pid << 32 ^ self._layouts << 48) & (1 << 63) - 1 | 1
        capacity = len(self._req_data)
        ring.lay_out(self._req_ctl, capacity, lease)
        ring.lay_out(self._rep_ctl, len(self._rep_data), lease ^ 2)
        self._reader = ring.RingReader(self._req_ctl, self._req_data, capacity, MAX_FRAME)
        self._writer = ring.RingWriter(self._rep_ctl, self._rep_data, self._bell, _wait_room)
        self._generation = generation
        self.spin.forget()
        self._req_ctl[ring.CODE_BELL] = int(self.guest_bell is not None)
        # The host attaches only to a layout for its region's generation: if a snapshot
        # caught this worker between reading the generation and here, the copy restored
        # from it finishes a layout for the old one, which the host ignores until the
        # next refresh lays the rings out for the copy's own.
        self._req_ctl[ring.CODE_GENERATION] = generation
        self._req_ctl[ring.CODE_READY] = self._pid  # last: the host may go now
        self.poll_for(AFTER_RESTORE_S)
        return True

    def count_cell(self, *, ends: bool) -> None:
        """A ring request begins (the word becomes odd) or ends (even): the agent's pool
        waits for its sandbox to be idle before a refill (seconds of guest CPU), and sees
        these only through the region. Continued from the word itself, whoever left it."""
        self._req_ctl[ring.CODE_CELLS] = cells_after(self._req_ctl[ring.CODE_CELLS], ends=ends)

    def poll_for(self, seconds: float | None) -> None:
        """Keep polling for ``seconds`` from now, or None: as long as the caller's pace calls
        for (:class:`SpinWindow`). A restored clock may jump: see :meth:`polling`."""
        self._start = time.monotonic()
        if seconds is None:
            seconds = self.spin.seconds
        self._window = min(max(seconds, 0.0), MAX_LINGER_S)

    def not_yet(self) -> bool:
        """The host said its first request is not for us: stop polling (one load, no
        system call, so it is read on every turn of the loop)."""
        if not self._req_ctl[ring.CODE_NOT_YET]:
            return False
        self._req_ctl[ring.CODE_NOT_YET] = 0
        self._window = 0.0
        return True

    def polling(self, now: float) -> bool:
        if now < self._start:  # the clock went back (a restore): count from here
            self._start = now
        return now - self._start < self._window

    def take(self) -> list[bytes]:
        """Requests the host has published (none when the rings are not laid out)."""
        if self._reader is None:
            return []
        try:
            requests = self._reader.read()
        except ring.RingError:
            self._generation = 0  # lay the rings out afresh; the host re-attaches
            return []
        if requests:
            self.spin.arrived(time.monotonic())
        return requests

    def reply(self, payload: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.send(memoryview(payload))
        except BrokenPipeError:
            self._generation = 0
        self.spin.replied(time.monotonic())

    def sleep(self) -> bool:
        """Say "I sleep" to the host; False (still awake) if a request came meanwhile."""
        if self._reader is None:
            return True
        self._req_ctl[ring.CODE_NOT_YET] = 0  # for a poll that has ended anyway
        self._reader.sleep(True)
        try:
            pending = self._reader.available()
        except ring.RingError:
            pending = 0
        if pending:
            self._reader.sleep(False)
            return False
        return True

    def wake(self) -> None:
        if self._reader is not None:
            self._reader.sleep(False)


def _open_bell() -> int | None:
    try:
        return os.open(BELL_PATH, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # a kernel without the driver, or no line given: vsock wakes us
        return None


def _heard(bell: int) -> bool:
    """Consume the bell's rings (one read returns them all); False if it had none."""
    try:
        return len(os.read(bell, 8)) == 8
    except (BlockingIOError, InterruptedError):
        return False


def _wait_room() -> None:
    time.sleep(FULL_WAIT_S)


def serve(
    sock: socket.socket,
    code_ring: WorkerRing | None,
    on_ring: Callable[[bytes], tuple[bytes, float | None]],
    on_socket: Callable[[], float | None],
) -> None:
    """The worker's loop: poll the ring while there was activity, else sleep on ``sock``.

    ``on_ring`` serves one ring request (its reply and how long to poll after it: None for
    the learnt window); ``on_socket`` reads and serves one frame from the agent (how long
    to poll after it, likewise) and raises ``EOFError`` when the agent has gone.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    bell = code_ring.guest_bell if code_ring is not None else None
    sleeper = select.poll()  # asleep: the agent's socket, or the host's bell
    sleeper.register(sock.fileno(), select.POLLIN)
    if bell is not None:
        sleeper.register(bell, select.POLLIN)
    rung = False  # the bell woke us and is still to be read (before the next sleep)
    while True:
        if code_ring is not None:
            check_at = 0.0
            while True:
                if code_ring.refresh():  # a restore or fork while we polled
                    check_at = 0.0
                requests = code_ring.take()
                for request in requests:
                    code_ring.count_cell(ends=False)
                    try:
                        reply, linger = on_ring(request)
                    finally:
                        code_ring.count_cell(ends=True)
                    code_ring.reply(reply)
                    code_ring.served += 1
                    code_ring.poll_for(linger)
                if requests:
                    continue
                if code_ring.not_yet():
                    break
                now = time.monotonic()
                if not code_ring.polling(now):
                    break
                if now >= check_at:
                    if poller.poll(0):
                        break  # the agent wants us: serve it below, then poll again
                    # Any other runnable task (the agent answering the host, a program it
                    # started) gets the vCPU now, not at the next tick, 40 ms away.
                    os.sched_yield()
                    check_at = now + SOCKET_CHECK_S
            if rung and bell is not None:
                # Read the ring that woke us last (else poll() would return at once) before
                # saying we sleep: the host rings only a sleeper, so none is lost. Not read
                # on waking: a system call there (~270 emulated instructions) is in the
                # latency of the request that rang.
                _heard(bell)
                rung = False
            if not code_ring.sleep():
                continue
            if bell is not None:
                ready = {fd for fd, _ in sleeper.poll()}
                if bell in ready:
                    rung = True
                    code_ring.wake()
                    code_ring.poll_for(SPIN_MIN_S)  # the request is there: take it
                if sock.fileno() not in ready:
                    continue
        try:
            after = on_socket()
        except EOFError:
            return
        if code_ring is not None:
            code_ring.wake()
            code_ring.poll_for(after)


class DeathNotice:
    """The agent's part: tell a host waiting on the rings that the worker died."""

    def __init__(self, region: shm.Region) -> None:
        request, reply = ring.code_slots(region.slot_count)
        self._ctl = region.control(request)
        self._bell = region.bell(reply)
        self.epoch = 0

    @classmethod
    def open(cls) -> DeathNotice | None:
        region = _code_region()
        if region is None:
            return None
        try:
            return cls(region)
        except (OSError, ValueError):
            return None

    def read_cells(self) -> int:
        """The worker's ``CODE_CELLS``: odd while it serves a ring request."""
        return int(self._ctl[ring.CODE_CELLS])

    def read_epoch(self) -> int:
        """The epoch hosts see (0 in a region no worker has died in yet)."""
        return int(self._ctl[ring.CODE_EPOCH])

    def publish(self) -> None:
        """The worker died: the rings are nobody's until a new worker lays them out."""
        self.epoch = max(self.epoch, self.read_epoch()) + 1
        self._ctl[ring.CODE_READY] = 0
        self._ctl[ring.CODE_CELLS] = cells_after(self.read_cells(), ends=True)  # its cell ended
        self._ctl[ring.CODE_EPOCH] = self.epoch
        ring.fence()
        self._bell[0] = 1
