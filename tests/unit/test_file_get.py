"""``file_get``: a small file read whole in one short exchange on a kept connection.

A real agent on a Unix socket (``agent_rig``) and the production clients, and the op's
state machine fed frames as an agent of each kind would send them. What must hold: a read
of a file up to ``FILE_GET_MAX`` bytes costs no new connection, a larger one (or one over
the caller's ``max_output``) is read or refused exactly as before, errors keep their types,
and an agent from before the op is asked once and then read the old way.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import protocol
from ember.client import AgentClient, AsyncAgentClient
from ember.client.file_get import GetFile, get_limit
from ember.client.session import Session
from ember.errors import (
    AgentFileNotFoundError,
    AgentIsADirectoryError,
    OutputTooLarge,
    ProtocolError,
)
from ember.protocol import CHUNK_SIZE, FILE_GET_MAX, Kind, read_frame, write_json
from tests.unit.agent_rig import Agent


class Counting:
    """Opens the agent's connections and counts them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.opened = 0

    def __call__(self) -> socket.socket:
        self.opened += 1
        return self.agent.connect()


@pytest.fixture
def counted(agent: Agent) -> Iterator[tuple[AgentClient, Counting]]:
    connect = Counting(agent)
    client = AgentClient(connect)
    yield client, connect
    client.close()


def test_small_files_come_whole_on_one_kept_connection(
    counted: tuple[AgentClient, Counting], tmp_path: Path
) -> None:
    client, connect = counted
    contents = [b"", b"x", b"print('hi')\n", bytes(range(256)) * 8, b"z" * FILE_GET_MAX]
    for n, data in enumerate(contents):
        (tmp_path / f"f{n}").write_bytes(data)
    for _ in range(2):
        for n, data in enumerate(contents):
            assert client.files.read(tmp_path / f"f{n}") == data
    assert connect.opened == 1  # file_read: a connection of its own for each of the ten
    sink = io.BytesIO()  # read_into is for big files: it streams at once, no file_get first
    assert client.files.read_into(tmp_path / "f2", sink) == len(contents[2])
    assert sink.getvalue() == contents[2] and connect.opened == 2


def test_a_file_larger_than_file_get_max_is_read_as_before(
    counted: tuple[AgentClient, Counting], tmp_path: Path
) -> None:
    client, connect = counted
    big = bytes(range(251)) * (FILE_GET_MAX // 251 + 1)
    assert len(big) > FILE_GET_MAX
    (tmp_path / "big").write_bytes(big)
    assert client.files.read(tmp_path / "big") == big
    assert connect.opened == 2  # the kept one (file_get said "not whole"), then file_read's


def test_max_output_errors_and_the_connection_keep_their_meaning(
    counted: tuple[AgentClient, Counting], tmp_path: Path
) -> None:
    client, connect = counted
    (tmp_path / "f").write_bytes(b"12345")
    with pytest.raises(OutputTooLarge):  # over the caller's limit: file_read says so
        client.files.read(tmp_path / "f", max_output=4)
    assert client.files.read(tmp_path / "f", max_output=5) == b"12345"
    assert client.files.read(tmp_path / "f", max_output=None) == b"12345"
    opened = connect.opened
    with pytest.raises(AgentFileNotFoundError):
        client.files.read(tmp_path / "missing")
    with pytest.raises(AgentIsADirectoryError):
        client.files.read(tmp_path)
    assert client.files.read(tmp_path / "f") == b"12345"
    assert connect.opened == opened  # an ERROR to a short exchange keeps its connection


def test_a_file_whose_size_the_kernel_does_not_know_is_read_to_its_end(
    counted: tuple[AgentClient, Counting],
) -> None:
    client, _ = counted
    status = client.files.read("/proc/self/status")  # st_size 0, ~1 KiB of text
    assert status.startswith(b"Name:") and status.endswith(b"\n")


def test_the_async_client_reads_small_files_whole_too(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"async bytes")
    opened = 0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal opened
        opened += 1
        return await asyncio.open_unix_connection(agent.path)

    async def main() -> list[bytes]:
        client = AsyncAgentClient(connect)
        try:
            return [await client.files.read(tmp_path / "f") for _ in range(3)]
        finally:
            await client.close()

    assert asyncio.run(main()) == [b"async bytes"] * 3
    assert opened == 1


@pytest.mark.parametrize("bad", [None, -1, CHUNK_SIZE, True, "10"])
def test_the_agent_refuses_a_max_it_cannot_serve(agent: Agent, bad: object) -> None:
    with agent.connect() as sock:
        write_json(sock, Kind.REQUEST, {"op": "file_get", "path": "/proc/self/status", "max": bad})
        frame = read_frame(sock)
    assert frame is not None and frame[0] is Kind.ERROR
    assert json.loads(frame[1])["type"] == "BadRequest"


def test_the_agent_answers_a_larger_file_with_its_result_alone(
    agent: Agent, tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(b"123456")
    with agent.connect() as sock:
        for limit, expected in ((6, [(Kind.DATA, b"123456")]), (5, [])):
            request = {"op": "file_get", "path": str(tmp_path / "f"), "max": limit}
            write_json(sock, Kind.REQUEST, {**request, "keepalive": True})
            frames = []
            while (frame := read_frame(sock)) is not None and frame[0] is Kind.DATA:
                frames.append(frame)
            assert frames == expected
            assert frame is not None and frame[0] is Kind.RESULT
            whole = bool(expected)
            assert json.loads(frame[1]) == {"size": 6 if whole else None, "whole": whole}
        # A size the kernel does not know (0 in /proc) is learnt by reading: over 10 bytes.
        request = {"op": "file_get", "path": "/proc/self/status", "max": 10, "keepalive": True}
        write_json(sock, Kind.REQUEST, request)
        frame = read_frame(sock)
        assert frame is not None and frame[0] is Kind.RESULT
        assert json.loads(frame[1]) == {"size": None, "whole": False}


# -- the op, fed frames --------------------------------------------------------------------


def session() -> Session:
    return Session(grace=1.0, call_timeout=10.0, clock=lambda: 1000.0)


def result(obj: object) -> tuple[Kind, bytes]:
    return Kind.RESULT, json.dumps(obj).encode()


def error(type_name: str, message: str) -> tuple[Kind, bytes]:
    return Kind.ERROR, protocol.error_payload(type_name, message)


def test_get_asks_for_at_most_what_the_caller_takes() -> None:
    assert get_limit(None) == FILE_GET_MAX
    assert get_limit(10) == 10
    assert get_limit(FILE_GET_MAX * 4) == FILE_GET_MAX
    s = session()
    op = s.get_file("/f", 3)
    assert op is not None
    assert protocol.decode_json(s.request(op)) == {
        "op": "file_get",
        "path": "/f",
        "max": 3,
        "keepalive": True,
    }


def test_an_agent_from_before_the_op_is_asked_once() -> None:
    s = session()
    op = s.get_file("/f", None)
    assert op is not None
    op.receive(error("BadRequest", "unknown op 'file_get'; known: exec, file_read"))
    assert op.next() is None
    assert s.got_file(op) is None and op.unsupported and not op.reusable  # it hangs up
    assert s.get_file("/f", None) is None  # from now on: the old way


def test_the_ops_answers() -> None:
    s = session()
    whole = GetFile("/f", s.bounds, 8)
    whole.receive((Kind.DATA, b"abc"))
    whole.receive(result({"size": 3, "whole": True}))
    assert whole.value == b"abc" and whole.reusable
    larger = GetFile("/f", s.bounds, 8)
    larger.receive(result({"size": None, "whole": False}))
    assert larger.value is None and larger.reusable and s.got_file(larger) is None
    missing = GetFile("/f", s.bounds, 8)
    with pytest.raises(AgentFileNotFoundError):
        missing.receive(error("FileNotFoundError", "no such file"))
    assert missing.reusable  # the agent keeps a short exchange's connection after an ERROR
    assert s.file_get  # an ordinary error says nothing about the agent's ops


@pytest.mark.parametrize(
    "frames",
    [
        [(Kind.DATA, b"123456789")],  # over the limit asked for
        [(Kind.DATA, b"abc"), result({"size": 4, "whole": True})],  # a size that disagrees
        [(Kind.DATA, b"abc"), result({"size": 3, "whole": False})],  # data, then "not whole"
        [result({"size": 0, "whole": True})],  # "whole" without its DATA
        [(Kind.DATA, b"a"), (Kind.DATA, b"b")],  # a second DATA frame
        [(Kind.STDOUT, b"x")],
        [None],  # the agent hung up
    ],
)
def test_a_hostile_or_broken_answer_is_a_protocol_error(frames: list[object]) -> None:
    op = GetFile("/f", session().bounds, 8)
    with pytest.raises(ProtocolError):
        for frame in frames:
            op.receive(frame)  # type: ignore[arg-type]
    assert not op.reusable
