"""AsyncSandbox's exec output through a leased slot of the shared region, on a real VM.

The twin of ``test_memory_channels.test_exec_output_crosses_a_ring_and_arrives_whole``
for the asyncio client: the agent reads the command's pipes straight into the ring and
the host merges its records with the RESULT frame. Each test checks that the ring really
carried the output (the slot's ``records``, the region's ``leases``), that it arrived
whole per stream, that the slot goes back however the exec ends, and that ``max_output``
and timeouts give the same outcome as over frames (forced by holding every free slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from ember.client import HostRegion
from ember.errors import OutputTooLarge, SandboxTimeout
from ember.sandbox import AsyncSandbox
from tests.integration.conftest import Images

T = TypeVar("T")
BOTH = (  # 3 MB of stdout (many 64 KiB records), 200 kB of stderr, a status of its own
    "head -c 3000000 /dev/zero | tr '\\0' 'z'; head -c 200000 /dev/zero | tr '\\0' 'e' >&2; exit 7"
)


def run(scenario: Callable[[AsyncSandbox, HostRegion], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncSandbox() as sb:
            region = await asyncio.to_thread(sb._region)
            assert region is not None, "the sandbox has no shared region"
            return await scenario(sb, region)

    return asyncio.run(main())


def test_async_exec_output_crosses_a_ring_whole_and_the_slot_comes_back(images: Images) -> None:
    async def scenario(sb: AsyncSandbox, region: HostRegion) -> None:
        spare, before = len(region._free), region.leases
        result = await sb.exec(["sh", "-c", BOTH], timeout=300, max_output=None)
        assert region.leases == before + 1  # the output went through a slot
        assert (result.exit_code, result.stdout, result.stderr) == (
            7, b"z" * 3_000_000, b"e" * 200_000,
        )  # fmt: skip
        assert len(region._free) == spare  # and the slot is back

        stream = sb._client.exec_stream(["sh", "-c", BOTH], timeout=300)
        out, err = bytearray(), bytearray()
        async with stream:
            async for chunk in stream:
                (out if chunk.stream == "stdout" else err).extend(chunk.data)
        assert stream._output is not None and stream._output.records > 45  # 64 KiB each
        assert (bytes(out), bytes(err)) == (b"z" * 3_000_000, b"e" * 200_000)
        assert stream.result is not None and stream.result.exit_code == 7
        assert len(region._free) == spare

        early = sb.exec_stream(["sh", "-c", "echo up; exec sleep 600"], timeout=600)
        assert (await early.__anext__()).data == b"up\n"
        assert len(region._free) == spare - 1  # leased while the stream lives
        await early.aclose()  # hangs up: the agent kills the command
        assert len(region._free) == spare
        chunks = [(c.stream, c.data) async for c in sb.exec_stream("echo a; echo b >&2")]
        assert sorted(chunks) == [("stderr", b"b\n"), ("stdout", b"a\n")]
        echoed = await sb.exec(["cat"], stdin=b"through stdin and back" * 5000, timeout=300)
        assert echoed.stdout == b"through stdin and back" * 5000
        assert region.leases == before + 5 and len(region._free) == spare

    run(scenario)


def test_async_limits_and_timeouts_through_the_ring_match_frames(images: Images) -> None:
    async def outcomes(sb: AsyncSandbox) -> tuple[object, ...]:
        with pytest.raises(OutputTooLarge):
            await sb.exec(["head", "-c", "500000", "/dev/zero"], timeout=300, max_output=100_000)
        # 10 s: the echo surely runs first, even on an emulated guest kernel
        with pytest.raises(SandboxTimeout) as timed_out:
            await sb.exec(["sh", "-c", "echo started; echo err >&2; exec sleep 600"], timeout=10)
        partial = timed_out.value.result
        assert partial is not None
        return partial.stdout, partial.stderr, partial.timed_out, partial.exit_code

    async def scenario(sb: AsyncSandbox, region: HostRegion) -> None:
        before = region.leases
        through_ring = await outcomes(sb)
        assert region.leases == before + 2
        held = []
        while (lease := region.lease(0)) is not None:  # every free slot: frames it is
            held.append(lease)
        try:
            through_frames = await outcomes(sb)
        finally:
            for lease in held:
                region.release(lease)
        assert region.leases == before + 2 + len(held)  # the held ones only
        assert through_ring == through_frames == (b"started\n", b"err\n", True, None)

    run(scenario)
