"""AsyncSandbox: the same operations as Sandbox, awaited, several at once."""

from __future__ import annotations

import asyncio

from ember.sandbox import AsyncSandbox
from tests.integration.conftest import Images


def test_async_sandbox_runs_concurrent_operations(images: Images) -> None:
    async def scenario() -> None:
        async with AsyncSandbox() as sb:
            pong = await sb.ping()
            assert pong["pong"] is True
            results = await asyncio.gather(
                *(sb.exec(["echo", str(i)], timeout=300) for i in range(5))
            )
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(5)]
            chunks = [c async for c in sb.exec_stream("echo a; echo b >&2", timeout=300)]
            assert {(c.stream, c.data) for c in chunks} == {("stdout", b"a\n"), ("stderr", b"b\n")}
            await sb.files.write("/tmp/x.txt", b"payload")
            assert await sb.files.read("/tmp/x.txt") == b"payload"
            assert (await sb.run_code("21 * 2", timeout=300)).value == "42"

    asyncio.run(scenario())
