"""The agent's long-lived ops on a Unix socket (no KVM): ``pty``, ``watch``, streamed
``run_code``, through the production clients (``Terminal``, ``Watch``, ``run_code``'s
callbacks) and, for what a client would never send, the raw wire.

The agent is the real one (``python -m ember.agent``, the fixture of test_agent.py),
so the terminal is a real pseudo-terminal and the watch a real inotify watch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from ember.client.results import FileEvent
from ember.errors import AgentError
from ember.protocol import Kind, decode_json, read_frame, write_frame, write_json
from tests.unit.agent_rig import Agent, alive


def read_until(term: object, needle: bytes, timeout: float = 30.0) -> bytes:
    """What the terminal showed up to and including ``needle`` (fails past ``timeout``)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} never showed; the terminal showed {seen[-400:]!r}"
        chunk = term.read(timeout=left)  # type: ignore[attr-defined]
        assert chunk is not None, f"the program ended before {needle!r}: {seen[-400:]!r}"
        seen += chunk
    return seen


# -- pty ----------------------------------------------------------------------------------


def test_a_shell_on_a_terminal_runs_commands_and_reports_its_exit(agent: Agent) -> None:
    with agent.client.pty(["/bin/sh"], rows=30, cols=100) as term:
        term.write(b"echo hi-$((6*7)); tty; stty size\n")
        shown = read_until(term, b"30 100")
        assert b"hi-42" in shown
        assert b"/dev/pts/" in shown  # stdin is a real terminal
        term.write(b"exit 7\n")
        result = term.wait()
    assert result.exit_code == 7 and result.signal is None and not result.timed_out


def test_resize_reaches_the_program_and_ctrl_c_interrupts_it(agent: Agent) -> None:
    with agent.client.pty(["/bin/sh"]) as term:
        term.resize(50, 132)
        term.write(b"stty size\n")
        read_until(term, b"50 132")
        term.write(b"sleep 100; echo after-$((1+1))\n")
        time.sleep(0.5)
        term.write(b"\x03")  # the line discipline turns it into SIGINT for the foreground
        term.write(b"echo back-$((2+2))\n")
        shown = read_until(term, b"back-4")
        assert b"after-2" not in shown or shown.index(b"after-2") < shown.index(b"back-4")
        term.send_eof()  # ^D at the prompt ends the shell
        assert term.wait().exit_code == 0


def test_hanging_up_kills_the_program_on_the_terminal(agent: Agent, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    term = agent.client.pty(["/bin/sh", "-c", f"echo $$ > {pidfile}; echo started; exec sleep 300"])
    read_until(term, b"started")
    pid = int(pidfile.read_text())
    term.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    assert not alive(pid)


def test_a_terminal_timeout_kills_the_program_and_says_so(agent: Agent) -> None:
    with agent.client.pty(["sleep", "30"], timeout=1) as term:
        result = term.wait()
    assert result.timed_out and result.signal == signal.SIGKILL


def test_a_program_that_is_missing_or_a_bad_size_is_a_clear_error(agent: Agent) -> None:
    with agent.client.pty(["/no/such/program"]) as term:
        result = term.wait()
    assert result.exit_code != 0
    assert b"/no/such/program" in result.stdout  # setsid says what it could not run
    with pytest.raises(ValueError):
        agent.client.pty(rows=0)


def test_the_wire_refuses_garbage_controls_and_unexpected_frames(agent: Agent) -> None:
    with agent.connect() as sock:
        write_json(sock, Kind.REQUEST, {"op": "pty", "argv": ["/bin/sh"], "rows": 99999})
        frame = read_frame(sock)
        assert frame is not None and frame[0] is Kind.ERROR
        assert decode_json(frame[1])["type"] == "BadRequest"
    with agent.connect() as sock:
        write_json(sock, Kind.REQUEST, {"op": "pty", "argv": ["/bin/sh"]})
        write_frame(sock, Kind.DATA, b'{"signal": 9999}')
        kinds = []
        while (frame := read_frame(sock)) is not None:
            kinds.append(frame[0])
            if frame[0] is Kind.ERROR:
                assert decode_json(frame[1])["type"] == "BadRequest"
                break
        assert kinds[-1] is Kind.ERROR
    assert agent.client.ping()["pong"]  # the agent carries on


def test_a_paste_into_a_program_that_never_reads_does_not_wedge_the_agent(agent: Agent) -> None:
    with agent.client.pty(["sleep", "30"]) as term:
        sender = _spam(term)
        time.sleep(1.0)
        assert agent.client.ping()["pong"]
    sender.join(10)
    assert not sender.is_alive()


def _spam(term: object):  # type: ignore[no-untyped-def]
    import threading

    def run() -> None:
        try:
            for _ in range(64):
                term.write(b"x" * (64 << 10))  # type: ignore[attr-defined]
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_async_terminal(agent: Agent) -> None:
    async def main() -> bytes:
        client = agent.aclient()
        async with await client.pty(["/bin/sh"]) as term:
            await term.write(b"echo async-$((3*3))\nexit 3\n")
            result = await term.wait()
            assert result.exit_code == 3
            assert await term.read(timeout=0.1) is None  # ended: nothing more
            return result.stdout

    assert b"async-9" in asyncio.run(main())


# -- watch --------------------------------------------------------------------------------


def collect(watch: object, want: set[tuple[str, str]], timeout: float = 20.0) -> list[FileEvent]:
    """Events until every ``(type, path)`` in ``want`` was seen."""
    seen: list[FileEvent] = []
    deadline = time.monotonic() + timeout
    while not want <= {(e.type, e.path) for e in seen}:
        left = deadline - time.monotonic()
        assert left > 0, f"missing {want - {(e.type, e.path) for e in seen}}; saw {seen}"
        event = watch.get(timeout=left)  # type: ignore[attr-defined]
        if event is not None:
            seen.append(event)
    return seen


def test_watch_reports_creation_writes_renames_and_removal(agent: Agent, tmp_path: Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    with agent.client.files.watch(str(root)) as watch:
        (root / "a.txt").write_bytes(b"one")
        (root / "a.txt").rename(root / "b.txt")
        os.chmod(root / "b.txt", 0o600)
        (root / "b.txt").unlink()
        (root / "sub").mkdir()
        seen = collect(watch, {
            ("create", f"{root}/a.txt"), ("write", f"{root}/a.txt"),
            ("rename", f"{root}/a.txt"), ("create", f"{root}/b.txt"),
            ("chmod", f"{root}/b.txt"), ("remove", f"{root}/b.txt"), ("create", f"{root}/sub"),
        })  # fmt: skip
    assert [e.is_dir for e in seen if e.path == f"{root}/sub"] == [True]
    kinds = [(e.type, e.path) for e in seen]
    assert kinds.index(("create", f"{root}/a.txt")) < kinds.index(("remove", f"{root}/b.txt"))


def test_a_recursive_watch_follows_new_directories_and_ends_when_its_root_goes(
    agent: Agent, tmp_path: Path
) -> None:
    root = tmp_path / "r"
    (root / "old").mkdir(parents=True)
    with agent.client.files.watch(str(root), recursive=True) as watch:
        (root / "old" / "x").write_bytes(b"")
        (root / "new").mkdir()
        collect(watch, {("create", f"{root}/old/x"), ("create", f"{root}/new")})
        time.sleep(0.2)  # the agent adds its watch on "new" as it sees it created
        (root / "new" / "y").write_bytes(b"")
        collect(watch, {("create", f"{root}/new/y")})
        for path in (root / "old" / "x", root / "new" / "y"):
            path.unlink()
        for path in (root / "old", root / "new", root):
            path.rmdir()
        while watch.get(timeout=10) is not None:
            pass
        assert watch.ended == "removed"


def test_a_plain_watch_does_not_see_inside_subdirectories(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with agent.client.files.watch(str(tmp_path)) as watch:
        (tmp_path / "d" / "inner").write_bytes(b"")
        (tmp_path / "top").write_bytes(b"")
        seen = collect(watch, {("create", f"{tmp_path}/top")})
    assert all("inner" not in e.path for e in seen)


def test_watching_what_is_not_a_directory_is_a_clear_error(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(AgentError, match="No such file"):
        agent.client.files.watch(str(tmp_path / "missing"))
    with pytest.raises(AgentError, match="not a directory"):
        agent.client.files.watch(str(tmp_path / "f"))
    with pytest.raises(AgentError, match="absolute"):
        agent.client.files.watch("relative/dir")


def test_closing_a_watch_ends_it_in_the_agent(agent: Agent, tmp_path: Path) -> None:
    before = _inotify_fds(agent.proc.pid)
    watches = [agent.client.files.watch(str(tmp_path)) for _ in range(3)]
    assert _inotify_fds(agent.proc.pid) == before + 3
    for watch in watches:
        watch.close()
    deadline = time.monotonic() + 10
    while _inotify_fds(agent.proc.pid) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inotify_fds(agent.proc.pid) == before


def _inotify_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


def test_the_async_watch(agent: Agent, tmp_path: Path) -> None:
    async def main() -> list[FileEvent]:
        client = agent.aclient()
        async with await client.files.watch(str(tmp_path)) as watch:
            assert await watch.get(timeout=0.05) is None  # nothing happened yet
            (tmp_path / "z").write_bytes(b"")
            first = await watch.get(timeout=20)
            assert first is not None
            return [first]

    assert asyncio.run(main())[0] == FileEvent("create", f"{tmp_path}/z", False)


# -- streamed run_code --------------------------------------------------------------------


def test_streamed_run_code_delivers_output_before_the_result(agent: Agent) -> None:
    pieces: list[tuple[str, float]] = []
    errors: list[str] = []
    code = (
        "import sys, time\n"
        "print('first', flush=True)\n"
        "time.sleep(0.5)\n"
        "print('é-second')\n"
        "print('oops', file=sys.stderr)\n"
        "6 * 7"
    )
    started = time.monotonic()
    result = agent.client.run_code(
        code,
        on_stdout=lambda text: pieces.append((text, time.monotonic())),
        on_stderr=errors.append,
    )
    ended = time.monotonic()
    assert "".join(text for text, _ in pieces) == "first\né-second\n" == result.stdout
    assert "".join(errors) == "oops\n" == result.stderr
    assert result.value == "42"
    first_at = next(at for text, at in pieces if "first" in text)
    assert first_at - started < ended - started - 0.4  # it came while the cell slept
    plain = agent.client.run_code(code)
    assert (plain.stdout, plain.stderr, plain.value) == (result.stdout, result.stderr, "42")


def test_streamed_run_code_past_its_timeout_and_in_asyncio(agent: Agent) -> None:
    seen: list[str] = []
    result = agent.client.run_code(
        "print('before', flush=True)\nimport time\ntime.sleep(30)", 1.0, on_stdout=seen.append
    )
    assert result.error is not None and result.error.type == "WorkerTimeout"
    assert seen == ["before\n"]

    async def main() -> str:
        got: list[str] = []
        client = agent.aclient()
        res = await client.run_code("for i in range(3): print(i)", on_stdout=got.append)
        assert "".join(got) == res.stdout
        return res.stdout

    assert asyncio.run(main()) == "0\n1\n2\n"


def test_a_streamed_cell_whose_host_left_still_finishes(agent: Agent) -> None:
    with agent.connect() as sock:
        code = "import time\nfor i in range(5): print(i, flush=True); time.sleep(0.05)\nleft = 1"
        write_json(sock, Kind.REQUEST, {"op": "run_code", "code": code, "stream": True})
        frame = read_frame(sock)
        assert frame is not None and frame[0] is Kind.STDOUT
        sock.shutdown(socket.SHUT_RDWR)
    assert agent.client.run_code("left").value == "1"  # the cell ran to its end
