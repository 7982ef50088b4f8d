"""The daemon's ``/pty/ws`` route and the SDK's remote terminals, without KVM.

The route (behind the real token guard, in a real uvicorn) opens its terminals on
the real agent of ``agent_rig`` on a Unix socket, so everything but the VM is the
production path: ``RemoteTerminal``/``AsyncRemoteTerminal`` -> WebSocket ->
``terminal_ws`` -> ``Terminal`` -> agent -> a real pseudo-terminal on this host.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from websockets.sync.client import connect

from ember.client import AgentClient
from ember.client.terminal import Terminal
from ember.sandbox import Sandbox
from ember.sandbox import remote_terminal as rt
from ember.sandbox.wire import ServerError
from ember.serve import terminal_ws
from ember.serve.guard import Guard
from ember.serve.manager import Entry, Manager, NotFound
from ember.serve.state import Record
from tests.integration.serve_daemon import free_port
from tests.shell_rig import HostTerminal
from tests.unit.agent_rig import Agent, alive
from tests.unit.test_agent_terminal import read_until

TOKEN = "t" * 43
SID = "sb-pty"
AUTH = f"Bearer {TOKEN}"
PATH = f"/sandboxes/{SID}/pty/ws"


class _AgentSandbox:
    """What the route uses of a Sandbox: ``pty``, here straight to the agent."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    def pty(self, *args: Any, **kwargs: Any) -> Terminal:
        return self.client.pty(*args, **kwargs)


class _Manager:
    """What the route uses of the daemon's Manager: the real idle hold on one entry."""

    holding = Manager.holding

    def __init__(self) -> None:
        record = Record(id=SID, dir="/nonexistent", pid=0, template="default", created_at=0.0)
        self.entry = Entry(record, None)

    def get(self, sandbox_id: str) -> Entry:
        if sandbox_id != SID:
            raise NotFound(sandbox_id)
        return self.entry


MANAGER = _Manager()


@pytest.fixture(scope="module")
def server(agent: Agent) -> Iterator[str]:
    def call(sandbox_id: str, op: Any) -> Any:
        if sandbox_id != SID:
            raise NotFound(sandbox_id)
        return op(cast(Sandbox, _AgentSandbox(agent.client)))

    app = FastAPI()
    terminal_ws.register(app, call, cast(Manager, MANAGER))

    @app.get("/sandboxes/{sandbox_id}")
    def get(sandbox_id: str) -> JSONResponse:  # what `ember shell` asks first
        if sandbox_id != SID:
            error = {"code": "not_found", "message": f"no sandbox {sandbox_id!r}"}
            return JSONResponse({"error": error}, status_code=404)
        return JSONResponse({"id": SID, "metadata": {}})

    port = free_port()
    config = uvicorn.Config(Guard(app, token=TOKEN, max_body=1 << 20), host="127.0.0.1",
                            port=port, log_level="warning")  # fmt: skip
    daemon = uvicorn.Server(config)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not daemon.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    daemon.should_exit = True
    thread.join(30)


def open_term(server: str, argv: list[str] | None, **kwargs: Any) -> rt.RemoteTerminal:
    size = {"rows": 24, "cols": 80, **kwargs}
    first = rt.request(argv, env=None, cwd=None, timeout=None, **size)
    return rt.open_sync(server, AUTH, PATH, first)


def test_a_shell_over_the_socket_echoes_resizes_and_takes_ctrl_c(server: str) -> None:
    with open_term(server, ["/bin/sh"], rows=30, cols=100) as term:
        term.write(b"echo hi-$((6*7)); tty; stty size\n")
        shown = read_until(term, b"30 100")
        assert b"hi-42" in shown and b"/dev/pts/" in shown
        term.resize(50, 132)
        term.write(b"stty size\n")
        read_until(term, b"50 132")
        # the job says "go" once it runs in the foreground: a ^C sooner could reach the shell
        term.write(b"sh -c 'echo go-$((1+1)); exec sleep 100'\n")
        read_until(term, b"go-2")
        term.write(b"\x03")  # ^C: SIGINT for the sleep, from the guest's line discipline
        term.write(b"echo back-$((2+3))\n")
        read_until(term, b"back-5")
        term.send_eof()
        result = term.wait()
        assert term.read() is None  # ended: nothing more
        with pytest.raises(OSError):  # as from an in-process terminal
            term.write(b"late")
    assert result.exit_code == 0 and not result.timed_out
    assert term.result is not None and term.result.exit_code == 0


def test_the_exit_message_says_how_the_program_ended(server: str) -> None:
    url = f"ws://{server.partition('://')[2]}{PATH}"
    with connect(url, additional_headers={"Authorization": AUTH}) as ws:
        ws.send(json.dumps({"argv": ["/bin/sh", "-c", "read x; echo got-$x; kill -TERM $$"]}))
        ws.send(b"it\n")
        out = b""
        while isinstance(message := ws.recv(timeout=30), bytes):
            out += message
        end = json.loads(message)
    assert b"got-it" in out
    assert end["type"] == "exit" and end["signal"] == 15 and end["exit_code"] is None
    assert set(end) == {"type", "exit_code", "signal", "timed_out", "duration"}


def test_hanging_up_kills_the_program(server: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    term = open_term(server, ["/bin/sh", "-c", f"echo $$ > {pidfile}; echo up; exec sleep 300"])
    read_until(term, b"up")
    pid = int(pidfile.read_text())
    term.close()
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the program outlived its terminal"
        time.sleep(0.05)


def test_refusals_are_the_daemons_error_codes(server: str) -> None:
    first = rt.request(None, rows=24, cols=80, env=None, cwd=None, timeout=None)
    with pytest.raises(ServerError) as refused:
        rt.open_sync(server, "Bearer wrong", PATH, first)
    assert refused.value.code == "unauthorized"
    missing_path = "/sandboxes/sb-nope/pty/ws"
    with (
        rt.open_sync(server, AUTH, missing_path, first) as term,
        pytest.raises(ServerError) as missing,
    ):
        term.read(30)
    assert missing.value.code == "not_found"
    with rt.open_sync(server, AUTH, PATH, '{"rows": 0}') as term, pytest.raises(ServerError) as bad:
        term.read(30)
    assert bad.value.code == "invalid_request"
    raw = open_term(server, ["/bin/sh"])
    with raw as term:
        raw._ws.send(json.dumps({"type": "resize", "rows": 0, "cols": 1}))
        with pytest.raises(ServerError) as control:
            term.wait()
    assert control.value.code == "invalid_request"
    with pytest.raises(ValueError):
        rt.request(None, rows=24, cols=0, env=None, cwd=None, timeout=None)


def test_the_async_terminal(server: str) -> None:
    async def main() -> bytes:
        first = rt.request(["/bin/sh"], rows=24, cols=80, env={"WHO": "async"}, cwd="/tmp",
                           timeout=None)  # fmt: skip
        async with await rt.open_async(server, AUTH, PATH, first) as term:
            await term.write(b"echo $WHO-$((3*3)) $(pwd)\n")
            await term.resize(40, 90)
            await term.write(b"stty size; exit 3\n")
            result = await term.wait()
            assert result.exit_code == 3 and term.result is not None
            assert await term.read(timeout=0.1) is None
            return result.stdout

    out = asyncio.run(main())
    assert b"async-9 /tmp" in out and b"40 90" in out


def test_a_timeout_is_reported_in_the_exit_message(server: str) -> None:
    first = rt.request(["sleep", "30"], rows=24, cols=80, env=None, cwd=None, timeout=1)
    with rt.open_sync(server, AUTH, PATH, first) as term:
        result = term.wait()
    assert result.timed_out and result.signal == 9


def shell_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    pythonpath = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "EMBER_TOKEN": TOKEN, "PYTHONPATH": pythonpath}


def shell_argv(server: str) -> list[str]:
    return [sys.executable, "-m", "ember.cli.main", "shell", "--server", server, SID, "--",
            "/bin/sh"]  # fmt: skip


def test_ember_shell_on_a_host_terminal(server: str) -> None:
    argv = shell_argv(server)
    host = HostTerminal(argv, shell_env(), rows=30, cols=100)
    host.type(b"echo hi-$((6*7)); stty size\r")  # raw here: \r reaches the guest as typed
    assert b"30 100" in host.read_until(b"hi-42") + host.read_until(b"30 100")
    host.resize(40, 120)
    host.type(b"exit 3\r")
    assert host.finish() == 3


def test_ember_shell_with_a_pipe_for_stdin(server: str) -> None:
    argv = shell_argv(server)
    done = subprocess.run(argv, input=b"echo hi-$((6*7))\n", capture_output=True,
                          env=shell_env(), timeout=120)  # fmt: skip
    assert done.returncode == 0 and b"hi-42" in done.stdout  # ^D at the end ended the shell
    argv[-3] = "sb-nope"
    done = subprocess.run(argv, capture_output=True, env=shell_env(), timeout=120)
    assert done.returncode == 2 and b"not_found" in done.stderr


def test_an_open_terminal_keeps_its_sandbox_from_idling(server: str) -> None:
    term = open_term(server, ["/bin/sh"])
    try:
        term.write(b"echo held-$((2*3))\n")
        seen = b""
        while b"held-6" not in seen:
            seen += term.read(timeout=30) or b""
        assert MANAGER.entry.streams == 1  # the idle reaper skips it meanwhile
    finally:
        term.close()
    deadline = time.monotonic() + 30
    while MANAGER.entry.streams:
        assert time.monotonic() < deadline, "the terminal's hold outlived it"
        time.sleep(0.02)
