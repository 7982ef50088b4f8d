"""``ember mcp`` driven by the official ``mcp`` package's own client over stdio: an AI agent's
view of Ember (in-process sandboxes; the tools' daemon mode is the SDK's server= path)."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

pytestmark = pytest.mark.kvm

TOOLS = {"create_sandbox", "run_code", "exec_command", "read_file", "write_file", "list_files",
         "kill_sandbox"}  # fmt: skip


def structured(result: Any) -> Any:
    assert not result.is_error, result.content
    content = result.structured_content
    return content.get("result", content) if isinstance(content, dict) else content


async def session() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMBER_SERVER"}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ember.cli.main", "mcp"], env=env
    )
    async with Client(params) as client:
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == TOOLS
        sid = structured(await client.call_tool("create_sandbox", {}))["sandbox_id"]
        assert sid.startswith("sb-")
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
    asyncio.run(asyncio.wait_for(session(), 600))
