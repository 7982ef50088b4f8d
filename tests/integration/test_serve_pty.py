"""Terminals through a real daemon: ``/sandboxes/ID/pty/ws``, ``sb.pty()`` of a daemon's
sandbox (blocking and asyncio), and ``ember shell`` on a pseudo-terminal of this host.

One daemon and one sandbox serve the whole module (guest processes are slow to start
here, so each test does several things in one terminal).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ember import AsyncSandbox, Sandbox
from ember.sandbox.remote import RemoteSandbox
from ember.sandbox.remote_async import AsyncRemoteSandbox
from tests.integration.conftest import ember_command
from tests.integration.serve_daemon import Daemon, running_daemon
from tests.shell_rig import HostTerminal
from tests.unit.test_agent_terminal import read_until

pytestmark = pytest.mark.kvm
WAIT = 120.0  # for anything the guest does (a process start is about a second here)
LIMIT = 300.0  # a terminal's own timeout: a test that goes wrong fails instead of hanging


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("serve-pty")) as d:
        yield d


@pytest.fixture(scope="module")
def sandbox_id(daemon: Daemon) -> str:
    with daemon.client() as api:
        reply = api.post("/sandboxes", json={"timeout": 3600, "metadata": {"suite": "pty"}})
    assert reply.status_code == 201, reply.text
    sid: str = reply.json()["id"]
    return sid  # deleted with the daemon's other sandboxes when the module ends


@pytest.fixture
def sb(daemon: Daemon, sandbox_id: str) -> Iterator[RemoteSandbox]:
    remote = Sandbox.connect(sandbox_id, server=daemon.url)
    assert isinstance(remote, RemoteSandbox)
    yield remote
    remote.detach()  # the sandbox stays for the next test


@pytest.fixture(autouse=True)
def token(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("EMBER_TOKEN", daemon.token)
    monkeypatch.delenv("EMBER_SERVER", raising=False)
    return daemon.token


def ws_read_until(ws: ClientConnection, needle: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Output up to ``needle``, or to the end (then the final text message, decoded)."""
    seen = b""
    deadline = time.monotonic() + WAIT
    while needle not in seen:
        message = ws.recv(timeout=max(deadline - time.monotonic(), 0.1))
        if isinstance(message, str):
            return seen, json.loads(message)
        seen += message
    return seen, None


def test_a_terminal_over_the_websocket(daemon: Daemon, sandbox_id: str, token: str) -> None:
    url = f"ws://127.0.0.1:{daemon.port}/sandboxes/{sandbox_id}/pty/ws"
    auth = {"Authorization": f"Bearer {token}"}
    with connect(url, additional_headers=auth) as ws:
        ws.send(json.dumps({"rows": 30, "cols": 100, "timeout": LIMIT}))  # a login shell
        ws.send(b"echo hi-$((6*7))\n")
        assert ws_read_until(ws, b"hi-42")[1] is None
        ws.send(b"python3 -c 'import sys; print(sys.stdin.isatty(), 7*6)'; stty size\n")
        assert ws_read_until(ws, b"True 42")[1] is None
        assert ws_read_until(ws, b"30 100")[1] is None
        ws.send(b"exit 5\n")
        shown, end = ws_read_until(ws, b"never shown")
        assert end is not None and end["type"] == "exit", (shown, end)
        assert (end["exit_code"], end["signal"], end["timed_out"]) == (5, None, False)
    with connect(url.replace(sandbox_id, "sb-nope"), additional_headers=auth) as ws:
        ws.send("{}")
        event = json.loads(ws.recv(timeout=WAIT))
        assert event["type"] == "error" and event["error"]["code"] == "not_found"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=WAIT)
    assert ws.close_code == 1008
    with pytest.raises(InvalidStatus):
        connect(url, additional_headers={"Authorization": "Bearer wrong"})


def test_resize_and_ctrl_c_through_the_sdk(sb: RemoteSandbox) -> None:
    with sb.pty(rows=24, cols=80, timeout=LIMIT) as term:
        term.resize(50, 132)
        term.write(b"stty size\n")
        read_until(term, b"50 132", WAIT)
        # the job says "go" once it is the terminal's foreground: a ^C sooner hits the shell
        term.write(b"sh -c 'echo go-$((1+1)); exec sleep 100'\n")
        read_until(term, b"go-2", WAIT)
        term.write(b"\x03")  # ^C: the guest's line discipline sends SIGINT to the sleep
        term.write(b"echo back-$((2+3))\n")
        read_until(term, b"back-5", WAIT)
        # not ^D: typed while bash runs a command (cooked mode), readline would miss it
        term.write(b"exit\n")
        result = term.wait()
    assert result.exit_code == 0 and not result.timed_out


def test_closing_the_terminal_kills_its_program(sb: RemoteSandbox) -> None:
    term = sb.pty(["sh", "-c", "echo $$ > /tmp/pty.pid; echo up; exec sleep 1000"], timeout=LIMIT)
    read_until(term, b"up", WAIT)
    pid = int(sb.files.read("/tmp/pty.pid"))
    term.close()  # the daemon hangs up: SIGHUP for the sleep
    deadline = time.monotonic() + WAIT
    while sb.exec(["sh", "-c", f"kill -0 {pid}"]).exit_code == 0:
        assert time.monotonic() < deadline, "the program outlived its terminal"
        time.sleep(0.5)


def test_the_async_sdk(daemon: Daemon, sandbox_id: str) -> None:
    async def main() -> tuple[int | None, bytes]:
        asb = await AsyncSandbox.connect(sandbox_id, server=daemon.url)
        assert isinstance(asb, AsyncRemoteSandbox)
        try:
            argv = ["sh", "-c", "stty size; tty; cat; exit 6"]
            term = await asb.pty(argv, rows=11, cols=33, timeout=LIMIT)
            async with term:
                await term.send_eof()  # ^D: end of cat's input (the terminal stays cooked)
                result = await term.wait()
            return result.exit_code, result.stdout
        finally:
            await asb.detach()

    code, shown = asyncio.run(main())
    assert code == 6 and b"11 33" in shown and b"/dev/pts/" in shown


def test_ember_shell_on_a_host_terminal(daemon: Daemon, sandbox_id: str, token: str) -> None:
    env = {**os.environ, "EMBER_SERVER": daemon.url, "EMBER_TOKEN": token}
    host = HostTerminal(ember_command("shell", sandbox_id), env, rows=30, cols=100)
    host.type(b"echo hi-$((6*7)); stty size\r")  # raw here: the guest's terminal maps \r
    host.read_until(b"hi-42", WAIT)
    host.read_until(b"30 100", WAIT)
    host.resize(40, 120, WAIT)
    host.type(b"exit 3\r")
    assert host.finish(WAIT) == 3
