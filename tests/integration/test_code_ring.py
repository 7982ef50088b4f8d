"""run_code over memory, end to end (issue 16 item 4): the SDK and the guest's worker.

Sandboxes restored from the default template, whose worker was polling its code ring when
the snapshot was taken. Each test checks which path carried the call (the host's
``CodeRing`` counts calls and wake-ups) as well as what came back, and that the two paths
are one interpreter: state, output, ``random`` and failures are the same either way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest

from ember import AsyncSandbox, Sandbox, ring
from ember.agent.codering import SPIN_MAX_S
from ember.client import AgentClient
from ember.vmm import control

from .conftest import Images


def generation(sandbox: Sandbox) -> int:
    region = sandbox._code_ring._region
    assert region is not None
    word = ring.H_GENERATION * 8
    return int.from_bytes(region._mem[word : word + 8], "little")


@pytest.fixture
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def test_a_restored_sandbox_answers_through_the_ring_with_no_wake_up(sb: Sandbox) -> None:
    result = sb.run_code("6 * 7", timeout=60)
    assert (result.value, result.error) == ("42", None)
    assert (sb._code_ring.calls, sb._code_ring.wakes) == (1, 0)
    for i in range(20):
        assert sb.run_code(f"{i} + 1", timeout=60).value == str(i + 1)
    assert sb._code_ring.calls == 21


def test_ring_and_vsock_reach_one_interpreter(sb: Sandbox) -> None:
    vsock = AgentClient(sb._connect)  # no code ring: the agent's socketpair to the worker
    try:
        assert sb.run_code("import random\nrandom.seed(5)\nx = 1").error is None
        assert vsock.run_code("x += 1\nprint(x)\nrandom.random()").stdout == "2\n"
        third = sb.run_code("x += 1\nprint(x)\nrandom.random()")
        expected = random.Random(5)
        expected.random()
        assert (third.stdout, third.value) == ("3\n", repr(expected.random()))  # no reseed
        error = vsock.run_code("raise KeyError('k')").error
        assert error is not None and error.type == "KeyError"
        error = sb.run_code("raise KeyError('k')").error
        assert error is not None and error.type == "KeyError"
        assert "<cell-" in error.traceback and "worker.py" not in error.traceback
    finally:
        vsock.close()
    assert sb._code_ring.calls == 3


def doorbell_interrupts(sb: Sandbox) -> int:
    """The guest kernel's count of the guest bell's interrupts (``/proc/interrupts``)."""
    lines = sb.exec(["cat", "/proc/interrupts"]).stdout.decode().splitlines()
    [line] = [line for line in lines if line.rstrip().endswith("ember-doorbell")]
    return sum(int(word) for word in line.split()[1:] if word.isdigit())


def test_a_sleeping_worker_is_woken_by_the_guest_bell_then_polls_again(sb: Sandbox) -> None:
    """No vsock packet: the host rings the bell (an interrupt the guest driver turns into
    the worker's wake-up), and the agent is never asked."""
    assert sb.run_code("y = 1").error is None
    before = doorbell_interrupts(sb)
    time.sleep(SPIN_MAX_S + 0.5)
    assert sb._code_ring._req_ctl is not None
    assert sb._code_ring._req_ctl[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    assert sb.run_code("y + 1", timeout=60).value == "2"
    assert (sb._code_ring.bells, sb._code_ring.wakes) == (1, 0)
    assert sb.run_code("y + 2", timeout=60).value == "3"  # polling again: no ring
    assert (sb._code_ring.calls, sb._code_ring.bells, sb._code_ring.wakes) == (3, 1, 0)
    assert doorbell_interrupts(sb) == before + 1


def test_the_guest_bell_wakes_a_parked_sandbox(sb: Sandbox) -> None:
    """The VMM's event thread resumes a parked VM before it pulses the line."""
    assert sb.run_code("w = 7").error is None
    deadline = time.monotonic() + 300
    while not control.request(sb._vmm.control_path, "status")["paused"]:
        assert time.monotonic() < deadline, "the idle sandbox was never parked"
        time.sleep(0.2)
    assert sb.run_code("w * 6", timeout=60).value == "42"
    assert (sb._code_ring.bells, sb._code_ring.wakes) == (1, 0)


def test_a_dead_worker_is_replaced_and_an_overrunning_cell_interrupted(sb: Sandbox) -> None:
    assert sb.run_code("kept = 1").error is None
    crashed = sb.run_code("import os\nos._exit(3)", timeout=60)
    assert crashed.error is not None and crashed.error.type == "WorkerCrashed", crashed
    assert "exited with status 3" in crashed.error.message
    fresh = sb.run_code("'kept' in globals()", timeout=300)  # waits for the replacement
    assert (fresh.value, fresh.error) == ("False", None)
    # ... which was a pre-started interpreter of the pool, not a fresh python3
    assert sb.ping()["worker_replacements"] == [1, 1]
    assert sb.run_code("kept = 2\nimport os\npid = os.getpid()").error is None
    started = time.monotonic()
    over = sb.run_code("while True: pass", timeout=1)  # through the ring
    assert over.error is not None and over.error.type == "WorkerTimeout", over
    assert "interrupted" in over.error.message, over
    assert time.monotonic() - started < 30
    seen: list[str] = []
    streamed = sb.run_code(  # through vsock: the agent interrupts it itself
        "print('tick', flush=True)\nimport time\nwhile True: time.sleep(0.05)",
        timeout=1,
        on_stdout=seen.append,
    )
    assert streamed.error is not None and streamed.error.type == "WorkerTimeout", streamed
    assert "interrupted" in streamed.error.message and seen == ["tick\n"]
    # Both times the same worker carried on, its namespace intact.
    assert sb.run_code("kept + 1, pid == os.getpid()").value == "(3, True)"


def test_a_fork_continues_on_rings_of_its_own(sb: Sandbox) -> None:
    assert sb.run_code("z = 'parent'").error is None
    with sb.fork() as child:
        # The first call finds the worker polling if the fork took less than its window,
        # else asleep (vsock, which makes it announce itself): the next one is a ring's.
        assert child.run_code("z", timeout=60).value == "'parent'"
        before = child._code_ring.calls
        assert child.run_code("z = 'child'").error is None
        assert child._code_ring.calls == before + 1
        assert generation(child) != generation(sb)  # the VMM's fresh region, not a copy
    assert sb.run_code("z").value == "'parent'"


def test_the_async_sandbox_uses_the_ring_too(images: Images) -> None:
    async def main() -> tuple[str | None, int]:
        async with AsyncSandbox() as sb:
            results = await asyncio.gather(*(sb.run_code(f"{i} * 2") for i in range(5)))
            assert [r.value for r in results] == [str(i * 2) for i in range(5)]
            return (await sb.run_code("'done'")).value, sb._code_ring.calls

    value, calls = asyncio.run(main())
    assert (value, calls) == ("'done'", 6)


def test_an_idle_sandbox_stops_polling(sb: Sandbox) -> None:
    """Polling costs a vCPU: a call that asks to linger is polled for that long, an ordinary
    call for at most SPIN_MAX_S, then the worker sleeps and the vCPU is idle."""

    def vcpu_seconds() -> float:
        return float(sum(sb._vmm.control("status")["vcpu_cpu_s"]))

    assert sb._client.run_code("1", timeout=60, linger=0.8).error is None
    busy = vcpu_seconds()
    time.sleep(0.5)
    polled = vcpu_seconds() - busy  # the worker polled through this window
    assert sb.run_code("2", timeout=60).error is None
    time.sleep(SPIN_MAX_S + 0.2)
    ctl = sb._code_ring._req_ctl
    assert ctl is not None and ctl[ring.CONSUMER_FLAGS] & ring.CONSUMER_SLEEPING
    quiet = vcpu_seconds()
    time.sleep(1.0)
    idle = vcpu_seconds() - quiet
    assert polled > idle and idle < 0.2, (polled, idle)


def test_an_idle_guest_skips_its_housekeeping(sb: Sandbox) -> None:
    """The kernel command line (vmm.config.QUIET_SYSCTLS) turns off proactive compaction,
    whose kcompactd wakes an idle guest every 500 ms, and slows vmstat's fold, which would
    run at the guest's next wake-up: once the worker stops polling, the vCPU stays halted."""
    names = ("compaction_proactiveness", "stat_interval")
    got = sb.run_code(f"[open('/proc/sys/vm/' + n).read().strip() for n in {names!r}]")
    assert got.value == "['0', '60']", got

    def halts() -> int:
        return int(sb._vmm.control("kvm-stats")["vcpus"]["halt_exits"])

    time.sleep(SPIN_MAX_S + 0.2)  # the worker polled, then slept
    windows: list[int] = []
    for _ in range(3):
        assert sb.ping()["pong"] is True
        time.sleep(0.3)  # the agent's answer and its wake-ups are done
        before = halts()
        time.sleep(1.2)  # two of kcompactd's wake-ups
        after = halts()
        if not sb._vmm.control("status")["paused"]:  # a parked guest proves nothing
            windows.append(after - before)
    assert windows, "the sandbox was parked in every window"
    assert min(windows) == 0, windows
