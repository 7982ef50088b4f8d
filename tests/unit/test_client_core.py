"""The client's sans-IO core, fed frames directly: no sockets, no threads, a fake clock.

Each operation says what to do next (:class:`Send`, :class:`Receive`) and is fed what
came back (a frame, ``None`` at EOF, ``EXPIRED``); the rules of the protocol (order of
frames, ERROR frames, ``max_output``, the host's deadlines, keepalive) live here once,
for every transport.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from ember import protocol
from ember.client.bounds import WORKER_START_ALLOWANCE
from ember.client.core import EXPIRED, Call, ExecOp, ReadFile, Receive, Send, WriteFile
from ember.client.session import KeepalivePool, Session
from ember.errors import (
    AgentError,
    AgentFileNotFoundError,
    ExecError,
    OutputTooLarge,
    ProtocolError,
    SandboxTimeout,
)
from ember.protocol import CHUNK_SIZE, Kind


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(clock: Clock | None = None, **kwargs: Any) -> Session:
    return Session(grace=1.0, call_timeout=10.0, clock=clock or Clock(), **kwargs)


def result(obj: object) -> tuple[Kind, bytes]:
    return Kind.RESULT, json.dumps(obj).encode()


def error(type_name: str, message: str = "no") -> tuple[Kind, bytes]:
    return Kind.ERROR, protocol.error_payload(type_name, message)


EXEC_OK = {"exit_code": 0, "signal": None, "timed_out": False, "duration": 0.5}
EXEC_TIMED_OUT = {"exit_code": None, "signal": 9, "timed_out": True, "duration": 2.0}


def start(s: Session, op: Any) -> dict[str, Any]:
    """What a transport does first: encode (and so start) the op's REQUEST."""
    return protocol.decode_json(s.request(op))


# -- short calls -----------------------------------------------------------------------


def test_a_short_call_is_one_receive_then_its_value() -> None:
    s = session()
    op = s.stat("/etc/hosts")
    assert start(s, op) == {"op": "stat", "path": "/etc/hosts", "keepalive": True}
    step = op.next()
    assert isinstance(step, Receive) and step.deadline is not None
    assert step.deadline.at == 1000.0 + 10.0 + 1.0  # call_timeout + grace, on the given clock
    st = {"size": 3, "mode": 0o100644, "mtime": 1.5, "is_dir": False, "is_file": True}
    assert op.receive(result(st)) is None
    assert op.next() is None and op.value.size == 3 and op.reusable


def test_an_error_reply_raises_and_leaves_the_connection_usable() -> None:
    s = session()
    op = s.list("/nope")
    start(s, op)
    op.next()
    with pytest.raises(AgentFileNotFoundError):
        op.receive(error("FileNotFoundError"))
    assert op.reusable  # an error reply ends the exchange cleanly


@pytest.mark.parametrize(
    "frame",
    [None, (Kind.RESULT, b"[1]"), (Kind.RESULT, b"{nope"), (Kind.STDOUT, b"x"),
     (Kind.ERROR, b'{"type": 1}')],
)  # fmt: skip
def test_anything_but_an_answer_is_a_protocol_error_and_drops_the_connection(
    frame: tuple[Kind, bytes] | None,
) -> None:
    s = session()
    op = s.ping()
    start(s, op)
    op.next()
    with pytest.raises(ProtocolError):
        op.receive(frame)
    assert not op.reusable


def test_a_silent_agent_expires_the_call() -> None:
    s = session()
    op = s.remove("/x", recursive=True)
    assert start(s, op)["recursive"] is True
    op.next()
    with pytest.raises(SandboxTimeout, match=r"did not finish 'remove'.*hung up"):
        op.receive(EXPIRED)
    assert not op.reusable


def test_run_code_deadlines() -> None:
    s = session()
    unbounded = s.run_code("1", None)
    assert unbounded.next() == Receive(None)  # the code may run as long as it likes
    assert unbounded.send_deadline is not None  # the request may not
    bounded = s.run_code("1", 2.0)
    step = bounded.next()
    assert isinstance(step, Receive) and step.deadline is not None
    assert step.deadline.seconds == 2.0 + WORKER_START_ALLOWANCE + 1.0
    assert start(s, bounded) == {"op": "run_code", "code": "1", "timeout": 2.0, "keepalive": True}


def test_shutdown_is_not_kept_alive() -> None:
    s = session()
    op = s.shutdown()
    assert start(s, op) == {"op": "shutdown"} and not op.keepalive
    op.next()
    op.receive(result({}))
    assert op.value is None and not op.reusable


def test_only_the_first_request_announces_the_resume() -> None:
    s = session(announce_resume=True)
    first, second = s.ping(), s.ping()
    assert set(start(s, first)["resume"]) == {"realtime_ns", "entropy"}
    assert "resume" not in start(s, second)


def test_arguments_are_checked_before_anything_is_sent() -> None:
    s = session()
    with pytest.raises(ValueError, match="timeout"):
        s.exec(["true"], timeout=0, env=None, cwd=None, stdin=False)
    with pytest.raises(ValueError, match="max_output"):
        s.exec(["true"], timeout=None, env=None, cwd=None, stdin=False, max_output=-1)
    with pytest.raises(ValueError, match="max_output"):
        s.read_file("/x", io.BytesIO().write, True)  # type: ignore[arg-type]


# -- exec --------------------------------------------------------------------------------


def exec_op(s: Session, **kwargs: Any) -> ExecOp:
    kwargs.setdefault("timeout", None)
    op = s.exec("echo hi", env={"A": "1"}, cwd="/tmp", stdin=False, **kwargs)
    start(s, op)
    return op


def test_exec_streams_chunks_then_its_result() -> None:
    op = exec_op(session())
    assert op.request == {"op": "exec", "stdin": False, "shell": "echo hi", "env": {"A": "1"},
                          "cwd": "/tmp"}  # fmt: skip
    assert op.next() == Receive(None)  # no timeout: as long as the command runs
    chunk = op.receive((Kind.STDOUT, b"hi\n"))
    assert chunk is not None and (chunk.stream, chunk.data) == ("stdout", b"hi\n")
    chunk = op.receive((Kind.STDERR, b"warn"))
    assert chunk is not None and chunk.stream == "stderr"
    assert op.receive(result(EXEC_OK)) is None
    assert op.next() is None and op.value.exit_code == 0 and op.value.stdout == b""


def test_exec_collecting_keeps_the_output_up_to_max_output() -> None:
    op = exec_op(session(), collect=True, max_output=5)
    assert op.receive((Kind.STDOUT, b"abc")) is None
    assert op.receive((Kind.STDERR, b"de")) is None
    op.receive(result(EXEC_OK))
    assert (op.value.stdout, op.value.stderr) == (b"abc", b"de")

    over = exec_op(session(), collect=True, max_output=5)
    over.receive((Kind.STDOUT, b"abc"))
    with pytest.raises(OutputTooLarge) as info:
        over.receive((Kind.STDOUT, b"def"))
    assert info.value.limit == 5


def test_exec_that_overran_its_timeout_raises_with_the_partial_result() -> None:
    op = exec_op(session(), timeout=2.0, collect=True)
    op.receive((Kind.STDOUT, b"partial"))
    with pytest.raises(SandboxTimeout, match="overran its timeout") as info:
        op.receive(result(EXEC_TIMED_OUT))
    partial = info.value.result
    assert partial is not None and partial.timed_out and partial.stdout == b"partial"
    assert op.result is partial


def test_exec_the_agent_never_finished_gives_a_host_timeout_result() -> None:
    clock = Clock()
    s = session(clock)
    op = exec_op(s, timeout=2.0, collect=True)
    step = op.next()
    assert isinstance(step, Receive) and step.deadline is not None
    assert step.deadline.at == 1000.0 + 2.0 + 1.0
    op.receive((Kind.STDERR, b"so far"))
    clock.now += 3.5
    with pytest.raises(SandboxTimeout, match="hung up") as info:
        op.receive(EXPIRED)
    partial = info.value.result
    assert partial is not None and partial.timed_out and partial.exit_code is None
    assert partial.stderr == b"so far" and partial.duration == 3.5
    assert op.next() is None


def test_exec_errors() -> None:
    op = exec_op(session())
    with pytest.raises(ExecError):
        op.receive(error("ExecError", "no such program"))
    with pytest.raises(ProtocolError, match="closed the connection"):
        exec_op(session()).receive(None)
    failed = exec_op(session())
    failed.stdin_failed(UnicodeError("the caller's stdin broke"))
    with pytest.raises(UnicodeError):
        failed.receive(None)  # the transport hung up because stdin failed: say why
    with pytest.raises(ProtocolError, match="out of range"):
        exec_op(session()).receive(result({**EXEC_OK, "exit_code": 10**400}))


def test_exec_files_go_in_the_request_checked_and_must_be_acknowledged() -> None:
    s = session()
    op = s.exec(["python3", "/tmp/a.py"], timeout=None, env=None, cwd=None, stdin=False,
                files={"/tmp/a.py": b"print(1)\n", "/tmp/d/b": bytearray(b"\0\xff")})  # fmt: skip
    assert start(s, op)["files"] == [
        {"path": "/tmp/a.py", "data": "cHJpbnQoMSkK"},
        {"path": "/tmp/d/b", "data": "AP8="},
    ]
    op.next()
    assert op.receive(result({**EXEC_OK, "files": 2})) is None and op.value.exit_code == 0

    older = s.exec(["true"], timeout=None, env=None, cwd=None, stdin=False,
                   files={"/tmp/x": b"x"})  # fmt: skip
    start(s, older)
    with pytest.raises(ProtocolError, match="wrote 0 of the command's 1 files"):
        older.receive(result(EXEC_OK))  # an agent that ignored them: said, not silent

    def build(files: Any) -> None:
        s.exec(["true"], timeout=None, env=None, cwd=None, stdin=False, files=files)

    with pytest.raises(ValueError, match="not an absolute guest path"):
        build({"tmp/a.py": b""})
    with pytest.raises(ValueError, match="not an absolute guest path"):
        build({"/tmp/a\0b": b""})
    with pytest.raises(TypeError, match="must be bytes"):
        build({"/tmp/a": "text"})
    with pytest.raises(TypeError, match="map guest paths"):
        build([("/tmp/a", b"")])
    with pytest.raises(ValueError, match="at most 512 KiB"):
        build({"/tmp/a": bytes(300 << 10), "/tmp/b": bytes(300 << 10)})
    whole = s.exec(["true"], timeout=None, env=None, cwd=None, stdin=False,
                   files={"/tmp/a": bytes(512 << 10)})  # fmt: skip
    assert len(s.request(whole)) <= protocol.MAX_FRAME  # the limit itself fits in one frame
    assert "files" not in start(s, s.exec("true", timeout=None, env=None, cwd=None,
                                          stdin=False, files={}))  # fmt: skip


# -- files -------------------------------------------------------------------------------


def test_read_file_streams_into_the_sink_and_checks_the_size() -> None:
    s = session()
    sink = io.BytesIO()
    op = s.read_file("/data", sink.write, None)
    assert start(s, op) == {"op": "file_read", "path": "/data"}
    step = op.next()
    assert isinstance(step, Receive) and step.deadline is not None
    assert "transfer of /data made no progress" in str(step.deadline.expired())
    op.receive((Kind.DATA, b"abc"))
    op.receive((Kind.DATA, b"de"))
    op.receive((Kind.DATA_EOF, b""))
    step = op.next()
    assert isinstance(step, Receive) and step.deadline is not None
    assert "'file_read'" in str(step.deadline.expired())
    op.receive(result({"size": 5}))
    assert op.next() is None and op.value == 5 and sink.getvalue() == b"abcde"


def test_read_file_refusals() -> None:
    s = session()
    over = s.read_file("/big", io.BytesIO().write, 4)
    with pytest.raises(OutputTooLarge, match="read_into"):
        over.receive((Kind.DATA, b"12345"))
    lying = s.read_file("/x", io.BytesIO().write, None)
    lying.receive((Kind.DATA, b"12"))
    lying.receive((Kind.DATA_EOF, b""))
    with pytest.raises(ProtocolError, match="sent 2 bytes but said 3"):
        lying.receive(result({"size": 3}))
    with pytest.raises(AgentFileNotFoundError):
        s.read_file("/x", io.BytesIO().write, None).receive(error("FileNotFoundError"))
    with pytest.raises(ProtocolError, match="unexpected STDOUT"):
        s.read_file("/x", io.BytesIO().write, None).receive((Kind.STDOUT, b""))
    silent = s.read_file("/x", io.BytesIO().write, None)
    silent.next()
    with pytest.raises(SandboxTimeout, match="made no progress"):
        silent.receive(EXPIRED)


def test_write_file_sends_frames_then_reads_the_answer() -> None:
    s = session()
    data = bytes(CHUNK_SIZE + 10)
    op = s.write_file("/out", data, 0o600, False)
    assert start(s, op) == {
        "op": "file_write", "path": "/out", "append": False, "mode": 0o600,
        "size": CHUNK_SIZE + 10,  # known up front: the agent sizes the file (huge tmpfs pages)
    }  # fmt: skip
    appending = s.write_file("/log", io.BytesIO(b"streamed"), None, True)
    assert "size" not in start(s, appending)  # an append is never sized, nor a stream
    steps = [op.next(), op.next(), op.next()]
    assert [(st.kind, len(bytes(st.payload))) for st in steps if isinstance(st, Send)] == [
        (Kind.DATA, CHUNK_SIZE),
        (Kind.DATA, 10),
        (Kind.DATA_EOF, 0),
    ]
    assert isinstance(op.next(), Receive)
    op.receive(result({"size": CHUNK_SIZE + 10}))
    assert op.next() is None and op.value == CHUNK_SIZE + 10


def test_write_file_checks_what_the_agent_says_it_wrote() -> None:
    s = session()
    op = s.write_file("/out", b"abc", None, True)
    while isinstance(op.next(), Send):
        pass
    with pytest.raises(ProtocolError, match="took 3 bytes but said it wrote 4"):
        op.receive(result({"size": 4}))


def test_write_file_whose_upload_broke_reads_the_agents_reason() -> None:
    s = session()
    op = s.write_file("/out", io.BytesIO(b"x" * 10), None, False)
    assert isinstance(op.next(), Send)
    op.send_failed(BrokenPipeError("gone"))
    assert isinstance(op.next(), Receive)  # the agent may still have said why
    with pytest.raises(AgentError):
        op.receive(error("OSError", "disk full"))
    again = s.write_file("/out", b"x", None, False)
    again.next()
    again.send_failed(BrokenPipeError("gone"))
    again.next()
    with pytest.raises(ProtocolError, match="upload to /out failed"):
        again.receive(None)


# -- the keepalive pool ------------------------------------------------------------------


def test_the_keepalive_pool_runs_on_the_clock_it_is_given() -> None:
    clock = Clock()
    pool: KeepalivePool[str] = KeepalivePool(clock, idle=0.5, limit=2)
    assert pool.pop() is None
    assert pool.put("a")
    clock.now += 0.3
    assert pool.put("b")
    assert not pool.put("c")  # full: the caller closes it
    assert pool.expire() == []
    clock.now += 0.25
    assert pool.expire() == ["a"] and len(pool) == 1
    assert pool.pop() == "b" and pool.pop() is None
    pool.put("d")
    assert pool.drain() == ["d"] and len(pool) == 0


def test_the_pool_says_when_its_oldest_connection_is_due() -> None:
    clock = Clock()
    pool: KeepalivePool[str] = KeepalivePool(clock, idle=5.0)
    assert pool.next_expiry() is None  # nothing kept: no timer to arm
    pool.put("a")
    clock.now += 2.0
    pool.put("b")
    assert pool.next_expiry() == pytest.approx(3.0)  # "a", not "b" and not a full period
    clock.now += 4.0
    assert pool.next_expiry() == 0.0  # overdue, never negative
    assert pool.expire() == ["a"]
    assert pool.next_expiry() == pytest.approx(1.0)


def test_the_pool_hands_out_the_newest_first() -> None:
    pool: KeepalivePool[int] = KeepalivePool(Clock())
    for conn in (1, 2, 3):
        pool.put(conn)
    assert [pool.pop(), pool.pop(), pool.pop()] == [3, 2, 1]


def test_an_operation_has_no_value_before_it_finishes() -> None:
    op: Call[Any] = session().ping()
    with pytest.raises(RuntimeError, match="not finished"):
        _ = op.value
    assert isinstance(session().write_file("/x", b"", None, False), WriteFile)
    assert isinstance(session().read_file("/x", io.BytesIO().write, None), ReadFile)
