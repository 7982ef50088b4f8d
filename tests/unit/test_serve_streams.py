"""The daemon's streams (files/watch, streamed run_code, channel WebSocket) and their SDK
clients, against a real HTTP server whose sandbox is a fake: no VM, so the plumbing's
edge cases (a client that leaves, an error mid-stream, ordering) are cheap to reach."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import uvicorn
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from ember.client import CodeResult
from ember.client.results import FileEvent
from ember.client.watch import AsyncWatch, Watch
from ember.errors import AgentFileNotFoundError, SandboxTimeout
from ember.sandbox.remote import RemoteSandbox
from ember.sandbox.remote_async import AsyncRemoteSandbox
from ember.sandbox.remote_watch import AsyncRemoteWatch, RemoteWatch
from ember.serve.app import create_app
from ember.serve.manager import Entry, Manager, NotFound
from ember.serve.state import Record, new_id

TOKEN = "t" * 40
_END = object()


class FakeWatch:
    def __init__(self) -> None:
        self.events: queue.Queue[FileEvent | object] = queue.Queue()
        self.closed = threading.Event()
        self.ended: str | None = None

    def get(self, timeout: float | None = None) -> FileEvent | None:
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self.ended = "removed"
            return None
        assert isinstance(item, FileEvent)
        return item

    def close(self) -> None:
        self.closed.set()


class FakeFiles:
    def __init__(self) -> None:
        self.watches: queue.Queue[FakeWatch] = queue.Queue()

    def watch(self, path: str, *, recursive: bool = False) -> FakeWatch:
        if path == "/missing":
            raise AgentFileNotFoundError("FileNotFoundError", f"no such directory: {path}")
        watch = FakeWatch()
        self.watches.put(watch)
        return watch


class FakeSandbox:
    """What the daemon's routes call on a sandbox, answered from memory."""

    def __init__(self) -> None:
        self.files = FakeFiles()
        self.frames: dict[str, list[bytes]] = {}
        self.channel_closed = threading.Event()
        self.entry: Entry | None = None  # its record in the daemon
        self._vmm: Any = None  # no VMM, so no network address to report

    def run_code(
        self, code: str, *, timeout: float | None = None, on_stdout: Any = None,
        on_stderr: Any = None,
    ) -> CodeResult:  # fmt: skip
        if on_stdout is None:
            return CodeResult("out\n", "", repr(len(code)), None)
        on_stdout("out\n")
        on_stderr("err\n")
        return CodeResult("out\n", "err\n", repr(len(code)), None)

    def channel(self, name: str, *, timeout: float | None = None) -> Iterator[bytes]:
        if name not in self.frames:
            time.sleep(timeout or 0)
            raise SandboxTimeout(f"the guest did not open channel {name!r} in time")
        return self._frames(self.frames[name])

    def _frames(self, frames: list[bytes]) -> Iterator[bytes]:
        try:
            yield from frames
        finally:
            self.channel_closed.set()


class FakeManager:
    streaming = Manager.streaming  # the real hold: ``entry.streams`` counts open streams
    holding = Manager.holding

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self._on_event: Any = None

    def get(self, sandbox_id: str) -> Entry:
        if sandbox_id != self.entry.record.id:
            raise NotFound(sandbox_id)
        return self.entry

    def running(self, sandbox_id: str) -> tuple[Entry, Any]:
        return self.get(sandbox_id), self.entry.sandbox

    def mark_crashed(self, entry: Entry, error: str, console: str) -> None:
        raise AssertionError(error)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str, FakeSandbox]]:
    fake = FakeSandbox()
    record = Record(id=new_id(), dir="/nonexistent", pid=0, template="default", created_at=0.0)
    entry = Entry(record, cast(Any, fake))
    fake.entry = entry
    app = create_app(cast(Manager, FakeManager(entry)), token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", record.id, fake
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def sb(
    served: tuple[str, str, FakeSandbox], monkeypatch: pytest.MonkeyPatch
) -> Iterator[RemoteSandbox]:
    monkeypatch.setenv("EMBER_TOKEN", TOKEN)
    sandbox = RemoteSandbox.attach(served[1], server=served[0])
    yield sandbox
    sandbox.detach()


def test_watch_streams_events_until_the_directory_goes(
    sb: RemoteSandbox, served: tuple[str, str, FakeSandbox]
) -> None:
    fake = served[2]
    with sb.files.watch("/d") as watch:
        guest = fake.files.watches.get(timeout=5)
        assert watch.get(timeout=0.05) is None and watch.ended is None
        assert entry_of(served).streams == 1  # a watched sandbox is never idle
        guest.events.put(FileEvent("create", "/d/a", False))
        guest.events.put(FileEvent("overflow", "", False))
        guest.events.put(_END)
        assert list(watch) == [FileEvent("create", "/d/a", False), FileEvent("overflow", "", False)]
        assert watch.ended == "removed" and watch.get(timeout=0) is None
    assert guest.closed.wait(10)
    wait_until(lambda: entry_of(served).streams == 0)


def entry_of(served: tuple[str, str, FakeSandbox]) -> Entry:
    return cast(Entry, served[2].entry)


def wait_until(predicate: Any) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_leaving_a_watch_closes_the_guests(
    sb: RemoteSandbox, served: tuple[str, str, FakeSandbox]
) -> None:
    watch = sb.files.watch("/d", recursive=True)
    guest = served[2].files.watches.get(timeout=5)
    waiting = threading.Thread(target=watch.get)  # no timeout: woken by the close
    waiting.start()
    watch.close()
    waiting.join(10)
    assert not waiting.is_alive() and watch.ended is None
    watch.close()
    assert guest.closed.wait(10)  # the daemon noticed the client leave
    assert watch.get(timeout=0) is None
    wait_until(lambda: entry_of(served).streams == 0)


def test_watch_errors_are_the_sdks(sb: RemoteSandbox) -> None:
    with pytest.raises(FileNotFoundError):
        sb.files.watch("/missing")


def test_run_code_streams_then_returns_the_same_result(sb: RemoteSandbox) -> None:
    seen: list[tuple[str, str]] = []
    streamed = sb.run_code(
        "x",
        on_stdout=lambda t: seen.append(("out", t)),
        on_stderr=lambda t: seen.append(("err", t)),
    )
    assert seen == [("out", "out\n"), ("err", "err\n")]
    assert streamed == CodeResult("out\n", "err\n", "1", None)
    assert sb.run_code("xy").value == "2"  # no callback: one plain request, as before


def test_channel_messages_arrive_in_order(
    sb: RemoteSandbox, served: tuple[str, str, FakeSandbox]
) -> None:
    served[2].frames["c1"] = [b"one", b"", b"x" * 300_000]
    assert list(sb.channel("c1")) == [b"one", b"", b"x" * 300_000]
    with pytest.raises(SandboxTimeout):
        sb.channel("never", timeout=0.2)


def test_a_channel_socket_of_no_sandbox_or_no_token(served: tuple[str, str, FakeSandbox]) -> None:
    base = served[0].replace("http://", "ws://")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with connect(
        f"{base}/sandboxes/sb-nosuchsandbox/channels/c/ws", additional_headers=headers
    ) as ws:
        event = json.loads(ws.recv())
        assert (event["type"], event["error"]["code"]) == ("error", "not_found")
    with pytest.raises(InvalidStatus):
        connect(f"{base}/sandboxes/{served[1]}/channels/c/ws").recv()


def test_leaving_a_channel_early_abandons_it(
    sb: RemoteSandbox, served: tuple[str, str, FakeSandbox]
) -> None:
    fake = served[2]
    fake.channel_closed.clear()
    fake.frames["c2"] = [b"%d" % i for i in range(1000)]
    frames = sb.channel("c2")
    assert next(frames) == b"0"
    assert entry_of(served).streams == 1
    frames.close()  # type: ignore[attr-defined]
    assert fake.channel_closed.wait(10)
    wait_until(lambda: entry_of(served).streams == 0)


def test_the_async_client(
    served: tuple[str, str, FakeSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_TOKEN", TOKEN)
    url, sandbox_id, fake = served
    fake.frames["c3"] = [b"a", b"b"]

    async def main() -> None:
        sb = await AsyncRemoteSandbox.attach(sandbox_id, server=url)
        try:
            async with await sb.files.watch("/e") as watch:
                guest = fake.files.watches.get(timeout=5)
                assert await watch.get(timeout=0.05) is None
                guest.events.put(FileEvent("write", "/e/f", False))
                assert await watch.get(timeout=10) == FileEvent("write", "/e/f", False)
                guest.events.put(_END)
                assert [e async for e in watch] == [] and watch.ended == "removed"
            with pytest.raises(FileNotFoundError):
                await sb.files.watch("/missing")
            out: list[str] = []
            r = await sb.run_code("abc", on_stdout=out.append)
            assert (out, r.value, r.stderr) == (["out\n"], "3", "err\n")
            assert [f async for f in sb.channel("c3")] == [b"a", b"b"]
            fake.channel_closed.clear()
            fake.frames["c4"] = [b"%d" % i for i in range(1000)]
            frames = sb.channel("c4")
            assert await anext(frames) == b"0"
            await frames.aclose()  # type: ignore[attr-defined]
            assert await asyncio.to_thread(fake.channel_closed.wait, 10)
        finally:
            await sb.detach()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("local", "remote"), [(Watch, RemoteWatch), (AsyncWatch, AsyncRemoteWatch)]
)
def test_a_daemons_watch_has_the_in_process_watchs_methods(local: type, remote: type) -> None:
    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_") or name in DUNDERS}

    assert public(local) == public(remote)


DUNDERS = {"__iter__", "__next__", "__aiter__", "__anext__", "__enter__", "__exit__",
           "__aenter__", "__aexit__"}  # fmt: skip
