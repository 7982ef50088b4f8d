"""Spare sandboxes (ember.sandbox.spares) with real VMs: ``Sandbox()`` hands over one that
was restored and warmed in the background, never the same one twice, never one whose VM
died or whose template was rebuilt, and each is a sandbox of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from ember import AsyncSandbox, ConfigError, Sandbox, keep_warm
from ember.launcher import VmmProcess
from ember.sandbox.spares import SpareKey, spare_key, spare_pool
from ember.spec import SandboxSpec
from tests.waiting import alive, wait_for

pytestmark = pytest.mark.kvm

READY_S = 120.0  # a restore and two first calls; generous for a loaded CI host


def key_of(template: str | None = None) -> SpareKey:
    key = spare_key(SandboxSpec(), template, False)
    assert key is not None
    return key


def waiting_vmms(key: SpareKey) -> list[VmmProcess]:
    """The VMMs of the spares waiting for ``key`` (read under the pool's lock)."""
    pool = spare_pool()
    with pool._lock:
        return [s.item.vmm for s in pool._ready.get(key, ())]


def waiting_vmm_pids(key: SpareKey) -> list[int | None]:
    return [vmm.vmm_pid for vmm in waiting_vmms(key)]


@pytest.fixture
def spares_of() -> Iterator[list[dict[str, object]]]:
    """keep_warm's option sets used by a test; none is left warm after it."""
    used: list[dict[str, object]] = []
    yield used
    for options in used:
        keep_warm(0, **options)  # type: ignore[arg-type]


def test_sandbox_takes_a_warm_spare_and_a_new_one_is_made(
    spares_of: list[dict[str, object]],
) -> None:
    spares_of.append({})
    keep_warm(1)
    key = key_of()
    assert spare_pool().wait_ready(key, 1, READY_S)
    [waiting] = waiting_vmm_pids(key)
    taken_before = spare_pool().taken
    with Sandbox() as first:
        assert first._vmm.vmm_pid == waiting
        assert spare_pool().taken == taken_before + 1
        pool = first.ping()["pool"]  # its first interpreters rehearsed a start while it waited
        assert pool["size"] == pool["ready"] and pool["rehearsed"] == min(pool["size"], 2)
        assert first.exec(["python3", "-c", "print('hi')"]).stdout == b"hi\n"
        assert first.ping()["pool"]["served"] == pool["served"] + 1
        assert first.exec(["echo", "hi"]).stdout == b"hi\n"
        first_random = first.run_code("import random; random.random()").value
        # It is the caller's now: its kept connection expires as usual, so it can park.
        wait_for(lambda: len(first._client._kept) == 0, 30, "the kept connection expiring")
        assert spare_pool().wait_ready(key, 1, READY_S)
        [refill] = waiting_vmm_pids(key)
        assert refill != waiting
        with Sandbox() as second:
            assert second._vmm.vmm_pid == refill
            # Siblings restored from one template do not share their random state.
            assert second.run_code("import random; random.random()").value != first_random
            assert second.ping()["pong"]
    assert not alive(waiting) and not alive(refill)


def test_other_options_do_not_get_the_spare(spares_of: list[dict[str, object]]) -> None:
    spares_of.append({})
    keep_warm(1)
    key = key_of()
    assert spare_pool().wait_ready(key, 1, READY_S)
    [waiting] = waiting_vmm_pids(key)
    with Sandbox(pids=64) as other:  # its own cgroup: another shape of sandbox
        assert other._vmm.vmm_pid != waiting
        assert other.cgroup is not None
    assert waiting_vmm_pids(key) == [waiting]


def test_a_spare_whose_vm_died_is_not_handed_out(spares_of: list[dict[str, object]]) -> None:
    spares_of.append({})
    keep_warm(1)
    key = key_of()
    assert spare_pool().wait_ready(key, 1, READY_S)
    [spare] = waiting_vmms(key)
    assert spare.vmm_pid is not None
    os.kill(spare.vmm_pid, signal.SIGKILL)
    # Its exit as the pool sees it: the leader of a threaded process shows as a zombie in
    # /proc before its vCPU threads are gone, and only then does its pidfd say it ended.
    wait_for(spare.exited, 10, "the spare's VMM to die")
    with Sandbox() as sb:
        assert sb._vmm is not spare and sb._vmm.vmm_pid != spare.vmm_pid
        assert sb.exec(["true"]).exit_code == 0


def test_a_template_rebuilt_in_place_drops_its_old_spares(
    spares_of: list[dict[str, object]],
) -> None:
    with Sandbox() as maker:
        maker.files.write("/tmp/which", b"first")
        maker.snapshot("spare-rebuilt")
        spares_of.append({"template": "spare-rebuilt"})
        keep_warm(1, template="spare-rebuilt")
        key = key_of("spare-rebuilt")
        assert spare_pool().wait_ready(key, 1, READY_S)
        [old] = waiting_vmm_pids(key)
        maker.files.write("/tmp/which", b"second")
        maker.snapshot("spare-rebuilt")
    with Sandbox(template="spare-rebuilt") as sb:
        assert sb._vmm.vmm_pid != old
        assert sb.files.read("/tmp/which") == b"second"
    wait_for(lambda: not alive(old), 10, "the stale spare to be closed")


def test_keep_warm_zero_closes_the_waiting_spares() -> None:
    keep_warm(1)
    key = key_of()
    assert spare_pool().wait_ready(key, 1, READY_S)
    [waiting] = waiting_vmm_pids(key)
    keep_warm(0)
    wait_for(lambda: not alive(waiting), 20, "the spare's VMM to be closed")
    assert spare_pool().ready(key) == 0


def test_spares_are_not_for_networks_or_cold_boots() -> None:
    with pytest.raises(ConfigError, match="network"):
        keep_warm(1, network=True)
    with pytest.raises(ConfigError):
        keep_warm(1, boot=True)


def test_ember_spares_in_the_environment_warms_what_the_process_uses() -> None:
    """A fresh process: $EMBER_SPARES=1 keeps one spare of each option set it uses, and
    the process leaves no VMM behind when it exits."""
    script = textwrap.dedent(
        """
        from ember import Sandbox
        from ember.spec import SandboxSpec
        from ember.sandbox.spares import spare_key, spare_pool
        key = spare_key(SandboxSpec(), None, False)
        with Sandbox() as sb:
            first = sb._vmm.vmm_pid
        assert spare_pool().wait_ready(key, 1, 120)
        with Sandbox() as sb:
            print(first, sb._vmm.vmm_pid, spare_pool().taken, flush=True)
        assert spare_pool().wait_ready(key, 1, 120)
        with spare_pool()._lock:
            [waiting] = spare_pool()._ready[key]
        print(waiting.item.vmm.vmm_pid, flush=True)
        """
    )
    env = dict(os.environ, EMBER_SPARES="1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    first, second, taken = out.stdout.split("\n")[0].split()
    [left] = out.stdout.split("\n")[1].split()
    assert first != second and taken == "1"
    wait_for(lambda: not alive(int(left)), 20, "the waiting spare to be closed at exit")


async def _async_takes() -> tuple[int | None, str, bool]:
    async with AsyncSandbox() as sb:
        assert sb._vmm is not None
        pid = sb._vmm.vmm_pid
        result = await sb.exec(["echo", "async"])
        pong = (await sb.ping())["pong"]
        return pid, result.stdout.decode(), bool(pong)


def test_async_sandbox_takes_a_spare_too(spares_of: list[dict[str, object]]) -> None:
    import asyncio

    spares_of.append({})
    keep_warm(1)
    key = key_of()
    assert spare_pool().wait_ready(key, 1, READY_S)
    [waiting] = waiting_vmm_pids(key)
    pid, out, pong = asyncio.run(_async_takes())
    assert (pid, out, pong) == (waiting, "async\n", True)
    assert not alive(waiting)  # closed with its AsyncSandbox
