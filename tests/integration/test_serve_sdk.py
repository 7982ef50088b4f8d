"""The SDK and the CLI against a real daemon: ``Sandbox(server=...)`` behaves as in-process,
a second process re-attaches by id, and ``ember ps/kill/exec --id`` drive the same sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from ember import AsyncSandbox, ExecError, OutputChunk, Sandbox, SandboxError
from ember.sandbox.remote import RemoteSandbox
from ember.sandbox.remote_async import AsyncRemoteSandbox
from ember.sandbox.wire import ServerError
from tests.integration.conftest import ember_command
from tests.integration.serve_daemon import Daemon, running_daemon

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("serve-sdk")) as d:
        yield d


@pytest.fixture
def env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("EMBER_TOKEN", daemon.token)
    monkeypatch.delenv("EMBER_SERVER", raising=False)
    return {**os.environ, "EMBER_TOKEN": daemon.token, "EMBER_SERVER": daemon.url}


def test_sandbox_through_the_daemon(daemon: Daemon, env: dict[str, str]) -> None:
    with Sandbox(server=daemon.url, metadata={"suite": "sdk"}, timeout=3600) as sb:
        assert isinstance(sb, RemoteSandbox)
        assert sb.id is not None and sb.id.startswith("sb-")
        assert sb.metadata == {"suite": "sdk"}
        r = sb.exec(["python3", "-c", "import sys; print(6*7); print('e', file=sys.stderr)"])
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"42\n", b"e\n")
        assert sb.exec("cat", stdin=b"in").stdout == b"in"
        r = sb.exec(["cat", "/tmp/sent/f"], files={"/tmp/sent/f": b"\0with files\xff"})
        assert r.stdout == b"\0with files\xff"
        stream = sb.exec_stream(["sh", "-c", "echo a; echo b >&2; exit 4"])
        chunks: list[OutputChunk] = []
        while True:
            try:
                chunks.append(next(stream))
            except StopIteration as stop:
                result = stop.value
                break
        assert sorted((c.stream, c.data) for c in chunks) == [
            ("stderr", b"b\n"),
            ("stdout", b"a\n"),
        ]
        assert result.exit_code == 4
        with pytest.raises(ExecError):
            sb.exec(["no-such-program"])
        assert sb.run_code("y = 2").error is None
        assert sb.run_code("y * 21").value == "42"
        sb.files.write("/tmp/shared.txt", b"from one")
        assert sb.files.read("/tmp/shared.txt") == b"from one"
        assert sb.files.stat("/tmp/shared.txt").size == 8
        assert "shared.txt" in [e.name for e in sb.files.list("/tmp")]
        with pytest.raises(FileNotFoundError):
            sb.files.read("/tmp/nope")

        ids = [s["id"] for s in Sandbox.list(server=daemon.url, metadata={"suite": "sdk"})]
        assert ids == [sb.id]
        assert Sandbox.list(server=daemon.url, metadata={"suite": "other"}) == []

        # Another process finds the same sandbox by id, through $EMBER_SERVER and $EMBER_TOKEN.
        code = (
            "import sys; from ember import Sandbox\n"
            "sb = Sandbox.connect(sys.argv[1])\n"
            "print(sb.files.read('/tmp/shared.txt').decode(), sb.run_code('y').value)\n"
            "sb.files.write('/tmp/back.txt', b'from two')\n"
            "sb.detach()\n"
        )
        other = subprocess.run(
            [sys.executable, "-c", code, sb.id], env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["from", "one", "2"]
        assert sb.files.read("/tmp/back.txt") == b"from two"

        sb.pause()
        assert sb.info()["state"] == "paused"
        sb.resume()
        assert sb.run_code("y").value == "2"
        assert sb.files.read("/tmp/back.txt") == b"from two"

        before = sb.info()["expires_at"]
        sb.set_timeout(7200)
        assert sb.info()["expires_at"] > before
        sandbox_id = sb.id
    with pytest.raises(ServerError) as gone:
        Sandbox.connect(sandbox_id, server=daemon.url)
    assert gone.value.code == "not_found" and gone.value.status == 404
    with pytest.raises(SandboxError):
        sb.exec(["true"])  # closed


def test_async_sandbox_through_the_daemon(daemon: Daemon, env: dict[str, str]) -> None:
    async def scenario() -> None:
        async with AsyncSandbox(server=daemon.url, metadata={"suite": "async"}) as sb:
            assert isinstance(sb, AsyncRemoteSandbox) and sb.id is not None
            r = await sb.exec(["sh", "-c", "echo hi; exit 2"])
            assert (r.exit_code, r.stdout) == (2, b"hi\n")
            chunks = [c.data async for c in sb.exec_stream(["sh", "-c", "echo a; echo b"])]
            assert b"".join(chunks) == b"a\nb\n"
            assert (await sb.run_code("z = 5\nz * 2")).value == "10"
            await sb.files.write("/tmp/async.txt", b"async")
            again = await AsyncSandbox.connect(sb.id, server=daemon.url)
            assert await again.files.read("/tmp/async.txt") == b"async"
            assert (await again.run_code("z")).value == "5"
            await again.detach()
            found = await AsyncSandbox.list(server=daemon.url, metadata={"suite": "async"})
            assert [s["id"] for s in found] == [sb.id]
            with pytest.raises(FileNotFoundError):
                await sb.files.read("/tmp/nope")
            sandbox_id = sb.id
        with pytest.raises(ServerError):
            await AsyncSandbox.connect(sandbox_id, server=daemon.url)

    asyncio.run(scenario())


def test_in_process_is_unchanged(env: dict[str, str]) -> None:
    assert Sandbox.__new__(Sandbox, server="").__class__ is Sandbox
    assert RemoteSandbox.__mro__[1] is Sandbox


def test_cli_ps_exec_kill(daemon: Daemon, env: dict[str, str]) -> None:
    sb = Sandbox(server=daemon.url, metadata={"suite": "cli"})
    sandbox_id = sb.id
    assert sandbox_id is not None
    sb.detach()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ember_command(*args), env=env, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip

    ps = run("ps", "--json", "--metadata", "suite=cli")
    assert ps.returncode == 0, ps.stderr
    assert [json.loads(line)["id"] for line in ps.stdout.splitlines()] == [sandbox_id]
    table = run("ps")
    assert sandbox_id in table.stdout and "running" in table.stdout
    ex = run("exec", "--id", sandbox_id, "--", "sh", "-c", "echo hi; exit 3")
    assert (ex.returncode, ex.stdout) == (3, "hi\n"), ex.stderr
    assert run("kill", sandbox_id).returncode == 0
    assert run("kill", sandbox_id).returncode == 1  # already gone
    assert run("ps", "--json", "--metadata", "suite=cli").stdout == ""


def test_cli_exec_streams_and_logs(daemon: Daemon, env: dict[str, str]) -> None:
    sb = Sandbox(server=daemon.url, metadata={"suite": "cli-logs"}, timeout=600)
    sandbox_id = sb.id
    assert sandbox_id is not None
    try:
        # Streamed: the first line arrives while the command still waits for a file that
        # only appears once the test has read it.
        waits = "echo first; echo err >&2; while [ ! -e /tmp/go ]; do sleep 0.05; done; " \
            "echo second; exit 5"  # fmt: skip
        proc = subprocess.Popen(
            ember_command("exec", "--id", sandbox_id, "--", "sh", "-c", waits), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stderr is not None
            assert proc.stdout.readline() == b"first\n"
            assert proc.poll() is None
            sb.files.write("/tmp/go", b"")
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert (proc.returncode, out, err) == (5, b"second\n", b"err\n")
        assert sb.exec(["true"]).exit_code == 0  # --id leaves the sandbox running

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ember_command(*args), env=env, capture_output=True, text=True, timeout=300,
                check=False,
            )  # fmt: skip

        marker = "ember-logs-marker"
        assert sb.exec(["sh", "-c", f"echo {marker} > /dev/console"]).exit_code == 0
        logs = run("logs", sandbox_id)
        assert logs.returncode == 0, logs.stderr
        assert marker in logs.stdout.splitlines()
        assert run("logs", "--lines", "1", sandbox_id).stdout == f"{marker}\n"
        assert run("logs", "--server", daemon.url, sandbox_id).returncode == 0

        # Unknown ids and bad arguments: one line, no traceback.
        for args in (("logs", "sb-nosuchsandbox"), ("exec", "--id", "sb-nosuch", "--", "true"),
                     ("logs", "--lines", "0", sandbox_id)):  # fmt: skip
            bad = run(*args)
            assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
            assert len(bad.stderr.splitlines()) == 1, bad.stderr
        assert "not_found" in run("logs", "sb-nosuchsandbox").stderr
    finally:
        sb.kill()


STREAMS = 50
STREAM_SANDBOXES = 4


def test_50_concurrent_exec_streams(daemon: Daemon, env: dict[str, str]) -> None:
    """50 exec streams at once through the daemon, over 4 sandboxes (50 threads let go
    together): each stream's output and exit status are exactly its own."""
    sandboxes = [
        Sandbox(server=daemon.url, metadata={"suite": "streams"}, timeout=900)
        for _ in range(STREAM_SANDBOXES)
    ]
    go = threading.Barrier(STREAMS)
    results: dict[int, tuple[bytes, bytes, int | None]] = {}
    failures: list[BaseException] = []

    def one(n: int) -> None:
        script = f"i=0; while [ $i -lt 3 ]; do echo {n}-$i; i=$((i+1)); done; " \
            f"echo {n}-err >&2; exit {n % 7}"  # fmt: skip
        out, err = bytearray(), bytearray()
        try:
            go.wait(300)
            stream = sandboxes[n % STREAM_SANDBOXES].exec_stream(["sh", "-c", script], timeout=600)
            while True:
                try:
                    chunk = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    break
                (out if chunk.stream == "stdout" else err).extend(chunk.data)
            results[n] = (bytes(out), bytes(err), result.exit_code)
        except BaseException as exc:
            failures.append(exc)
            go.abort()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        assert not failures, failures
        for n in range(STREAMS):
            lines = "".join(f"{n}-{i}\n" for i in range(3))
            assert results[n] == (lines.encode(), f"{n}-err\n".encode(), n % 7), n
    finally:
        for sb in sandboxes:
            sb.kill()
