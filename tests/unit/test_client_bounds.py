"""The host SDK against a compromised agent: every cost the guest can drive is bounded.

Each test puts a fake agent on the far end of a socketpair (or the channel
listener's Unix socket) that speaks the real framing but misbehaves: falls
silent, drips bytes, floods output, nests JSON, sends numbers no float holds,
lists impossible names, opens channels and never lets go. The production
clients must answer each with :class:`SandboxTimeout`, :class:`OutputTooLarge`
or :class:`ProtocolError`, and hold bounded memory meanwhile (issue 14, items
7-10). No KVM needed; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import protocol
from ember.client import (
    DEFAULT_MAX_OUTPUT,
    MAX_JSON_DEPTH,
    AgentClient,
    AsyncAgentClient,
    ChannelServer,
)
from ember.errors import EmberError, OutputTooLarge, ProtocolError, SandboxCrashed, SandboxTimeout
from ember.launcher import VmmProcess
from ember.protocol import HEADER, MAX_FRAME, Kind, write_frame, write_json
from ember.sandbox import AsyncSandbox, Sandbox

Script = Callable[[socket.socket, dict[str, Any]], None]
BOUNDS = {"grace": 0.05, "call_timeout": 0.2}  # so that a silent agent is given up on soon


class FakeAgent:
    """A connection per call, served on its own thread by ``script(sock, request)``.

    Sockets stay open until the test ends (``release``), so that "silent"
    really is silent rather than a hang-up the client would see at once.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.hung_up = threading.Event()  # a send of the script failed: the host let go
        self.released = threading.Event()
        self._threads: list[threading.Thread] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return ours

    async def aconnect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(sock=self.connect())

    def client(self) -> AgentClient:
        return AgentClient(self.connect, **BOUNDS)

    def aclient(self) -> AsyncAgentClient:
        return AsyncAgentClient(self.aconnect, **BOUNDS)

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                frame = protocol.read_frame(sock)
                assert frame is not None and frame[0] is Kind.REQUEST
                request = protocol.decode_json(frame[1])
                self.requests.append(request)
                self.script(sock, request)
            except OSError:
                self.hung_up.set()
            self.released.wait(30)

    def close(self) -> None:
        self.released.set()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def fake() -> Iterator[Callable[[Script], FakeAgent]]:
    agents: list[FakeAgent] = []

    def make(script: Script) -> FakeAgent:
        agents.append(FakeAgent(script))
        return agents[-1]

    yield make
    for agent in agents:
        agent.close()


def silent(sock: socket.socket, request: dict[str, Any]) -> None:
    """Takes the request and never answers (a hung guest, or a hostile agent)."""


def reply(payload: bytes, kind: Kind = Kind.RESULT) -> Script:
    def script(sock: socket.socket, request: dict[str, Any]) -> None:
        if request["op"] == "file_write":
            while (frame := protocol.read_frame(sock)) is not None and frame[0] is Kind.DATA:
                pass
        if request["op"] == "file_read":
            write_frame(sock, Kind.DATA_EOF)
        if request["op"] == "exec":
            write_frame(sock, Kind.STDOUT, b"partial")
        write_frame(sock, kind, payload)

    return script


def result(obj: object) -> Script:
    return reply(protocol.encode_json(obj))


EXEC_OK = {"exit_code": 0, "signal": None, "timed_out": False, "duration": 0.5}
STAT_OK = {"size": 1, "mode": 0o100644, "mtime": 1.5, "is_dir": False, "is_file": True}


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


# -- item 8: the host's own deadline ------------------------------------------------------

CALLS: dict[str, Callable[[AgentClient], object]] = {
    "ping": lambda c: c.ping(),
    "stat": lambda c: c.files.stat("/x"),
    "list": lambda c: c.files.list("/x"),
    "remove": lambda c: c.files.remove("/x"),
    "shutdown": lambda c: c.shutdown(),
    "run_code": lambda c: c.run_code("1", timeout=0.05),
    "exec": lambda c: c.exec(["sleep", "1000"], timeout=0.05),
    "exec_stream": lambda c: list(c.exec_stream(["sleep", "1000"], timeout=0.05)),
    "read": lambda c: c.files.read("/x"),
    "read_into": lambda c: c.files.read_into("/x", io.BytesIO()),
    "write": lambda c: c.files.write("/x", b"abc"),
}

ASYNC_CALLS: dict[str, Callable[[AsyncAgentClient], Any]] = {
    "ping": lambda c: c.ping(),
    "stat": lambda c: c.files.stat("/x"),
    "list": lambda c: c.files.list("/x"),
    "remove": lambda c: c.files.remove("/x"),
    "shutdown": lambda c: c.shutdown(),
    "run_code": lambda c: c.run_code("1", timeout=0.05),
    "exec": lambda c: c.exec(["sleep", "1000"], timeout=0.05),
    "read": lambda c: c.files.read("/x"),
    "read_into": lambda c: c.files.read_into("/x", io.BytesIO()),
    "write": lambda c: c.files.write("/x", b"abc"),
}


def test_run_code_waits_for_the_worker_to_start_then_for_its_timeout() -> None:
    from ember.client import WORKER_START_ALLOWANCE

    client = AgentClient(lambda: socket.socketpair()[0], grace=1.0)
    deadline = client._session.bounds.call("run_code", 2.0, WORKER_START_ALLOWANCE)
    assert deadline.seconds == 2.0 + WORKER_START_ALLOWANCE + 1.0


@pytest.mark.parametrize("call", CALLS)
def test_a_silent_agent_is_given_up_on(
    fake: Callable[[Script], FakeAgent], call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run_code's deadline includes the worker's start-up allowance: shrink it for the test.
    monkeypatch.setattr("ember.client.session.WORKER_START_ALLOWANCE", 0.0)
    agent = fake(silent)
    with pytest.raises(SandboxTimeout) as info:
        CALLS[call](agent.client())
    assert "hung up" in str(info.value)
    if call.startswith("exec"):
        partial = info.value.result
        assert partial is not None and partial.timed_out and partial.exit_code is None
        if call == "exec":
            assert partial.stdout == b""


@pytest.mark.parametrize("call", ASYNC_CALLS)
def test_a_silent_agent_is_given_up_on_async(
    fake: Callable[[Script], FakeAgent], call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ember.client.session.WORKER_START_ALLOWANCE", 0.0)
    agent = fake(silent)

    async def main() -> None:
        with pytest.raises(SandboxTimeout) as info:
            await ASYNC_CALLS[call](agent.aclient())
        assert "hung up" in str(info.value)
        if call == "exec":
            assert info.value.result is not None and info.value.result.timed_out

    run_async(main())


def test_async_exec_stream_is_given_up_on(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(silent)

    async def main() -> None:
        stream = agent.aclient().exec_stream(["sleep", "1000"], timeout=0.05)
        with pytest.raises(SandboxTimeout):
            async for _ in stream:
                pass
        assert stream.result is not None and stream.result.timed_out

    run_async(main())


def drip_frame(sock: socket.socket, kind: Kind) -> None:
    """A frame whose payload comes a byte at a time, each well within any per-recv timeout,
    for two seconds at most (then it is complete, or the host has hung up)."""
    sock.sendall(HEADER.pack(100, kind))
    for _ in range(100):
        if not peer_still_there(sock):
            return
        sock.sendall(b" ")
        time.sleep(0.02)


def drip(sock: socket.socket, request: dict[str, Any]) -> None:
    drip_frame(sock, Kind.RESULT)


def peer_still_there(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_a_dripping_answer_is_bounded_as_a_whole(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(drip)
    with pytest.raises(SandboxTimeout):
        agent.client().ping()

    async def main() -> None:
        with pytest.raises(SandboxTimeout):
            await agent.aclient().ping()

    run_async(main())


def never_reads(sock: socket.socket, request: dict[str, Any]) -> None:
    """Takes the request, then reads nothing: the host's upload fills the buffers."""


def test_an_upload_the_agent_never_reads_is_given_up_on(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(never_reads)
    with pytest.raises(SandboxTimeout, match="made no progress"):
        agent.client().files.write("/x", bytes(16 << 20))

    async def main() -> None:
        with pytest.raises(SandboxTimeout, match="made no progress"):
            await agent.aclient().files.write("/x", bytes(16 << 20))

    run_async(main())


def test_a_call_that_is_answered_in_time_is_not_affected(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(result(EXEC_OK))
    r = agent.client().exec(["true"], timeout=0.05)  # the host's deadline only ever adds grace
    assert (r.exit_code, r.stdout) == (0, b"partial")


class FakeVmm:
    """What Sandbox._guard asks of a VMM after a failed call."""

    def __init__(self, exited: bool) -> None:
        self._exited = exited
        self.crash_waits = 0

    def exited(self) -> bool:
        return self._exited

    def crash_after_failure(self) -> SandboxCrashed | None:
        self.crash_waits += 1  # the real one waits up to CRASH_GRACE for the VMM to exit
        return None

    def crashed(self, what: str) -> SandboxCrashed:
        return SandboxCrashed(what, "console tail")


def give_up() -> None:
    raise SandboxTimeout("the agent did not finish 'ping' within 1 s, so the host hung up")


@pytest.mark.parametrize("exited", [False, True])
def test_a_host_timeout_is_reported_at_once_not_after_a_crash_wait(exited: bool) -> None:
    sb = Sandbox.__new__(Sandbox)
    vmm = FakeVmm(exited)
    sb._vmm, sb._closed = vmm, False  # type: ignore[assignment]
    with pytest.raises(SandboxCrashed if exited else SandboxTimeout):
        sb._call(give_up)
    assert vmm.crash_waits == 0

    asb = AsyncSandbox.__new__(AsyncSandbox)
    asb._vmm, asb._closed = vmm, False  # type: ignore[assignment]

    async def agive_up() -> None:
        give_up()

    with pytest.raises(SandboxCrashed if exited else SandboxTimeout):
        run_async(asb._call(agive_up))
    assert vmm.crash_waits == 0


# -- item 9: exec() and files.read() hold at most max_output ------------------------------


def flood(total: int) -> Script:
    """Sends ``total`` bytes of output (or file data) in full frames, then the end."""

    def script(sock: socket.socket, request: dict[str, Any]) -> None:
        if request["op"] == "file_get":  # as an agent from before it (one request a connection)
            write_frame(sock, Kind.ERROR, protocol.error_payload("BadRequest", "unknown op"))
            return
        kind = Kind.STDOUT if request["op"] == "exec" else Kind.DATA
        chunk = bytes(MAX_FRAME)
        for start in range(0, total, MAX_FRAME):
            write_frame(sock, kind, chunk[: total - start])
        if request["op"] == "exec":
            write_json(sock, Kind.RESULT, EXEC_OK)
        else:
            write_frame(sock, Kind.DATA_EOF)
            write_json(sock, Kind.RESULT, {"size": total})

    return script


def test_exec_and_read_stop_at_the_default_max_output(
    fake: Callable[[Script], FakeAgent],
) -> None:
    agent = fake(flood(DEFAULT_MAX_OUTPUT + 8 * MAX_FRAME))  # more than the socket buffers hold
    client = AgentClient(agent.connect)
    with pytest.raises(OutputTooLarge, match="exec_stream") as info:
        client.exec(["yes"])
    assert info.value.limit == DEFAULT_MAX_OUTPUT
    with pytest.raises(OutputTooLarge, match="read_into"):
        client.files.read("/big")
    assert agent.hung_up.wait(10)  # the host let go of the connection: the command is killed


def test_max_output_is_the_callers_choice_and_streaming_is_unbounded(
    fake: Callable[[Script], FakeAgent],
) -> None:
    size = 3 * MAX_FRAME
    agent = fake(flood(size))
    client = AgentClient(agent.connect)
    with pytest.raises(OutputTooLarge):
        client.exec(["yes"], max_output=size - 1)
    with pytest.raises(OutputTooLarge):
        client.files.read("/big", max_output=size - 1)
    assert len(client.exec(["yes"], max_output=size).stdout) == size
    assert len(client.files.read("/big", max_output=None)) == size
    assert sum(len(c.data) for c in client.exec_stream(["yes"])) == size
    assert client.files.read_into("/big", io.BytesIO()) == size
    with pytest.raises(ValueError, match="max_output"):
        client.exec(["yes"], max_output=-1)


def test_max_output_async(fake: Callable[[Script], FakeAgent]) -> None:
    size = 3 * MAX_FRAME
    agent = fake(flood(size))

    async def main() -> None:
        client = AsyncAgentClient(agent.aconnect)
        with pytest.raises(OutputTooLarge):
            await client.exec(["yes"], max_output=size - 1)
        with pytest.raises(OutputTooLarge):
            await client.files.read("/big", max_output=size - 1)
        assert len((await client.exec(["yes"], max_output=size)).stdout) == size
        assert len(await client.files.read("/big")) == size
        assert sum([len(c.data) async for c in client.exec_stream(["yes"])]) == size

    run_async(main())


# -- item 10: malformed answers are ProtocolError ------------------------------------------

NESTED = b'{"pong":' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # RecursionError in json
DEEP_BUT_PARSEABLE = b'{"pong":' + b"[" * 200 + b"]" * 200 + b"}"  # fine for json, not for us
HUGE = 10**400


@pytest.mark.parametrize(
    ("call", "script"),
    [
        ("ping", reply(NESTED)),
        ("ping", reply(DEEP_BUT_PARSEABLE)),
        ("ping", reply(b'{"pong": NaN}')),
        ("ping", reply(NESTED, Kind.ERROR)),
        ("exec", result({**EXEC_OK, "duration": HUGE})),
        ("exec", reply(b'{"exit_code":0,"signal":null,"timed_out":false,"duration":Infinity}')),
        ("exec", reply(b'{"exit_code":0,"signal":null,"timed_out":false,"duration":1e999}')),
        ("exec", result({**EXEC_OK, "exit_code": HUGE})),
        ("exec", result({**EXEC_OK, "exit_code": None, "signal": -9})),
        ("stat", result({**STAT_OK, "mtime": HUGE})),
        ("stat", result({**STAT_OK, "size": -1})),
        ("list", result({"entries": [{"name": "../../etc", "size": 1, "is_dir": True}]})),
        ("list", result({"entries": [{"name": "a/b", "size": 1, "is_dir": False}]})),
        ("list", result({"entries": [{"name": "..", "size": 1, "is_dir": True}]})),
        ("list", result({"entries": [{"name": ".", "size": 1, "is_dir": True}]})),
        ("list", result({"entries": [{"name": "", "size": 1, "is_dir": False}]})),
        ("list", result({"entries": [{"name": "nul\x00", "size": 1, "is_dir": False}]})),
        ("read", result({"size": HUGE})),
        ("write", result({"size": 4})),  # not what was sent
    ],
)
def test_a_malformed_answer_is_a_protocol_error(
    fake: Callable[[Script], FakeAgent], call: str, script: Script
) -> None:
    agent = fake(script)
    with pytest.raises(ProtocolError):
        CALLS[call](agent.client())

    async def main() -> None:
        with pytest.raises(ProtocolError):
            await ASYNC_CALLS[call](agent.aclient())

    run_async(main())


def test_an_ordinary_listing_passes() -> None:
    from ember.client.results import parse_list

    names = ["a..b", "...", ".hidden", "x y", "\udcff"]
    entries = parse_list({"entries": [{"name": n, "size": 0, "is_dir": False} for n in names]})
    assert [e.name for e in entries] == names
    assert MAX_JSON_DEPTH >= 3  # an answer is three deep: RESULT -> entries -> entry


@contextlib.contextmanager
def ready_listener(tmp_path: Path, hello: Callable[[socket.socket], None]) -> Iterator[Any]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "ready.sock"))
    listener.listen(1)
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.connect(str(tmp_path / "ready.sock"))
    thread = threading.Thread(target=hello, args=(guest,), daemon=True)
    thread.start()
    vmm = VmmProcess.__new__(VmmProcess)
    vmm.proc = None
    try:
        yield vmm, listener
    finally:
        guest.close()
        listener.close()
        thread.join(10)


def test_a_dripping_ready_message_does_not_outlive_boot_timeout(tmp_path: Path) -> None:
    hello = ready_listener(tmp_path, lambda sock: drip_frame(sock, Kind.REQUEST))
    with hello as (vmm, listener), pytest.raises(SandboxTimeout, match="ready message"):
        vmm._wait_ready(listener, 0.3)


@pytest.mark.parametrize(
    "hello",
    [
        HEADER.pack(2, 77) + b"{}",  # no such frame kind
        HEADER.pack(MAX_FRAME + 1, Kind.REQUEST),  # over the limit
        HEADER.pack(2, Kind.RESULT) + b"{}",  # not a REQUEST
        HEADER.pack(100, Kind.REQUEST) + b"{}",  # cut short
    ],
)
def test_a_malformed_ready_message_is_a_protocol_error(tmp_path: Path, hello: bytes) -> None:
    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the host may hang up first
            sock.sendall(hello)
            sock.shutdown(socket.SHUT_WR)

    with ready_listener(tmp_path, send) as (vmm, listener), pytest.raises(ProtocolError) as info:
        vmm._wait_ready(listener, 30)
    assert isinstance(info.value, EmberError)


# -- item 7: channels nobody reads are bounded in total ------------------------------------


def open_channel(path: str, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    write_json(sock, Kind.REQUEST, {"op": "channel", "name": name})
    return sock


def send_streams(path: str, name: str, count: int, size: int) -> None:
    """``count`` whole streams of ``size`` bytes each, one after another, each ended."""
    message = bytes(64 << 10)
    for i in range(count):
        with contextlib.suppress(OSError), open_channel(path, name) as sock:
            for _ in range(size // len(message)):
                write_frame(sock, Kind.DATA, i.to_bytes(4, "big") + message[4:])
            write_frame(sock, Kind.DATA_EOF)


@contextlib.contextmanager
def channel_server(tmp_path: Path, **kwargs: int) -> Iterator[tuple[ChannelServer, str]]:
    path = str(tmp_path / "ch.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    with ChannelServer(listener, **kwargs) as server:
        yield server, path


def test_finished_channels_nobody_reads_are_bounded_in_total(tmp_path: Path) -> None:
    # 16 streams of 4 MiB, each within the per-channel bound (8 MiB), each ended with
    # DATA_EOF: before, all 64 MiB stayed in the host until somebody asked for them.
    count, size = 16, 4 << 20
    with channel_server(tmp_path) as (server, path):
        sender = threading.Thread(target=send_streams, args=(path, "c", count, size))
        sender.start()
        sender.join(3)
        assert sender.is_alive()  # held up: the host holds no more for channels nobody reads
        assert server.pending_bytes <= 16 << 20
        seen = set()
        for _ in range(count):  # reading them lets the rest through, each whole
            got = list(server.channel("c", timeout=30))
            assert len(got) == size // (64 << 10)
            (number,) = {int.from_bytes(m[:4], "big") for m in got}
            seen.add(number)
            assert server.pending_bytes <= 16 << 20
        assert seen == set(range(count))
        sender.join(30)
        assert not sender.is_alive()
        assert server.pending_bytes == 0


def test_a_channel_being_read_is_not_held_up_by_unread_ones(tmp_path: Path) -> None:
    with channel_server(tmp_path, max_pending=1 << 20) as (server, path):
        unread = threading.Thread(target=send_streams, args=(path, "unread", 8, 1 << 20))
        unread.start()
        wanted = threading.Thread(target=send_streams, args=(path, "wanted", 1, 4 << 20))
        wanted.start()
        assert sum(len(m) for m in server.channel("wanted", timeout=30)) == 4 << 20
        wanted.join(30)
        assert server.pending_bytes <= 1 << 20
        for _ in range(8):
            assert sum(len(m) for m in server.channel("unread", timeout=30)) == 1 << 20
        unread.join(30)
        assert not unread.is_alive()


def test_unread_channels_keep_their_slots_until_read(tmp_path: Path) -> None:
    with channel_server(tmp_path, max_connections=2) as (server, path):
        for name in "abc":  # small enough for the socket buffers: sent, whoever listens
            with open_channel(path, name) as sock:
                write_frame(sock, Kind.DATA, name.encode())
                write_frame(sock, Kind.DATA_EOF)
        for _ in range(1000):  # until 'a' and 'b' are in
            if server.pending_bytes == 2:
                break
            time.sleep(0.01)
        with pytest.raises(SandboxTimeout, match="'a' x1"):
            server.channel("c", timeout=0.2)  # 'a' and 'b' hold both slots: 'c' waits
        assert list(server.channel("a", timeout=30)) == [b"a"]
        assert list(server.channel("c", timeout=30)) == [b"c"]
        assert list(server.channel("b", timeout=30)) == [b"b"]


def test_a_channel_request_nested_too_deep_only_drops_that_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    escaped: list[BaseException | None] = []  # before: a RecursionError out of the thread
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    with channel_server(tmp_path) as (server, path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            write_frame(sock, Kind.REQUEST, b"[" * 200_000 + b"]" * 200_000)
            assert sock.recv(1) == b""  # hung up on, without a traceback in a thread
        with open_channel(path, "ok") as sock:
            write_frame(sock, Kind.DATA, b"fine")
            write_frame(sock, Kind.DATA_EOF)
        assert list(server.channel("ok", timeout=30)) == [b"fine"]
    assert escaped == []


def test_closing_the_server_ends_a_channel_being_read(tmp_path: Path) -> None:
    # Before, a consumer waiting for the next message waited forever once the server closed
    # (a sandbox closed or deleted under a reader: the daemon's channel WebSocket hung).
    with channel_server(tmp_path) as (server, path), open_channel(path, "c") as sock:
        write_frame(sock, Kind.DATA, b"first")
        frames = server.channel("c", timeout=30)
        assert next(frames) == b"first"
        closer = threading.Timer(0.2, server.close)
        closer.start()
        with pytest.raises(ProtocolError, match="closed"):
            next(frames)
        closer.join()
