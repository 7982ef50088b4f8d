"""run_code over the code rings without KVM: the real worker, agent runner and host end.

A memfd laid out like the VMM's region stands in for the shared memory. The agent's
:class:`CodeRunner` starts the real worker loop (``serve_cells``) in a real process,
which maps the same memfd through ``/proc/PID/fd`` as the guest maps ``/dev/mem``; the
host's :class:`CodeRing` writes requests and reads replies. The doorbells are plain memory
here (no ioeventfd): a thread relays each store to its eventfd, as KVM would, a little later.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import ring
from ember.agent import shm
from ember.agent.cellwatch import cells_after
from ember.agent.codering import SPIN_MAX_S, SPIN_MIN_S, DeathNotice
from ember.agent.runcode import CodeRunner
from ember.client import CodeRing, HostRegion
from ember.client.results import CodeResult, parse_code_result
from ember.client.wire import decode
from ember.errors import AgentError, ProtocolError
from ember.protocol import Kind, read_frame
from tests.waiting import wait_for

# bench/ is a folder of scripts, not a package: import its modules the way the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import process_cpu_seconds  # the benches' helper: one copy

SLOTS = 4
SLOT_SIZE = 64 << 10
SIZE = ring.region_size(SLOTS, SLOT_SIZE)

WORKER = """
import os, socket, sys
from ember.agent import codering, pyclone, shm, worker
keep = []
holder, sock = pyclone.holder_without(int(sys.argv[-1]), keep)  # as worker.main does
fd = os.open(sys.argv[1], os.O_RDWR)
region = shm.Region(fd, int(sys.argv[2]), 0)
if sys.argv[3] != "-":
    codering.BELL_PATH = sys.argv[3]  # the guest bell's device, an eventfd here
if sys.argv[4] != "-":
    codering.REPLACEMENT_CAPACITY = int(sys.argv[4])  # rings laid out on part of the slots
worker.serve_cells(socket.socket(fileno=sock), codering.WorkerRing(region), holder=holder)
"""


class Fixture:
    """``bell``: the worker listens on a guest bell, a FIFO standing in for
    ``/dev/ember-doorbell`` (8-byte reads, poll). ``unheard``: the host's rings go to an
    eventfd that nobody reads (a bell the guest never hears)."""

    def __init__(self, bell: bool = False, unheard: bool = False, capacity: int = 0) -> None:
        self.memfd = os.memfd_create("test-code-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, SIZE + ring.PAGE)  # the doorbell page after the region
        self.map = mmap.mmap(self.memfd, SIZE + ring.PAGE)
        self.header = memoryview(self.map)[: ring.PAGE].cast("Q")
        self.header[ring.H_VERSION] = ring.VERSION
        self.header[ring.H_GENERATION] = 12345
        self.header[ring.H_SLOT_COUNT] = SLOTS
        self.header[ring.H_SLOT_SIZE] = SLOT_SIZE
        self.header[ring.H_MAGIC] = ring.MAGIC
        path = f"/proc/{os.getpid()}/fd/{self.memfd}"
        self.tmp = tempfile.TemporaryDirectory()
        bell_path = os.path.join(self.tmp.name, "bell") if bell else "-"
        self.bell = -1
        if bell:
            os.mkfifo(bell_path)
            self.bell = os.open(bell_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.runner = CodeRunner(
            [sys.executable, "-c", WORKER, path, str(SIZE), bell_path, str(capacity or "-")]
        )
        self.agent_region = shm.Region(os.dup(self.memfd), SIZE, 0)
        self.runner.notice = DeathNotice(self.agent_region)
        self.bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(SLOTS)]
        self._stores = mmap.mmap(self.memfd, ring.PAGE, offset=SIZE)
        self._relaying = True
        self._relay = threading.Thread(target=self._relay_bells, daemon=True)
        self._relay.start()
        host_bell = -1
        if bell:
            host_bell = os.eventfd(0, os.EFD_NONBLOCK) if unheard else os.dup(self.bell)
        self.host = HostRegion(
            os.dup(self.memfd), self.bells, SIZE, SLOT_SIZE, code=True, guest_bell=host_bell
        )
        self.alive = True
        self.code = CodeRing(lambda: self.host, alive=lambda: self.alive)
        self.ops: list[dict[str, Any]] = []

    def _relay_bells(self) -> None:
        """The VMM's ioeventfds: a store to slot i's doorbell signals the host's eventfd."""
        words = memoryview(self._stores).cast("I")
        try:
            while self._relaying:
                for slot in range(SLOTS):
                    if words[slot]:
                        words[slot] = 0
                        os.eventfd_write(self.bells[slot], 1)
                time.sleep(0.0003)
        finally:
            words.release()

    def agent(self, request: dict[str, Any]) -> dict[str, Any]:
        """The agent's ``code_ring`` op, run by its real handler on a socket pair."""
        self.ops.append(request)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.runner.handle_ring(ours, request)
            frame = read_frame(theirs)
        assert frame is not None and frame[0] is Kind.RESULT, frame
        return decode(frame[1])

    def ctl(self, slot: int) -> memoryview:
        offset = ring.SLOT_BASE + slot * SLOT_SIZE
        return memoryview(self.map)[offset : offset + ring.PAGE].cast("Q")

    def call(self, code: str, timeout: float | None = 30) -> CodeResult | None:
        reply = self.code.call({"op": "run", "code": code}, timeout, self.agent)
        return None if reply is None else parse_code_result(reply)

    def ready_call(self, code: str, timeout: float | None = 30) -> CodeResult:
        """Once a worker has announced itself (a replacement takes a moment to start)."""
        deadline = time.monotonic() + 60
        while (result := self.call(code, timeout)) is None:
            assert time.monotonic() < deadline, "no worker announced itself on the rings"
            time.sleep(0.05)
        return result

    def close(self) -> None:
        self._relaying = False
        self._relay.join()
        self.runner.close()
        self.code.close()
        if self.bell >= 0:
            os.close(self.bell)
        self.tmp.cleanup()


def _fixture(**options: Any) -> Iterator[Fixture]:
    fixture = Fixture(**options)
    fixture.runner.start_in_background()
    try:
        yield fixture
    finally:
        fixture.close()


@pytest.fixture
def fx() -> Iterator[Fixture]:
    yield from _fixture()


@pytest.fixture
def fx_bell() -> Iterator[Fixture]:
    yield from _fixture(bell=True)


@pytest.fixture
def fx_unheard() -> Iterator[Fixture]:
    yield from _fixture(bell=True, unheard=True)


def test_cells_go_through_the_rings_and_keep_their_state(fx: Fixture) -> None:
    first = fx.ready_call("x = 6\nprint('hi')\nx * 7")
    assert (first.value, first.stdout, first.error) == ("42", "hi\n", None)
    assert fx.ready_call("x + 1").value == "7"
    error = fx.ready_call("1/0").error
    assert error is not None and error.type == "ZeroDivisionError"
    assert fx.code.calls == 3
    assert fx.ctl(2)[ring.CODE_READY] != 0  # the worker announced itself in the request slot
    assert fx.ctl(2)[ring.CODE_GENERATION] == 12345  # for the region's generation


def test_the_agent_sees_a_ring_cell_run_through_the_cells_word(fx: Fixture) -> None:
    # Its pool holds refills off while cells run (ember.agent.poolfill.watch_cells).
    assert fx.runner.notice is not None
    read = fx.runner.notice.read_cells
    fx.ready_call("import time")
    before = read()
    assert before % 2 == 0 and before >= 2
    done: list[CodeResult | None] = []
    caller = threading.Thread(target=lambda: done.append(fx.call("time.sleep(1.0)")))
    caller.start()
    wait_for(lambda: read() % 2 == 1, 10, "the worker to say a cell runs")
    assert read() == before + 1 and not done
    caller.join(30)
    assert done and done[0] is not None and done[0].error is None
    assert read() == before + 2
    # A worker that dies inside a cell leaves the word odd: the agent closes that cell.
    died = fx.call("import os; os._exit(3)")
    assert died is not None and died.error is not None and died.error.type == "WorkerCrashed"
    wait_for(lambda: read() % 2 == 0, 10, "the agent to close the dead worker's cell")
    assert read() > before + 2


@pytest.mark.parametrize("start", [0, 1, 6, 7, (1 << 62) - 2, (1 << 62) - 1])
def test_each_begin_and_end_leaves_a_new_value_of_the_right_parity(start: int) -> None:
    begun = cells_after(start, ends=False)
    ended = cells_after(begun, ends=True)
    assert begun % 2 == 1 and ended % 2 == 0 and len({start, begun, ended}) == 3
    again = cells_after(begun, ends=False)  # a begin no end followed (a killed worker's)
    assert again % 2 == 1 and again != begun


def test_a_sleeping_worker_is_woken_by_the_agent(fx: Fixture) -> None:
    fx.ready_call("y = 1")
    time.sleep(SPIN_MAX_S + 0.3)  # the worker stops polling and sleeps
    assert fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    assert fx.ready_call("y + 1").value == "2"
    assert fx.code.wakes == 1 and [op["action"] for op in fx.ops] == ["wake"]
    assert fx.ready_call("y + 2").value == "3"  # polling again: no second wake
    assert fx.code.wakes == 1


def test_after_an_ordinary_call_the_worker_soon_sleeps(fx: Fixture) -> None:
    """Polling holds a vCPU: an ordinary call's window is at most SPIN_MAX_S (it was a
    quarter of a second), while a call that asks to linger is polled for that long."""
    fx.ready_call("1")
    time.sleep(SPIN_MAX_S + 0.1)
    assert fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    assert fx.code.call({"op": "run", "code": "2", "linger": 30}, 30, fx.agent) is not None
    time.sleep(SPIN_MAX_S + 0.1)
    assert not fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING


def test_a_caller_at_a_steady_pace_finds_the_worker_polling(fx: Fixture) -> None:
    """The window follows the gaps between calls: after the first call at a pace slower
    than the floor, the next ones are caught by the poll, not woken."""
    fx.ready_call("n = 0")
    pace = SPIN_MIN_S * 1.2
    for _ in range(10):
        time.sleep(pace)
        assert fx.ready_call("n += 1").error is None
    assert fx.ready_call("n").value == "10"
    assert fx.code.wakes <= 3, fx.code.wakes  # the first, and the odd late sleep


def test_a_worker_without_a_bell_does_not_arm_it(fx: Fixture) -> None:
    fx.ready_call("1")
    assert fx.ctl(2)[ring.CODE_BELL] == 0  # BELL_PATH does not exist on this host


def test_a_sleeping_worker_is_woken_by_the_guest_bell(fx_bell: Fixture) -> None:
    fx = fx_bell
    fx.ready_call("y = 1")
    assert fx.ctl(2)[ring.CODE_BELL] == 1  # the worker said it listens
    for expected in ("2", "3"):
        time.sleep(SPIN_MAX_S + 0.3)  # the worker stops polling and sleeps
        assert fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
        assert fx.ready_call(f"y + {expected} - 1").value == expected
    assert (fx.code.bells, fx.code.wakes, fx.ops) == (2, 0, [])  # never the agent
    assert fx.ready_call("y").value == "1"  # polling again: no ring at all
    assert fx.code.bells == 2


def test_the_bell_is_read_before_the_next_sleep_not_on_waking(fx_bell: Fixture) -> None:
    """A worker the bell woke serves the request first and reads the bell only on its way
    back to sleep (a system call fewer in the request's latency). It must read it then:
    an unread bell keeps poll() returning at once, and the worker would spin."""
    fx = fx_bell
    fx.ready_call("w = 1")
    time.sleep(SPIN_MAX_S + 0.3)
    assert fx.ready_call("w + 1").value == "2"
    assert fx.code.bells == 1
    time.sleep(SPIN_MAX_S + 0.3)  # the window after the woken call ends: asleep again
    assert fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    poller = select.poll()
    poller.register(fx.bell, select.POLLIN)
    assert poller.poll(0) == []  # the worker read the ring that woke it
    proc = fx.runner._proc
    assert proc is not None
    before = process_cpu_seconds(proc.pid)
    time.sleep(0.5)
    assert process_cpu_seconds(proc.pid) - before < 0.1  # asleep, not spinning on the bell
    assert fx.ready_call("w + 2").value == "3"  # and a later ring still wakes it
    assert (fx.code.bells, fx.code.wakes) == (2, 0)


def test_a_bell_the_worker_never_hears_falls_back_to_the_agent(fx_unheard: Fixture) -> None:
    fx = fx_unheard
    fx.ready_call("z = 5")
    time.sleep(SPIN_MAX_S + 0.3)
    assert fx.ready_call("z * 2").value == "10"
    assert (fx.code.bells, fx.code.wakes) == (1, 1)
    assert [op["action"] for op in fx.ops] == ["wake"]


def test_a_worker_that_dies_is_reported_and_replaced(fx: Fixture) -> None:
    fx.ready_call("state = 'kept'")
    result = fx.ready_call("import os\nos._exit(3)")
    assert result.error is not None and result.error.type == "WorkerCrashed"
    assert "exited with status 3" in result.error.message
    assert fx.ctl(2)[ring.CODE_EPOCH] == 1
    after = fx.ready_call("'state' in globals()")  # a new worker, a fresh namespace
    assert after.value == "False"


def _sockets(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if (link := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:"):
                found.add(link)
    return found


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("path", ["ring", "socket"])
def test_the_workers_holder_shares_its_memory_not_its_socket_and_is_freed(
    fx: Fixture, path: str
) -> None:
    """The worker's holder keeps its memory after its death (the kernel's teardown is then
    the holder's, later), but must not hold the agent's socket: its end is how the agent
    (the vsock path's read) hears of the death."""
    fx.ready_call("x = 1")
    proc = fx.runner._proc
    assert proc is not None
    holder = fx.runner._holders[proc.pid]
    with open(f"/proc/{holder}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # CLONE_PARENT: ours
    with open(f"/proc/{holder}/maps") as a, open(f"/proc/{proc.pid}/maps") as b:
        assert a.read() == b.read()  # one memory (CLONE_VM)
    assert _sockets(proc.pid) and not _sockets(holder) & _sockets(proc.pid)
    crash = "import os\nos._exit(7)"
    if path == "ring":
        result = fx.ready_call(crash)
    else:  # the agent reads the worker's socket until it ends
        result = parse_code_result(decode(fx.runner.run(crash, 30)))
    assert result.error is not None and result.error.type == "WorkerCrashed", result
    assert "exited with status 7" in result.error.message
    assert _gone(holder)  # killed and reaped: no pool here, so at once, in the background
    assert fx.ready_call("x = 2").error is None  # the replacement has a holder of its own
    assert fx.runner._holders and holder not in fx.runner._holders.values()


def test_a_death_seen_on_the_socket_is_on_the_rings_before_the_caller_is_answered(
    fx: Fixture,
) -> None:
    """The vsock path hears of a death on the worker's socket, before the watcher publishes
    it on the rings. On a loaded guest that publish can come late: the caller's next call,
    over the rings, must still find the replacement, not the dead worker "ready"."""
    fx.ready_call("x = 1")
    notice = fx.runner.notice
    assert notice is not None
    publish = notice.publish

    def late() -> None:
        time.sleep(1.0)
        publish()

    notice.publish = late  # type: ignore[method-assign]
    result = parse_code_result(decode(fx.runner.run("import os\nos._exit(9)", 30)))
    assert result.error is not None and result.error.type == "WorkerCrashed", result
    assert fx.ctl(2)[ring.CODE_EPOCH] == 1  # published before the answer
    after = fx.ready_call("'x' in globals()")
    assert after.error is None and after.value == "False", after  # the replacement's answer


def test_a_cell_over_its_timeout_is_interrupted_and_the_state_kept(fx: Fixture) -> None:
    fx.ready_call("z = 1")
    result = fx.ready_call("print('so far')\nwhile True: pass", timeout=0.5)
    assert result.error is not None and result.error.type == "WorkerTimeout", result
    assert "interrupted" in result.error.message and "kept" in result.error.message
    assert result.error.traceback.rstrip().endswith("KeyboardInterrupt")
    assert result.stdout == "so far\n"
    assert [op["action"] for op in fx.ops] == ["interrupt"]  # no stop: nothing was killed
    assert fx.ctl(2)[ring.CODE_EPOCH] == 0  # the same worker
    assert fx.ready_call("z + 1").value == "2"


def test_a_cell_that_ignores_the_interrupt_is_killed_and_the_next_one_runs(fx: Fixture) -> None:
    fx.ready_call("z = 1")
    started = time.monotonic()
    # (Ignoring SIGINT itself: a loop that catches KeyboardInterrupt can still let one out,
    # when the signal lands on the loop's own back edge, outside its try.)
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    result = fx.ready_call(stubborn, timeout=0.5)
    assert result.error is not None and result.error.type == "WorkerTimeout"
    assert "killed" in result.error.message
    assert [op["action"] for op in fx.ops] == ["interrupt", "stop"]
    assert time.monotonic() - started < 20
    assert fx.ready_call("'z' in globals()").value == "False"  # a new worker


def test_an_agent_without_interrupts_still_ends_an_overrun(fx: Fixture) -> None:
    """A template from before interrupts: its agent refuses the op, and stop kills."""
    real = fx.agent

    def old_agent(request: dict[str, Any]) -> dict[str, Any]:
        if request["action"] == "interrupt":
            fx.ops.append(request)
            raise AgentError("BadRequest", "unknown code_ring action 'interrupt'")
        return real(request)

    fx.ready_call("z = 1")
    reply = fx.code.call({"op": "run", "code": "while True: pass"}, 0.5, old_agent)
    assert reply is not None
    result = parse_code_result(reply)
    assert result.error is not None and result.error.type == "WorkerTimeout"
    assert "killed" in result.error.message
    assert [op["action"] for op in fx.ops] == ["interrupt", "stop"]


def test_a_reply_ring_the_guest_breaks_fails_the_call_not_the_host(fx: Fixture) -> None:
    fx.ready_call("import time")
    reply_ctl = fx.ctl(3)

    def vandal() -> None:
        time.sleep(0.3)
        reply_ctl[ring.HEAD] = (1 << 40) + 8  # a head no ring of this size can have

    thread = threading.Thread(target=vandal)
    thread.start()
    with pytest.raises(ProtocolError, match="broke its run_code ring"):
        fx.call("time.sleep(2)")
    thread.join()


def test_a_vm_that_goes_away_ends_a_waiting_call(fx: Fixture) -> None:
    fx.ready_call("import time")
    threading.Timer(0.3, lambda: setattr(fx, "alive", False)).start()
    with pytest.raises(ConnectionResetError):
        fx.call("time.sleep(5)", timeout=None)


def test_no_region_or_no_announced_worker_means_vsock() -> None:
    nothing = CodeRing(lambda: None, alive=lambda: True)
    assert nothing.call({"op": "run", "code": "1"}, None, lambda r: {}) is None
    fixture = Fixture()  # its worker never started: CODE_READY stays 0
    try:
        assert fixture.call("1") is None
        assert fixture.code.calls == 0 and fixture.ops == []
    finally:
        fixture.close()


def test_rings_laid_out_for_another_generation_are_not_used() -> None:
    """A worker snapshotted while laying its rings out finishes that layout in the restored
    copy's region, for the template's generation, then lays them out again for the copy's
    own: a request the host wrote on the first layout would be lost, and the call reported
    as a crash. The host waits for a layout of its own region's generation, else vsock."""
    fixture = Fixture()  # no worker: the layout below is the restored one's, finished
    try:
        req, rep = fixture.ctl(2), fixture.ctl(3)
        ring.lay_out(req, SLOT_SIZE - ring.PAGE, 7)
        ring.lay_out(rep, SLOT_SIZE - ring.PAGE, 7 ^ 2)
        req[ring.CODE_GENERATION] = 999  # the template's, not this region's 12345
        req[ring.CODE_READY] = 1
        assert fixture.call("1") is None  # vsock, nothing written on the stale layout
        assert req[ring.HEAD] == 0 and fixture.code.calls == 0 and fixture.ops == []
    finally:
        fixture.close()


@pytest.mark.parametrize("capacity", [ring.CODE_MIN_CAPACITY, 8 << 10])
def test_rings_a_worker_lays_out_smaller_than_its_slots_carry_any_size(capacity: int) -> None:
    """A replacement maps only part of its code slots (``REPLACEMENT_CAPACITY``): the host
    takes the capacity the worker laid out, and requests and replies far larger than the
    ring still cross it, in fragments, not over vsock."""
    for fixture in _fixture(capacity=capacity):
        code = "s = " + repr("x" * (100 << 10)) + "\nprint(s * 2)\nlen(s)"
        result = fixture.ready_call(code)
        assert (result.value, result.error) == (str(100 << 10), None)
        assert result.stdout == "x" * (200 << 10) + "\n"
        assert (fixture.ctl(2)[ring.CAPACITY], fixture.ctl(3)[ring.CAPACITY]) == (capacity,) * 2
        assert fixture.ctl(2)[ring.HEAD] > capacity  # the request went round the ring
        # The ring, not the agent's op (a worker that slept between fragments was woken).
        assert fixture.code.calls == 1
        assert all(op == {"op": "code_ring", "action": "wake"} for op in fixture.ops)
        # Read once, at the layout: a guest that rewrites it later changes nothing.
        fixture.ctl(2)[ring.CAPACITY] = fixture.ctl(3)[ring.CAPACITY] = 1 << 40
        assert fixture.ready_call("len(s)").value == str(100 << 10)


@pytest.mark.parametrize(
    "capacity", [0, ring.CODE_MIN_CAPACITY - 8, ring.CODE_MIN_CAPACITY + 4, SLOT_SIZE, 1 << 40]
)
def test_a_code_ring_capacity_the_host_cannot_use_means_vsock(capacity: int) -> None:
    """Below the minimum, not whole words, or past the slot's data area: never attached."""
    fixture = Fixture()  # no worker: the layout below is a hostile one
    try:
        req, rep = fixture.ctl(2), fixture.ctl(3)
        ring.lay_out(req, capacity, 7)
        ring.lay_out(rep, SLOT_SIZE - ring.PAGE, 7 ^ 2)
        req[ring.CODE_GENERATION] = 12345
        req[ring.CODE_READY] = 1
        assert fixture.call("1") is None  # vsock, nothing written on that layout
        assert req[ring.HEAD] == 0 and fixture.code.calls == 0 and fixture.ops == []
    finally:
        fixture.close()


def test_a_wake_that_fails_after_publishing_is_an_error_not_a_second_run(fx: Fixture) -> None:
    """A request already in the ring must never be sent again over vsock: the cell
    could then run twice. A broken agent connection during the wake is an error."""
    fx.ready_call("runs = 0")
    time.sleep(SPIN_MAX_S + 0.3)  # the worker sleeps: the next call must wake it
    assert fx.ctl(2)[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING

    broken: list[dict[str, Any]] = []

    def broken_agent(request: dict[str, Any]) -> dict[str, Any]:
        broken.append(request)
        raise BrokenPipeError(32, "the agent's connection broke")

    with pytest.raises(ConnectionResetError, match="could not wake"):
        fx.code.call({"op": "run", "code": "runs += 1"}, 30, broken_agent)
    fx.runner.wake()  # the request is in the ring: once woken, the worker runs it once
    deadline = time.monotonic() + 30
    while (result := fx.call("runs")) is None or result.value != "1":
        assert time.monotonic() < deadline, f"the published cell did not run once: {result}"
        time.sleep(0.05)
    assert [op["action"] for op in broken] == ["wake"]  # asked once, never for a rerun


def test_a_first_request_that_is_not_run_code_stops_the_restored_workers_poll(
    fx: Fixture,
) -> None:
    # A poll far longer than the test: only CODE_NOT_YET can end it in time.
    reply = None
    while reply is None:
        reply = fx.code.call({"op": "run", "code": "w = 1", "linger": 120}, 30, fx.agent)
    slot = fx.ctl(2)
    assert not slot[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    restored = CodeRing(lambda: fx.host, alive=lambda: True, expect=True)
    deadline = time.monotonic() + 30
    try:
        restored.not_yet()  # e.g. an exec is the first request: the worker need not poll
        while not slot[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING:
            assert time.monotonic() < deadline, "the worker kept polling"
            time.sleep(0.001)
        assert slot[ring.CODE_NOT_YET] == 0  # taken, so the next poll runs its course
        restored.not_yet()  # once only: nothing is written a second time
        assert slot[ring.CODE_NOT_YET] == 0
        reply = restored.call({"op": "run", "code": "w + 1"}, 30, fx.agent)
        assert reply is not None and parse_code_result(reply).value == "2"
        assert restored.wakes == 1  # the first run_code then wakes it, as after any sleep
    finally:
        restored._region = None  # fx.host is the fixture's to close
        restored.close()


def test_any_request_that_is_not_run_code_stops_the_poll_after_a_call(fx: Fixture) -> None:
    """Not only after a restore: a polling worker would slow the agent serving a files or
    exec request, so the host's ``not_yet`` before it stops the poll after any call."""
    reply = None
    while reply is None:  # a poll far longer than the test: only CODE_NOT_YET ends it in time
        reply = fx.code.call({"op": "run", "code": "v = 1", "linger": 120}, 30, fx.agent)
    slot = fx.ctl(2)
    assert not slot[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    fx.code.not_yet()
    deadline = time.monotonic() + 30
    while not slot[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING:
        assert time.monotonic() < deadline, "the worker kept polling"
        time.sleep(0.001)
    fx.code.not_yet()  # asleep: nothing is written
    assert slot[ring.CODE_NOT_YET] == 0
    assert fx.ready_call("v + 1").value == "2"
    assert fx.code.wakes == 1
