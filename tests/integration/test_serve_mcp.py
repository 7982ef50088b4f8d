"""``ember mcp`` driven by the official ``mcp`` package's own client, over stdio (in-process
sandboxes) and over streamable HTTP under a real daemon (the daemon's sandboxes): an AI
agent's view of Ember."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.integration.serve_daemon import running_daemon

pytestmark = pytest.mark.kvm

TOOLS = {"create_sandbox", "run_code", "exec_command", "read_file", "write_file", "list_files",
         "kill_sandbox"}  # fmt: skip


def structured(result: Any) -> Any:
    assert not result.is_error, result.content
    content = result.structured_content
    return content.get("result", content) if isinstance(content, dict) else content


async def session(server: Any, seen: list[str] | None = None) -> None:
    """The whole tool set, as an agent would use it; ``seen`` gets the sandbox's id."""
    async with Client(server) as client:
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == TOOLS
        sid = structured(await client.call_tool("create_sandbox", {}))["sandbox_id"]
        assert sid.startswith("sb-")
        if seen is not None:
            seen.append(sid)
        assert (
            structured(await client.call_tool("run_code", {"sandbox_id": sid, "code": "x = 6"}))[
                "error"
            ]
            is None
        )
        r = structured(await client.call_tool("run_code", {"sandbox_id": sid, "code": "x * 7"}))
        assert r["value"] == "42"
        args = {"sandbox_id": sid, "command": ["sh", "-c", "echo hi; exit 5"]}
        r = structured(await client.call_tool("exec_command", args))
        assert (r["exit_code"], r["stdout"]) == (5, "hi\n")
        args = {"sandbox_id": sid, "path": "/tmp/m/note.txt", "content": "hello mcp"}
        assert structured(await client.call_tool("write_file", args)) == {"size": 9}
        args = {"sandbox_id": sid, "path": "/tmp/m/note.txt"}
        assert structured(await client.call_tool("read_file", args)) == "hello mcp"
        listed = structured(
            await client.call_tool("list_files", {"sandbox_id": sid, "path": "/tmp/m"})
        )
        assert listed == [{"name": "note.txt", "size": 9, "is_dir": False}]
        failed = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/nope"})
        assert failed.is_error
        assert structured(await client.call_tool("kill_sandbox", {"sandbox_id": sid})) == {
            "killed": True
        }
        gone = await client.call_tool("run_code", {"sandbox_id": sid, "code": "1"})
        assert gone.is_error


def test_mcp_stdio_tools() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMBER_SERVER"}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ember.cli.main", "mcp"], env=env
    )
    asyncio.run(asyncio.wait_for(session(params), 600))


def test_mcp_over_http_under_the_daemon(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        with daemon.client() as api:
            before = api.get("/sandboxes").json()["sandboxes"]
        seen: list[str] = []
        headers = {"Authorization": f"Bearer {daemon.token}"}
        http = create_mcp_http_client(headers=headers)
        transport = streamable_http_client(f"{daemon.url}/mcp/", http_client=http)
        asyncio.run(asyncio.wait_for(session(transport, seen), 600))
        with daemon.client() as api:
            # the tools' sandbox was the daemon's: listed while it lived, gone once killed
            assert api.get(f"/sandboxes/{seen[0]}").status_code == 404
            assert api.get("/sandboxes").json()["sandboxes"] == before
            refused = api.post("/mcp/", headers={"Authorization": "Bearer wrong"}, json={})
            assert refused.status_code == 401
