"""The guest agent, its wire protocol and the host clients, on a Unix socket (no KVM).

The agent runs as a real subprocess (``python -m ember.agent --listen-unix``)
with a real run_code worker, exactly as in the guest except for the socket
family; the clients are the production ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ember import protocol
from ember.agent import channel, relay
from ember.agent.deadlines import Deadlines
from ember.client import AgentClient, AsyncAgentClient, ChannelServer
from ember.errors import (
    AgentError,
    AgentFileExistsError,
    AgentIsADirectoryError,
    EmberError,
    ExecError,
    ProtocolError,
    SandboxTimeout,
)
from ember.protocol import Kind, read_frame, write_frame, write_json
from tests.unit.agent_rig import Agent


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def wait_group_gone(pgid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- protocol ---------------------------------------------------------------------------


def test_frames_round_trip_and_are_checked() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = os.urandom(protocol.MAX_FRAME)

        def send() -> None:
            write_frame(a, Kind.DATA, big)
            a.close()

        t = threading.Thread(target=send)
        t.start()
        assert read_frame(b) == (Kind.DATA, big)
        t.join()
        assert read_frame(b) is None  # clean EOF between frames
    for raw, message in [
        (struct.pack("<IB", protocol.MAX_FRAME + 1, Kind.DATA), "over"),
        (struct.pack("<IB", 0, 99), "unknown frame kind"),
        (struct.pack("<IB", 10, Kind.DATA) + b"abc", "short"),
        (b"\x01\x00", "short"),
    ]:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(protocol.ProtocolError, match=message):
                read_frame(b)
    with pytest.raises(protocol.ProtocolError):
        write_frame(a, Kind.DATA, bytes(protocol.MAX_FRAME + 1))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_json(b"[1]")
    assert protocol.valid_channel_name("a.b-c_9") and not protocol.valid_channel_name("a b")


class _PartialSocket:
    """A socket whose one ``sendmsg`` takes only the first ``take`` bytes of what it is given."""

    def __init__(self, take: int) -> None:
        self.take, self.out, self.writes = take, bytearray(), 0

    def sendmsg(self, parts: list[bytes]) -> int:
        taken = b"".join(bytes(part) for part in parts)[: self.take]
        self.out += taken
        self.writes += 1
        return len(taken)

    def sendall(self, data: bytes) -> None:
        self.out += bytes(data)
        self.writes += 1


# cut points: in the first header, at its end, in and at the end of the payload, in the
# empty frame's header, in the last header, in the last payload, and nothing cut
@pytest.mark.parametrize("take", [0, 3, 5, 6, 70_005, 70_007, 70_010, 70_013, 70_020, 1 << 30])
def test_frames_sent_together_arrive_whole_however_much_one_write_took(take: int) -> None:
    payload = os.urandom(70_000)  # past the join-and-copy size: by scatter-gather
    result = protocol.encode_json({"size": len(payload), "whole": True})
    sock = _PartialSocket(take)
    frames = ((Kind.DATA, payload), (Kind.DATA_EOF, b""), (Kind.RESULT, result))
    protocol.write_frames(sock, frames)
    header = protocol.HEADER.pack
    expected = header(len(payload), Kind.DATA) + payload + header(0, Kind.DATA_EOF)
    assert bytes(sock.out) == expected + header(len(result), Kind.RESULT) + result
    small = _PartialSocket(take)
    protocol.write_frames(small, ((Kind.DATA, b"abc"), (Kind.RESULT, result)))
    assert small.writes == 1  # joined: one write, never a sendmsg that could stop short
    assert (
        bytes(small.out)
        == header(3, Kind.DATA) + b"abc" + header(len(result), Kind.RESULT) + result
    )
    edge = _PartialSocket(take)  # a payload of exactly the join size is still joined
    protocol.write_frame(edge, Kind.DATA, bytes(64 << 10))
    assert edge.writes == 1 and bytes(edge.out) == header(64 << 10, Kind.DATA) + bytes(64 << 10)
    with pytest.raises(protocol.ProtocolError):  # checked before anything is sent
        protocol.write_frames(
            small, ((Kind.DATA, b"x"), (Kind.DATA, bytes(protocol.MAX_FRAME + 1)))
        )
    assert small.writes == 1


# -- ping, exec -------------------------------------------------------------------------


def test_ping(agent: Agent) -> None:
    pong = agent.client.ping()
    assert pong["pong"] is True and pong["version"] == protocol.PROTOCOL_VERSION
    assert pong["pid"] == agent.proc.pid and pong["uptime"] >= 0


def recording(agent: Agent, opened: list[socket.socket]) -> Callable[[], socket.socket]:
    """A connect function for AgentClient that keeps every socket it opens in ``opened``."""

    def connect() -> socket.socket:
        opened.append(agent.connect())
        return opened[-1]

    return connect


def test_short_calls_reuse_one_kept_connection(agent: Agent) -> None:
    opened: list[socket.socket] = []
    client = AgentClient(recording(agent, opened))
    for _ in range(5):
        assert client.ping()["pong"] is True
    assert client.run_code("6 * 7").value == "42"
    with pytest.raises(FileNotFoundError):
        client.files.stat("/no/such/file")  # an error reply keeps the connection usable too
    assert client.ping()["pong"] is True
    assert len(opened) == 1
    assert client.exec(["true"]).exit_code == 0  # an exec without stdin may keep it too
    assert len(opened) == 1
    assert client.exec(["cat"], stdin=b"").exit_code == 0  # one with stdin gets its own
    assert len(opened) == 2
    client.close()
    assert opened[0].fileno() == -1


def test_a_kept_connection_the_agent_closed_is_replaced(agent: Agent) -> None:
    opened: list[socket.socket] = []
    client = AgentClient(recording(agent, opened))
    client.ping()
    # A request without keepalive on the same connection: the agent answers and closes it.
    write_frame(opened[0], Kind.REQUEST, protocol.encode_json({"op": "ping"}))
    assert read_frame(opened[0]) is not None and read_frame(opened[0]) is None
    assert client.ping()["pong"] is True  # the dead kept connection was noticed and replaced
    assert len(opened) == 2
    client.close()


def test_the_first_short_call_takes_over_a_resumed_connection(agent: Agent) -> None:
    resumed = agent.connect()
    client = AgentClient(agent.connect, resume=lambda: resumed)
    assert client.ping()["pong"] is True
    kept = client._take_kept()
    assert kept is resumed
    kept.close()


def test_exec_echo_argv_and_shell(agent: Agent) -> None:
    r = agent.client.exec(["echo", "hello world"])
    assert (r.stdout, r.stderr, r.exit_code, r.signal, r.timed_out) == (
        b"hello world\n",
        b"",
        0,
        None,
        False,
    )
    assert r.ok and r.duration >= 0
    assert agent.client.exec("echo $((6*7))").stdout == b"42\n"


def test_exec_exit_codes_signals_and_stderr(agent: Agent) -> None:
    assert agent.client.exec(["sh", "-c", "exit 3"]).exit_code == 3
    r = agent.client.exec(["sh", "-c", "kill -SEGV $$"])
    assert (r.exit_code, r.signal, r.timed_out) == (None, 11, False)
    r = agent.client.exec("echo out; echo err >&2; echo out2")
    assert r.stdout == b"out\nout2\n" and r.stderr == b"err\n"


def test_exec_env_cwd_and_stdin(agent: Agent, tmp_path: Path) -> None:
    r = agent.client.exec("echo $GREETING; pwd; echo $PATH", env={"GREETING": "hi"}, cwd="/tmp")
    greeting, cwd, path = r.stdout.decode().splitlines()
    assert (greeting, cwd) == ("hi", "/tmp") and "/usr/bin" in path
    data = os.urandom(3 << 20)  # bigger than every pipe and socket buffer on the way
    r = agent.client.exec(["cat"], stdin=data)
    assert r.stdout == data
    r = agent.client.exec(["wc", "-c"], stdin=io.BytesIO(b"x" * 1000))
    assert r.stdout.strip() == b"1000"
    r = agent.client.exec(["true"], stdin=data)  # never reads its stdin
    assert r.exit_code == 0


def test_exec_missing_program(agent: Agent) -> None:
    with pytest.raises(ExecError, match="no-such-program") as info:
        agent.client.exec(["no-such-program"])
    assert isinstance(info.value, AgentError) and isinstance(info.value, EmberError)
    with pytest.raises(ExecError):
        agent.client.exec(["ls"], cwd="/no/such/dir")
    with pytest.raises(AgentError, match="BadRequest"):
        agent.client.exec([])
    with pytest.raises(ExecError):  # the error wins over the stdin still being sent
        agent.client.exec(["no-such-program"], stdin=bytes(8 << 20))


def test_timeout_kills_the_whole_group(agent: Agent) -> None:
    with pytest.raises(SandboxTimeout) as info:
        agent.client.exec("echo $$; sleep 1000 & sleep 1000", timeout=0.5)
    result = info.value.result
    assert result is not None and result.timed_out and result.signal == 9
    pgid = int(result.stdout.split()[0])
    assert wait_group_gone(pgid) == []
    assert agent.client.exec(["echo", "still here"]).stdout == b"still here\n"


def test_the_deadline_also_ends_a_background_job_that_holds_the_output(agent: Agent) -> None:
    """The command exits at once, but a job it left in the background keeps its output
    open: the deadline still kills the group, as it did when a timer thread kept it."""
    with pytest.raises(SandboxTimeout) as info:
        agent.client.exec("echo $$; sleep 1000 &", timeout=0.5)
    result = info.value.result
    assert result is not None and result.timed_out and result.exit_code == 0
    assert wait_group_gone(int(result.stdout.split()[0])) == []


def test_a_timed_command_that_never_blocks_the_relay_never_wakes_the_deadline_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waking the agent's deadline thread costs the guest a GIL hand-over storm: an exec
    whose relay never blocks keeps its deadline in its own poll."""
    added: list[float] = []

    class Recording(Deadlines):
        def add(self, seconds: float, action: Callable[[], object]) -> int:
            added.append(seconds)
            return super().add(seconds, action)

    monkeypatch.setattr(relay, "DEADLINES", Recording())
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.Popen(
            ["sh", "-c", "echo hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        relay._serve(a, proc, 60.0, False, None)
        frames = [read_frame(b), read_frame(b)]
    assert frames[0] == (Kind.STDOUT, b"hi\n")
    assert frames[1] is not None and protocol.decode_json(frames[1][1])["exit_code"] == 0
    assert added == []


def _state(pid: int) -> str:
    """A process's state letter (``Z``: dead, not yet reaped), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_deadline_passes_while_the_host_reads_nothing(agent: Agent) -> None:
    """The relay keeps a deadline in its own poll, but a host that stops reading blocks its
    send: the deadline must still kill the command then, not once the host reads again
    (the agent's deadline thread does it)."""
    total = 256 << 20
    with agent.connect() as sock:
        shell = f"echo $$; exec head -c {total} /dev/zero"
        write_json(sock, Kind.REQUEST, {"op": "exec", "shell": shell, "timeout": 0.5})
        first = read_frame(sock)
        assert first is not None and first[0] is Kind.STDOUT
        pid = int(first[1].split(b"\n", 1)[0])
        time.sleep(3.0)  # far past the deadline, reading nothing: the agent's send blocks
        assert _state(pid) in ("Z", "gone")  # killed while the host still read nothing
        out, result = len(first[1]), None
        while (frame := read_frame(sock)) is not None:
            kind, payload = frame
            if kind is Kind.RESULT:
                result = protocol.decode_json(payload)
                break
            assert kind is Kind.STDOUT
            out += len(payload)
    assert result is not None and result["timed_out"] is True and result["signal"] == 9
    assert out < total


@pytest.mark.parametrize("command", ["exec yes", "exec sleep 1000"])  # loud and silent
def test_abandoned_stream_kills_the_command(agent: Agent, command: str) -> None:
    stream = agent.client.exec_stream(f"echo $$; {command}")
    first = next(stream)
    pgid = int(first.data.split()[0])
    stream.close()
    assert wait_group_gone(pgid) == []


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_unread_output_is_not_buffered_in_the_agent(agent: Agent) -> None:
    before = rss(agent.proc.pid)
    with agent.client.exec_stream("head -c 200000000 /dev/zero") as stream:
        first = next(stream)
        time.sleep(0.5)  # the command runs on, but nobody reads
        assert rss(agent.proc.pid) - before < 16 << 20
        total = len(first.data) + sum(len(c.data) for c in stream)
    assert total == 200_000_000 and stream.result is not None and stream.result.exit_code == 0


def test_exec_survives_a_half_closed_client(agent: Agent) -> None:
    with agent.connect() as sock:  # as `socat` does: send the request, then shut down writing
        write_json(sock, Kind.REQUEST, {"op": "exec", "shell": "sleep 0.2; echo late"})
        sock.shutdown(socket.SHUT_WR)
        frames = read_until_closed(sock)
    assert [k for k, _ in frames] == [Kind.STDOUT, Kind.RESULT]
    assert frames[0][1] == b"late\n"


def test_exec_stream_order_and_result(agent: Agent) -> None:
    stream = agent.client.exec_stream("for i in 1 2 3; do echo $i; echo e$i >&2; done; exit 4")
    chunks = list(stream)
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    assert (out, err) == (b"1\n2\n3\n", b"e1\ne2\ne3\n")
    assert stream.result is not None and stream.result.exit_code == 4
    assert list(stream) == []


def test_twenty_concurrent_exec_streams(agent: Agent) -> None:
    def run(i: int) -> tuple[int, bytes, int | None]:
        stream = agent.client.exec_stream(f"for j in $(seq 50); do echo {i}-$j; done; exit {i}")
        data = b"".join(c.data for c in stream)
        assert stream.result is not None
        return i, data, stream.result.exit_code

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, range(20)))
    for i, data, code in results:
        assert data == "".join(f"{i}-{j}\n" for j in range(1, 51)).encode()
        assert code == i


# -- files ------------------------------------------------------------------------------


def test_file_round_trip_20mib(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(20 << 20)
    target = tmp_path / "deep" / "dir" / "blob.bin"
    assert agent.client.files.write(str(target), data) == len(data)
    assert hashlib.sha256(agent.client.files.read(str(target))).digest() == (
        hashlib.sha256(data).digest()
    )
    sink = io.BytesIO()
    assert agent.client.files.read_into(str(target), sink) == len(data)
    assert sink.getvalue() == data
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]  # no temp files left


def test_file_ops(agent: Agent, tmp_path: Path) -> None:
    files = agent.client.files
    path = str(tmp_path / "a.txt")
    files.write(path, io.BytesIO(b"hello "), mode=0o600)
    files.write(path, b"world", append=True)
    assert files.read(path) == b"hello world"
    st = files.stat(path)
    assert (st.size, st.mode & 0o777, st.is_file, st.is_dir) == (11, 0o600, True, False)
    files.write(path, b"new")  # replacing keeps the mode
    assert files.stat(path).mode & 0o777 == 0o600
    os.mkdir(tmp_path / "sub")
    (tmp_path / "sub" / "x").write_bytes(b"12")
    entries = files.list(str(tmp_path))
    assert [(e.name, e.is_dir) for e in entries] == [("a.txt", False), ("sub", True)]
    with pytest.raises(FileNotFoundError):
        files.read(str(tmp_path / "missing"))
    with pytest.raises(AgentIsADirectoryError):
        files.write(str(tmp_path / "sub"), b"x" * 1_000_000)  # error after draining the upload
    with pytest.raises(AgentError, match="OSError"):
        files.remove(str(tmp_path / "sub"))  # not empty
    files.remove(str(tmp_path / "sub"), recursive=True)
    files.remove(path)
    assert files.list(str(tmp_path)) == []
    with pytest.raises(AgentError, match="absolute"):
        files.stat("relative/path")
    with pytest.raises(AgentError, match="absolute"):  # refused before the upload is read
        files.write("relative/path", bytes(8 << 20))
    with pytest.raises(NotADirectoryError):
        files.list("/etc/hostname")


def test_a_write_makes_missing_parents_and_leaves_no_temporary_file(
    agent: Agent, tmp_path: Path
) -> None:
    files = agent.client.files
    target = tmp_path / "a" / "b" / "c.txt"
    files.write(str(target), b"deep")  # the temporary file cannot be made: parents first
    assert target.read_bytes() == b"deep" and target.stat().st_mode & 0o7777 == 0o644
    files.write(str(target), b"again", mode=0o640)
    assert target.read_bytes() == b"again" and target.stat().st_mode & 0o7777 == 0o640
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(AgentFileExistsError):  # a file where a parent should be
        files.write(str(tmp_path / "plain" / "x"), b"no")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert names == ["a", "a/b", "a/b/c.txt", "plain"]


def test_a_write_to_a_device_or_a_proc_file_goes_to_it_in_place(
    agent: Agent, tmp_path: Path
) -> None:
    files = agent.client.files
    null = tmp_path / "null"  # /dev/null's twin (root, as CI is): a regression breaks only it
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    files.write(str(null), b"discarded")  # a rename would leave a plain file there
    assert stat.S_ISCHR(null.stat().st_mode)
    # /proc takes no new files, so no temporary file: the agent's own name, written in place
    files.write("/proc/self/comm", b"renamed-agent")
    assert files.read("/proc/self/comm") == b"renamed-agent\n"
    with pytest.raises(FileNotFoundError, match="/proc/self/no-such"):  # the caller's path
        files.write("/proc/self/no-such", b"x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(AgentError, match="is a FIFO"):  # opening it would wait for a reader
        files.write(str(tmp_path / "fifo"), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "null"]


# -- run_code ---------------------------------------------------------------------------


def test_run_code_notebook_semantics(agent: Agent) -> None:
    run = agent.client.run_code
    r = run("x = 41\nprint('hi')\nimport sys; print('oops', file=sys.stderr)\nx + 1")
    assert (r.stdout, r.stderr, r.value, r.error) == ("hi\n", "oops\n", "42", None)
    assert run("x").value == "41" and run("x = 2").value is None
    assert run("def f(n):\n    return 10 // n\nNone").value is None
    r = run("f(0)")
    assert r.error is not None and r.error.type == "ZeroDivisionError"
    assert "<cell-" in r.error.traceback and "return 10 // n" in r.error.traceback
    assert "worker.py" not in r.error.traceback
    r = run("def broken(:")
    assert r.error is not None and r.error.type == "SyntaxError"
    r = run("raise SystemExit(5)")
    assert r.error is not None and r.error.type == "SystemExit"
    assert run("x").value == "2"  # the worker survived all of that
    r = run("print('y' * 2_000_000)")
    assert r.error is None and len(r.stdout) < 600_000 and "not captured" in r.stdout


def test_run_code_worker_crash_and_timeout(agent: Agent) -> None:
    run = agent.client.run_code
    run("state = 'kept'")
    r = run("import os; os._exit(3)")
    assert r.error is not None and r.error.type == "WorkerCrashed"
    assert "status 3" in r.error.message and "lost" in r.error.message
    r = run("state")
    assert r.error is not None and r.error.type == "NameError"
    # Past its timeout a cell is interrupted, and the worker and its namespace carry on.
    run("state = 'kept'\nimport os\npid = os.getpid()")
    r = run("print('before')\nwhile True: pass", timeout=0.5)
    assert r.error is not None and r.error.type == "WorkerTimeout", r
    assert "interrupted" in r.error.message and "kept" in r.error.message
    assert r.error.traceback.rstrip().endswith("KeyboardInterrupt")
    assert "<cell-" in r.error.traceback and r.stdout == "before\n"
    assert run("state, pid == os.getpid()").value == "('kept', True)"
    # A cell that catches the interrupt ends as it likes.
    # (Asleep in the loop: CPython's own `try: while True: pass` lets KeyboardInterrupt out.)
    caught = "import time\ntry:\n    while True: time.sleep(0.01)\n"
    caught += "except KeyboardInterrupt:\n    print('caught')\n7"
    r = run(caught, 0.5)
    assert (r.error, r.stdout, r.value) == (None, "caught\n", "7")
    # One that will not stop is killed, and its state goes with the worker.
    # (Ignoring SIGINT itself: a loop that catches KeyboardInterrupt can still let one out,
    # when the signal lands on the loop's own back edge, outside its try.)
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    r = run(stubborn, timeout=0.5)
    assert r.error is not None and r.error.type == "WorkerTimeout"
    assert "killed" in r.error.message and "lost" in r.error.message
    assert run("'state' in globals()").value == "False"
    assert run("1 + 1").value == "2"
    assert agent.client.ping()["worker"] == "ready"


def test_run_code_refuses_code_that_is_not_text(agent: Agent) -> None:
    with pytest.raises(TypeError, match="code as str, not bytes"):
        agent.client.run_code(b"6 * 7")
    assert agent.client.run_code("6 * 7").value == "42"


def test_an_interrupt_between_cells_is_ignored(agent: Agent) -> None:
    """SIGINT outside a cell (an interrupt that came late) must not break the worker."""
    run = agent.client.run_code
    pid = int(run("import os\nkept = 5\nos.getpid()").value or 0)
    for _ in range(3):
        os.kill(pid, signal.SIGINT)
        time.sleep(0.05)
    assert run("kept, os.getpid()").value == f"(5, {pid})"
    assert run("1 + 1").error is None  # the signals changed nothing for the next cell


# -- channels ---------------------------------------------------------------------------


@contextlib.contextmanager
def channel_server(path: str, **kwargs: int) -> Iterator[ChannelServer]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    try:
        with ChannelServer(listener, **kwargs) as server:
            yield server
    finally:
        os.unlink(path)


def test_channel_10000_frames_in_order(agent: Agent) -> None:
    code = (
        "from ember.agent import channel\n"
        "with channel('numbers', buffer_size=16384) as ch:\n"
        "    for i in range(10_000):\n"
        "        ch.send(b'%d' % i)\n"
        "'sent'"
    )
    with channel_server(agent.channel_path) as server, ThreadPoolExecutor(1) as pool:
        sending = pool.submit(agent.client.run_code, code)
        try:  # a CI host running the KVM tests beside this one took longer than 30 s once
            received = list(server.channel("numbers", timeout=120))
        except SandboxTimeout:
            pytest.fail(f"the cell never opened its channel; it returned {sending.result()!r}")
        assert sending.result().value == "'sent'"
    assert received == [b"%d" % i for i in range(10_000)]


def test_channel_backpressure_is_bounded(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "ch.sock")
    monkeypatch.setenv("EMBER_CHANNEL_UNIX", path)
    message = bytes(64 << 10)
    with channel_server(path, max_buffer=128 << 10) as server:

        def send() -> None:
            with channel("bulk") as ch:
                for i in range(256):  # 16 MiB: far beyond buffers on the way
                    ch.send(i.to_bytes(4, "big") + message)

        sender = threading.Thread(target=send)
        sender.start()
        stream = server.channel("bulk", timeout=10)
        time.sleep(0.3)
        assert sender.is_alive()  # blocked: nobody is reading
        got = [int.from_bytes(m[:4], "big") for m in stream]
        sender.join(10)
        assert got == list(range(256))
        with pytest.raises(SandboxTimeout):
            server.channel("never", timeout=0.1)


# -- robustness -------------------------------------------------------------------------


def read_until_closed(sock: socket.socket) -> list[tuple[Kind, bytes]]:
    frames = []
    with contextlib.suppress(OSError, protocol.ProtocolError):
        while (frame := read_frame(sock)) is not None:
            frames.append(frame)
    return frames


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack("<IB", 0x7FFF_FFFF, Kind.REQUEST),
        struct.pack("<IB", 2, 77) + b"{}",
        struct.pack("<IB", 2, Kind.STDIN) + b"{}",
        struct.pack("<IB", 3, Kind.REQUEST) + b"{x}",
        struct.pack("<IB", 13, Kind.REQUEST) + b'{"op":"nope"}',
        struct.pack("<IB", 4, Kind.REQUEST) + b"\xff\xfe[]",
    ],
)
def test_malformed_frames_close_only_that_connection(agent: Agent, garbage: bytes) -> None:
    busy = agent.client.exec_stream("sleep 0.3; echo survived")
    with agent.connect() as sock:
        sock.sendall(garbage)
        frames = read_until_closed(sock)
    assert [k for k, _ in frames] in ([], [Kind.ERROR])
    assert b"".join(c.data for c in busy) == b"survived\n"
    assert agent.client.ping()["pong"] is True


def test_protocol_violation_mid_upload(agent: Agent, tmp_path: Path) -> None:
    with agent.connect() as sock:
        write_json(sock, Kind.REQUEST, {"op": "file_write", "path": str(tmp_path / "f")})
        write_frame(sock, Kind.DATA, b"abc")
        write_frame(sock, Kind.STDOUT, b"wrong kind")
        frames = read_until_closed(sock)
    assert frames and frames[-1][0] is Kind.ERROR
    assert protocol.decode_json(frames[-1][1])["type"] == "ProtocolError"
    assert os.listdir(tmp_path) == []  # the temp file was cleaned up


def test_client_rejects_a_lying_agent() -> None:
    peers = []

    def fake_agent(reply: bytes) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.sendall(reply)
        theirs.shutdown(socket.SHUT_WR)
        peers.append(theirs)  # stays open to take the request
        return ours

    client = AgentClient(lambda: fake_agent(b""))
    with pytest.raises(ProtocolError, match="closed the connection"):
        client.ping()
    client = AgentClient(lambda: fake_agent(struct.pack("<IB", 2, Kind.RESULT) + b"[]"))
    with pytest.raises(ProtocolError):
        client.ping()
    bad = protocol.encode_json({"exit_code": "zero", "signal": None})
    client = AgentClient(lambda: fake_agent(struct.pack("<IB", len(bad), Kind.RESULT) + bad))
    with pytest.raises(ProtocolError, match="exit_code"):
        client.exec(["true"])


# -- asyncio client ---------------------------------------------------------------------


def test_async_client(agent: Agent, tmp_path: Path) -> None:
    async def main() -> None:
        client = agent.aclient()
        assert (await client.ping())["pong"] is True
        r = await client.exec("echo out; echo err >&2; exit 2")
        assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 2)
        r = await client.exec(["cat"], stdin=b"abc" * 100_000)
        assert r.stdout == b"abc" * 100_000
        with pytest.raises(SandboxTimeout) as info:
            await client.exec("echo $$; sleep 1000 & sleep 1000", timeout=0.3)
        assert info.value.result is not None
        assert wait_group_gone(int(info.value.result.stdout.split()[0])) == []
        with pytest.raises(ExecError):
            await client.exec(["no-such-program"])

        async def one(i: int) -> bytes:
            stream = client.exec_stream(f"for j in $(seq 20); do echo {i}.$j; done")
            return b"".join([c.data async for c in stream])

        outs = await asyncio.gather(*(one(i) for i in range(20)))
        for i, out in enumerate(outs):
            assert out == "".join(f"{i}.{j}\n" for j in range(1, 21)).encode()

        data = os.urandom(5 << 20)
        path = str(tmp_path / "async.bin")
        assert await client.files.write(path, data) == len(data)
        assert await client.files.read(path) == data
        assert (await client.files.stat(path)).size == len(data)
        assert [e.name for e in await client.files.list(str(tmp_path))] == ["async.bin"]
        await client.files.remove(path)
        with pytest.raises(FileNotFoundError):
            await client.files.read(path)

        assert (await client.run_code("a = 6")).error is None
        assert (await client.run_code("a * 7")).value == "42"

    asyncio.run(main())


def test_async_short_calls_reuse_one_kept_connection(agent: Agent) -> None:
    async def main() -> int:
        opened = 0

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            nonlocal opened
            opened += 1
            return await asyncio.open_unix_connection(agent.path)

        client = AsyncAgentClient(connect)
        for _ in range(4):
            assert (await client.ping())["pong"] is True
        assert (await client.run_code("6 * 7")).value == "42"
        await client.close()
        assert (await client.ping())["pong"] is True  # a fresh one after close
        await client.close()
        return opened

    assert asyncio.run(main()) == 2
