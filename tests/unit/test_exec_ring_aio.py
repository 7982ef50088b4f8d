"""The asyncio client's exec output through a leased slot, without KVM: the real agent and
host ends on a memfd laid out like the VMM's region (the rig of test_memory_transfers).

Each test runs the same checks as its blocking twin there, awaited: the output arrives
whole, in order per stream, through the ring (``records``); ``max_output``, timeouts and
partial results keep their rules; the slot goes back on every end (the RESULT, an early
``aclose``, an exception, a cancellation, a stream dropped unclosed, a kept connection);
and a guest that breaks the ring fails the call, not the host. The ring's waits must
not hold up the event loop: one test's command only ends once another coroutine of the
same loop has run.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ember import ring
from ember.client import AsyncAgentClient
from ember.client.bounds import Deadline
from ember.client.core import EXPIRED, Incoming
from ember.client.output_ring_aio import AsyncOutputRing
from ember.client.shm import LazyRegion
from ember.client.wire import frame_header
from ember.errors import OutputTooLarge, ProtocolError, SandboxError, SandboxTimeout
from ember.protocol import Kind
from tests.unit.test_memory_transfers import BIG_OUTPUT, Rig, unknown_stream_vandal

T = TypeVar("T")
DATA_SLOTS = 2  # the rig's region: two slots to lease, two for run_code


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made = Rig(tmp_path, monkeypatch)
    try:
        yield made
    finally:
        made.close()


def run(rig: Rig, scenario: Callable[[AsyncAgentClient], Awaitable[T]]) -> T:
    """``scenario`` with an asyncio client of the rig's agent that leases the rig's slots."""

    async def main() -> T:
        client = AsyncAgentClient(
            lambda: asyncio.open_unix_connection(rig.path), shm=lambda: rig.region
        )
        try:
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(main())


def free(rig: Rig) -> int:
    return len(rig.region._free)


def test_async_exec_output_crosses_the_ring_in_order_per_stream(rig: Rig) -> None:
    async def scenario(client: AsyncAgentClient) -> int:
        out, err = bytearray(), bytearray()
        async with client.exec_stream([sys.executable, "-c", BIG_OUTPUT], timeout=60) as stream:
            async for chunk in stream:
                (out if chunk.stream == "stdout" else err).extend(chunk.data)
            assert stream._output is not None
            records = stream._output.records
        assert stream.result is not None and stream.result.exit_code == 0
        assert bytes(out) == b"".join(bytes([65 + i % 26]) * 20000 for i in range(40))
        assert err.decode() == "".join(f"e{i}" for i in range(40))
        result = await client.exec([sys.executable, "-c", BIG_OUTPUT], timeout=60)
        assert (result.stdout, result.stderr) == (bytes(out), bytes(err))
        return records

    assert run(rig, scenario) >= 13  # 800 KB of stdout in reads of at most 64 KiB
    assert rig.region.leases == 2 and free(rig) == DATA_SLOTS  # both came back


def test_async_exec_with_stdin_limits_and_timeouts_keep_their_rules(rig: Rig) -> None:
    data = os.urandom(600_000)

    async def scenario(client: AsyncAgentClient) -> None:
        result = await client.exec(["cat"], stdin=data, timeout=60, max_output=None)
        assert (result.exit_code, result.stdout) == (0, data)
        with pytest.raises(OutputTooLarge):
            await client.exec(["head", "-c", "500000", "/dev/zero"], timeout=60, max_output=100_000)
        with pytest.raises(SandboxTimeout) as timed_out:
            await client.exec(["sh", "-c", "echo started; sleep 30"], timeout=0.5)
        partial = timed_out.value.result
        assert partial is not None and partial.stdout == b"started\n" and partial.timed_out

    run(rig, scenario)
    assert rig.region.leases == 3 and free(rig) == DATA_SLOTS


def test_an_async_stream_closed_early_cancelled_or_dropped_gives_its_slot_back(
    rig: Rig,
) -> None:
    async def scenario(client: AsyncAgentClient) -> None:
        stream = client.exec_stream(["sh", "-c", "echo up; exec sleep 30"], timeout=60)
        assert (await stream.__anext__()).data == b"up\n"
        assert free(rig) == DATA_SLOTS - 1  # leased while it lives
        await stream.aclose()
        assert free(rig) == DATA_SLOTS

        task = asyncio.create_task(client.exec(["sh", "-c", "echo up; exec sleep 30"]))
        for _ in range(3000):  # until the exec holds its slot (the test's own bound: 30 s)
            if free(rig) < DATA_SLOTS:
                break
            await asyncio.sleep(0.01)
        assert free(rig) == DATA_SLOTS - 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert free(rig) == DATA_SLOTS

        dropped = client.exec_stream(["sh", "-c", "echo up; exec sleep 30"], timeout=60)
        assert (await dropped.__anext__()).data == b"up\n"
        assert free(rig) == DATA_SLOTS - 1
        del dropped
        gc.collect()
        assert free(rig) == DATA_SLOTS  # dropped: the slot is back, and the command hung up
        result = await client.exec(["echo", "next"], timeout=60)
        assert result.stdout == b"next\n"

    run(rig, scenario)
    assert rig.region.leases == 4  # the last one through the ring again


def test_a_kept_connection_carries_the_next_exec_and_each_gets_a_slot(rig: Rig) -> None:
    async def scenario(client: AsyncAgentClient) -> None:
        stream = client.exec_stream(["echo", "one"], timeout=60)
        assert [c.data async for c in stream] == [b"one\n"]
        assert stream._output is not None and stream._output.records == 1
        assert len(client._pool) == 1 and free(rig) == DATA_SLOTS  # kept; the slot is back
        kept = client._pool._kept[0][0]
        del stream
        gc.collect()
        assert not kept[1].is_closing()  # the ended stream's finalizer leaves it alone
        second = await client.exec(["sh", "-c", "echo two >&2"], timeout=60)
        assert second.stderr == b"two\n"
        assert [conn for conn, _ in client._pool._kept] == [kept]  # it carried the second

    run(rig, scenario)
    assert rig.region.leases == 2 and free(rig) == DATA_SLOTS


def test_the_ring_waits_leave_the_event_loop_free(rig: Rig, tmp_path: Path) -> None:
    """The command ends only once another coroutine of this loop has run: a wait that held
    the loop would run it into its timeout instead."""
    flag = tmp_path / "go"
    script = f"echo waiting; while [ ! -e {flag} ]; do sleep 0.01; done; echo went >&2"

    async def scenario(client: AsyncAgentClient) -> None:
        async def release() -> None:
            await asyncio.sleep(0.2)
            flag.touch()

        releaser = asyncio.create_task(release())
        result = await client.exec(["sh", "-c", script], timeout=30)
        await releaser
        assert (result.stdout, result.stderr) == (b"waiting\n", b"went\n")

    run(rig, scenario)
    assert rig.region.leases == 1


def test_no_free_slot_or_an_agent_that_ignores_it_means_frames(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember.agent import execute

    async def scenario(client: AsyncAgentClient) -> None:
        held = [rig.region.lease(0) for _ in range(DATA_SLOTS)]  # every data slot is busy
        stream = client.exec_stream(["sh", "-c", "echo out; echo err >&2"], timeout=60)
        chunks = [(c.stream, c.data) async for c in stream]
        assert stream._output is None
        assert sorted(chunks) == [("stderr", b"err\n"), ("stdout", b"out\n")]
        for lease in held:
            assert lease is not None
            rig.region.release(lease)

        monkeypatch.setattr(execute, "leased_slot", lambda req: None)  # as an older agent
        stream = client.exec_stream(["sh", "-c", "echo out; echo err >&2"], timeout=60)
        chunks = [(c.stream, c.data) async for c in stream]
        assert stream._output is not None and stream._output.records == 0
        assert sorted(chunks) == [("stderr", b"err\n"), ("stdout", b"out\n")]

    run(rig, scenario)
    assert free(rig) == DATA_SLOTS


def test_an_output_record_of_no_known_stream_is_a_protocol_error(rig: Rig) -> None:

    async def scenario(client: AsyncAgentClient) -> None:
        with pytest.raises(ProtocolError, match="no known stream"):
            await client.exec(["true"], timeout=30)

    rig.server._ops["exec"] = unknown_stream_vandal
    run(rig, scenario)
    assert free(rig) == DATA_SLOTS


def test_records_published_before_the_frame_are_handed_over_first(rig: Rig) -> None:
    """The agent publishes its last records, then sends the RESULT: a wait that ends on
    both at once must still hand the records over first (after it, the op reads no more);
    a deadline gone by is EXPIRED with the frame's read pending, and closing cancels it."""
    from ember.agent import filering

    result = (Kind.RESULT, b'{"exit_code": 0}')

    async def scenario() -> list[Incoming]:
        output = AsyncOutputRing.lease(rig.region)
        assert output is not None
        slot = filering.Slot(output.fields())
        guest = ring.RingWriter(slot.ctl, slot.data, slot.bell, lambda: None)
        conn = asyncio.StreamReader()
        first = asyncio.create_task(output.receive(conn, None))
        while output._frame is None:  # until it waits on the ring and the connection
            await asyncio.sleep(0)
        guest.send(memoryview(bytes([Kind.STDOUT]) + b"last words"))
        conn.feed_data(b"".join(frame_header(*result)))
        got = [await first, await output.receive(conn, None)]
        late = Deadline(1.0, "the test's exec", at=time.monotonic() - 1)
        got.append(await output.receive(conn, late))
        pending = output._frame
        assert pending is not None and not pending.done()  # the next frame, still unread
        output.close()
        await asyncio.sleep(0)
        assert pending.cancelled() and output.records == 1
        return got

    assert asyncio.run(scenario()) == [(Kind.STDOUT, b"last words"), result, EXPIRED]
    assert free(rig) == DATA_SLOTS


def test_a_region_asked_for_too_early_is_still_there_once_the_sandbox_runs() -> None:
    """An exec before ``start()`` asks the lazy region first: its error must not lose the
    region for the channels, code rings and file transfers that come later."""
    running = False
    region = object()

    def factory() -> object:
        if not running:
            raise SandboxError("this sandbox is not running")
        return region

    lazy = LazyRegion(factory)  # type: ignore[arg-type]
    with pytest.raises(SandboxError):
        lazy()
    running = True
    assert lazy() is region and lazy() is region
