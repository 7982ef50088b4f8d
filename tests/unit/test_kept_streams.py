"""An exec without stdin and a small file_write keep their connection for the next request.

On the emulated guest kernel a new vsock connection costs ~30 ms more than a kept one, and a
small upload through a ring slot two round trips; so these ops ask the agent to keep the
connection, and reuse it only when the agent's RESULT agrees (an older agent, an ERROR, or an
exec with stdin ends it). Real agent on a Unix socket (``agent_rig``), no KVM.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import protocol
from ember.client import AgentClient
from ember.client.session import INLINE_WRITE_MAX
from ember.errors import AgentError, ExecError
from ember.protocol import Kind, read_frame, write_json
from tests.unit.agent_rig import Agent


class Counting:
    """A client whose connections are counted: one per ``connect``."""

    def __init__(self, agent: Agent) -> None:
        self.connects = 0
        self._agent = agent
        self.client = AgentClient(self._connect)

    def _connect(self) -> socket.socket:
        self.connects += 1
        return self._agent.connect()


@pytest.fixture
def counting(agent: Agent) -> Iterator[Counting]:
    c = Counting(agent)
    yield c
    c.client.close()


def test_execs_writes_and_calls_share_one_connection(counting: Counting, tmp_path: Path) -> None:
    client = counting.client
    target = tmp_path / "script.py"
    assert client.files.write(str(target), b"print(6 * 7)\n") == 13
    result = client.exec(["python3", str(target)])
    assert (result.exit_code, result.stdout) == (0, b"42\n")
    stream = client.exec_stream(["sh", "-c", "echo out; echo err >&2; exit 3"])
    chunks = list(stream)
    assert stream.result is not None and stream.result.exit_code == 3
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"out\n"
    assert client.ping()["pong"] is True
    assert client.files.write(str(target), b"") == 0 and target.read_bytes() == b""
    assert counting.connects == 1


def test_an_exec_with_stdin_does_not_keep_its_connection(counting: Counting) -> None:
    client = counting.client
    assert client.exec(["cat"], stdin=b"abc").stdout == b"abc"
    client.ping()
    assert counting.connects == 2


def test_an_error_ends_the_connection_and_the_next_request_works(
    counting: Counting, tmp_path: Path
) -> None:
    client = counting.client
    with pytest.raises(ExecError):
        client.exec(["/no/such/program"])
    with pytest.raises(AgentError):
        client.files.write(str(tmp_path), b"a directory is not a file")
    assert client.exec(["true"]).exit_code == 0
    assert counting.connects == 3  # one per ERROR, then the exec's own


def test_a_big_upload_streams_and_arrives_whole(counting: Counting, tmp_path: Path) -> None:
    data = bytes(range(256)) * ((INLINE_WRITE_MAX * 3) // 256 + 1)
    target = tmp_path / "big.bin"
    assert counting.client.files.write(str(target), data) == len(data)
    assert target.read_bytes() == data
    small = b"x" * INLINE_WRITE_MAX
    assert counting.client.files.write(str(target), small) == len(small)
    assert target.read_bytes() == small


def test_a_result_without_the_agents_agreement_is_not_reused(tmp_path: Path) -> None:
    """An older agent keeps nothing: it answers (without ``keepalive``) and hangs up."""
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    requests: list[dict[str, object]] = []

    def old_agent() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                frame = read_frame(conn)
                assert frame is not None and frame[0] is Kind.REQUEST
                request = protocol.decode_json(frame[1])
                requests.append(request)
                if request["op"] == "file_write":
                    while (f := read_frame(conn)) is not None and f[0] is not Kind.DATA_EOF:
                        pass
                    write_json(conn, Kind.RESULT, {"size": 2})
                else:
                    write_json(
                        conn,
                        Kind.RESULT,
                        {"exit_code": 0, "signal": None, "timed_out": False, "duration": 0.0},
                    )

    server = threading.Thread(target=old_agent, daemon=True)
    server.start()
    connects = 0

    def connect() -> socket.socket:
        nonlocal connects
        connects += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        return sock

    client = AgentClient(connect)
    try:
        assert client.files.write("/tmp/x", b"hi") == 2
        assert client.exec(["true"]).exit_code == 0
        assert client.exec(["true"]).exit_code == 0
    finally:
        client.close()
        listener.close()
    assert connects == 3
    assert [r.get("keepalive") for r in requests] == [True, True, True]


def test_the_async_client_keeps_them_too(agent: Agent, tmp_path: Path) -> None:
    import asyncio

    from ember.client import AsyncAgentClient

    connects = 0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal connects
        connects += 1
        return await asyncio.open_unix_connection(agent.path)

    async def scenario() -> None:
        client = AsyncAgentClient(connect)
        try:
            target = tmp_path / "a.py"
            assert await client.files.write(str(target), b"print('async')\n") == 15
            result = await client.exec(["python3", str(target)])
            assert result.stdout == b"async\n"
            stream = client.exec_stream(["echo", "streamed"])
            assert [c.data async for c in stream] == [b"streamed\n"]
            assert (await client.ping())["pong"] is True
            assert (await client.exec(["cat"], stdin=b"in")).stdout == b"in"
            await client.ping()
        finally:
            await client.close()

    asyncio.run(scenario())
    assert connects == 2  # the exec with stdin ended its connection; the rest shared one
