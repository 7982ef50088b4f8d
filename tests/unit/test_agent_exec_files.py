"""``exec(..., files=...)``: a command's files written by the agent in the same request.

A real agent on a Unix socket (``agent_rig``), the production clients. What must hold:
the files are in place before the command starts (the command reads them), they are
written as ``files.write`` writes (parents created, an old file's mode kept, atomically),
and a request whose files cannot be written starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from ember.errors import AgentIsADirectoryError
from ember.protocol import Kind, read_frame, write_json
from tests.unit.agent_rig import Agent

SCRIPT = b"import sys, pathlib\nprint(pathlib.Path(sys.argv[1]).read_text(), sys.argv[2:])\n"


def test_the_files_are_in_place_before_the_command_starts(agent: Agent, tmp_path: Path) -> None:
    script, data = tmp_path / "new" / "dir" / "s.py", tmp_path / "in.txt"
    r = agent.client.exec(
        [sys.executable, str(script), str(data), "a", "b"],
        files={str(script): SCRIPT, str(data): b"from the host"},
    )
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"from the host ['a', 'b']\n", b"")
    assert script.read_bytes() == SCRIPT and stat.S_IMODE(script.stat().st_mode) == 0o644
    assert [p.name for p in script.parent.iterdir()] == ["s.py"]  # no temporary file left


def test_a_replaced_file_keeps_its_mode_and_streams_see_the_files(
    agent: Agent, tmp_path: Path
) -> None:
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho old\n")
    tool.chmod(0o750)
    with agent.client.exec_stream([str(tool)], files={str(tool): b"#!/bin/sh\necho new\n"}) as s:
        out = b"".join(chunk.data for chunk in s)
    assert out == b"new\n" and s.result is not None and s.result.exit_code == 0
    assert stat.S_IMODE(tool.stat().st_mode) == 0o750


def test_the_async_client_sends_them_too(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "async.txt"

    async def go() -> bytes:
        client = agent.aclient()
        try:
            r = await client.exec(["cat", str(path)], files={str(path): b"async bytes"})
        finally:
            await client.close()
        return r.stdout

    assert asyncio.run(go()) == b"async bytes"


def test_a_file_that_cannot_be_written_starts_nothing(agent: Agent, tmp_path: Path) -> None:
    marker, directory = tmp_path / "ran", tmp_path / "a-dir"
    directory.mkdir()
    with pytest.raises(AgentIsADirectoryError):
        agent.client.exec(
            ["touch", str(marker)], files={str(tmp_path / "ok"): b"1", str(directory): b"2"}
        )
    assert not marker.exists()
    assert (tmp_path / "ok").read_bytes() == b"1"  # written in order, up to the failure
    assert agent.client.exec(["echo", "still serving"]).stdout == b"still serving\n"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ("not a list", "must be a list"),
        ([["/tmp/x", "eA=="]], "must be a list"),
        ([{"path": "/tmp/x", "data": 7}], "base64 text"),
        ([{"path": "/tmp/x", "data": "not base64!"}], "not valid base64"),
        ([{"path": "relative", "data": "eA=="}], "absolute path"),
        ([{"data": "eA=="}], "'path' must be a string"),
    ],
)
def test_a_malformed_files_field_is_a_bad_request(
    agent: Agent, tmp_path: Path, files: object, message: str
) -> None:
    """What a hostile or broken host could send, past the client's own checks."""
    marker = tmp_path / "ran"
    with agent.connect() as sock:
        request = {"op": "exec", "argv": ["touch", str(marker)], "files": files}
        write_json(sock, Kind.REQUEST, request)
        frame = read_frame(sock)
    assert frame is not None and frame[0] is Kind.ERROR
    error = json.loads(frame[1])
    assert error["type"] == "BadRequest" and message in error["message"], error
    assert not marker.exists()


def test_client_side_checks_send_nothing(agent: Agent, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        agent.client.exec(["true"], files={"rel/path": b""})
    with pytest.raises(ValueError, match="512 KiB"):
        agent.client.exec(["true"], files={str(tmp_path / "big"): bytes(513 << 10)})
    assert not os.path.exists(tmp_path / "big")
