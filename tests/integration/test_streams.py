"""Streams end to end, in-process and through a real daemon: ``files.watch``, run_code's
output as it is written, and data channels (issue 18).

One daemon and one sandbox of it serve the daemon's tests, one in-process sandbox the
others (guest operations take seconds here). Nothing waits for a wall-clock time: a
cell that must see its output reach the host before it ends waits for the host to
answer it, and events are collected until the expected ones arrived.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from ember import AsyncSandbox, Sandbox
from ember.client.results import FileEvent
from ember.sandbox.remote import RemoteSandbox
from tests.integration.conftest import Images
from tests.integration.serve_daemon import Daemon, running_daemon

pytestmark = pytest.mark.kvm

PATIENCE = 180.0  # seconds to wait for something that should happen (a loaded host is slow)
# A cell that can only end well once the host has seen its first line: the host answers
# that line by writing the file the cell waits for.
WAITING_CELL = """
import os, sys, time
print('first', flush=True)
for _ in range(1200):
    if os.path.exists({go!r}):
        break
    time.sleep(0.1)
print('second' if os.path.exists({go!r}) else 'the host never answered')
print('err', file=sys.stderr)
6 * 7
"""
SENDING_CELL = """
from ember.agent import channel
with channel({name!r}) as ch:
    for i in range(3):
        ch.send(b'frame %d' % i)
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("serve-streams")) as d:
        yield d


@pytest.fixture(scope="module")
def remote(daemon: Daemon) -> Iterator[RemoteSandbox]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBER_TOKEN", daemon.token)
        with Sandbox(server=daemon.url, timeout=3600) as sb:
            assert isinstance(sb, RemoteSandbox)
            yield sb


@pytest.fixture(scope="module")
def local(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


def fresh_dir(sb: Sandbox) -> str:
    path = f"/tmp/watched-{uuid.uuid4().hex[:8]}"
    assert sb.exec(["mkdir", path], timeout=PATIENCE).exit_code == 0
    return path


def collect(watch: Any, want: set[tuple[str, str]]) -> list[FileEvent]:
    """Events until every (type, path) in ``want`` was among them."""
    seen: list[FileEvent] = []
    deadline = time.monotonic() + PATIENCE
    while not want <= {(e.type, e.path) for e in seen}:
        event = watch.get(timeout=max(deadline - time.monotonic(), 0))
        assert event is not None, f"still waiting for {want} after {seen}"
        seen.append(event)
    return seen


def watch_a_directory_come_and_go(sb: Sandbox) -> None:
    """Create, write, remove a file, then the directory itself: what a watch sees."""
    top = fresh_dir(sb)
    with sb.files.watch(top) as watch:
        assert watch.ended is None
        sb.files.write(f"{top}/a.txt", b"one")
        collect(watch, {("create", f"{top}/a.txt")})
        sb.exec(f"echo two >> {top}/a.txt", timeout=PATIENCE)
        collect(watch, {("write", f"{top}/a.txt")})
        sb.files.remove(f"{top}/a.txt")
        collect(watch, {("remove", f"{top}/a.txt")})
        sb.files.remove(top)
        rest = list(watch)  # ends once the directory is gone
        assert watch.ended == "removed", rest


def streamed_cell(sb: Sandbox) -> None:
    """The first line reaches the host while the cell runs; the result is the usual one."""
    go = f"/tmp/go-{uuid.uuid4().hex[:8]}"
    out: list[str] = []
    err: list[str] = []

    def on_stdout(text: str) -> None:
        if not out:
            sb.files.write(go, b"")  # only a host that saw 'first' while the cell runs can
        out.append(text)

    code = WAITING_CELL.format(go=go)
    r = sb.run_code(code, timeout=PATIENCE, on_stdout=on_stdout, on_stderr=err.append)
    assert (r.stdout, r.stderr, r.value, r.error) == ("first\nsecond\n", "err\n", "42", None)
    assert ("".join(out), "".join(err)) == (r.stdout, r.stderr)
    assert sb.run_code(code, timeout=PATIENCE) == r  # the file is there now: the same cell


# --- in-process
def test_watch_in_process(local: Sandbox) -> None:
    watch_a_directory_come_and_go(local)


def test_run_code_streams_in_process(local: Sandbox) -> None:
    streamed_cell(local)


# --- through the daemon
def test_watch_through_the_daemon(remote: RemoteSandbox) -> None:
    watch_a_directory_come_and_go(remote)


def test_watch_of_a_missing_or_relative_dir(remote: RemoteSandbox, daemon: Daemon) -> None:
    with pytest.raises(FileNotFoundError):
        remote.files.watch("/no/such/dir")
    with daemon.client() as api:
        watch = f"/sandboxes/{remote.id}/files/watch"
        reply = api.get(watch, params={"path": "/no/such/dir"})
        assert reply.status_code == 400, reply.text  # as GET /files of a missing file
        assert reply.json()["error"]["type"] == "FileNotFoundError"
        reply = api.get(watch, params={"path": "relative/dir"})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "agent_error"
        assert api.get(watch).status_code == 422
        assert api.get("/sandboxes/sb-nosuchsandbox/files/watch", params={"path": "/"}).json()[
            "error"
        ]["code"] == "not_found"  # fmt: skip


def inotify_fds(sb: Sandbox) -> int:
    script = "ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c inotify; true"
    return int(sb.exec(["sh", "-c", script], timeout=PATIENCE).stdout)


def test_a_client_leaving_ends_the_guests_watch(remote: RemoteSandbox, daemon: Daemon) -> None:
    top = fresh_dir(remote)
    before = inotify_fds(remote)
    with daemon.client() as api:
        params = {"path": top + "/", "recursive": "true"}
        with api.stream("GET", f"/sandboxes/{remote.id}/files/watch", params=params) as reply:
            assert reply.headers["content-type"].startswith("application/x-ndjson")
            lines = reply.iter_lines()
            assert json.loads(next(lines)) == {"type": "ready", "path": top}
            assert inotify_fds(remote) == before + 1
            remote.exec(["mkdir", f"{top}/sub"], timeout=PATIENCE)
            event = json.loads(next(lines))
            assert event == {"type": "create", "path": f"{top}/sub", "is_dir": True}
    deadline = time.monotonic() + PATIENCE
    while inotify_fds(remote) != before:  # the daemon closed the guest's watch
        assert time.monotonic() < deadline, "the guest still watches"


def test_run_code_streams_through_the_daemon(remote: RemoteSandbox, daemon: Daemon) -> None:
    streamed_cell(remote)
    body = {"code": "print('a'); 'b'", "stream": True}
    with daemon.client() as api:
        with api.stream("POST", f"/sandboxes/{remote.id}/run_code", json=body) as reply:
            assert reply.headers["content-type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in reply.iter_lines() if line]
        plain = api.post(f"/sandboxes/{remote.id}/run_code", json={"code": "print('a'); 'b'"})
    assert [e for e in events if e["type"] == "stdout"] == [{"type": "stdout", "text": "a\n"}]
    assert events[-1] == {"type": "result", **plain.json()}


def test_channel_through_the_daemon(remote: RemoteSandbox, daemon: Daemon) -> None:
    want = [b"frame 0", b"frame 1", b"frame 2"]
    assert remote.run_code(SENDING_CELL.format(name="sdk"), timeout=PATIENCE).error is None
    assert list(remote.channel("sdk", timeout=PATIENCE)) == want

    assert remote.run_code(SENDING_CELL.format(name="raw"), timeout=PATIENCE).error is None
    url = daemon.url.replace("http://", "ws://") + f"/sandboxes/{remote.id}/channels/raw/ws"
    headers = {"Authorization": f"Bearer {daemon.token}"}
    with connect(url, additional_headers=headers) as ws:
        assert json.loads(ws.recv()) == {"type": "open"}
        assert [ws.recv() for _ in want] == want  # one binary message each, in order
        assert json.loads(ws.recv()) == {"type": "end"}
    with daemon.client() as api:
        # both channels' 3 frames of 7 bytes, counted as relayed; the guest's own memory
        assert "ember_channel_bytes_total 42.0" in api.get("/metrics").text
        usage = api.get(f"/sandboxes/{remote.id}/metrics").json()
        assert usage["guest"]["total_memory"] > 0  # through the balloon's statistics


def test_the_async_client_through_the_daemon(remote: RemoteSandbox, daemon: Daemon) -> None:
    top = fresh_dir(remote)
    remote.run_code(SENDING_CELL.format(name="aio"), timeout=PATIENCE)

    async def scenario() -> None:
        sb = await AsyncSandbox.connect(remote.id, server=daemon.url)
        try:
            async with await sb.files.watch(top) as watch:
                await sb.files.write(f"{top}/f", b"x")
                event = await asyncio.wait_for(watch.get(), PATIENCE)
                assert event is not None and event.path.startswith(top)
            out: list[str] = []
            r = await sb.run_code("print('hi')", on_stdout=out.append)
            assert (out, r.stdout) == (["hi\n"], "hi\n")
            frames = [f async for f in sb.channel("aio", timeout=PATIENCE)]
            assert frames == [b"frame 0", b"frame 1", b"frame 2"]
        finally:
            await sb.detach()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBER_TOKEN", daemon.token)
        asyncio.run(scenario())


def test_a_bad_token_cannot_watch_or_listen(remote: RemoteSandbox, daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, headers={"Authorization": "Bearer no"}) as api:
        assert api.get(f"/sandboxes/{remote.id}/files/watch", params={"path": "/"}).status_code == (
            401
        )  # fmt: skip
