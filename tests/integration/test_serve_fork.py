"""Fork and snapshot through a real daemon: ``POST /sandboxes/{id}/fork`` and ``/snapshot``,
``RemoteSandbox.fork()``/``.snapshot(name)`` and their asyncio twins, and a forked sandbox
re-adopted by the next daemon after ``kill -9``, still forkable there."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember import AsyncSandbox, ConfigError, Sandbox
from ember.sandbox.remote import RemoteSandbox
from ember.sandbox.remote_async import AsyncRemoteSandbox
from ember.templates import templates_root
from tests.integration.serve_daemon import Daemon, alive, free_port

pytestmark = pytest.mark.kvm


@pytest.fixture
def template_name() -> Iterator[str]:
    name = f"serve-test-{secrets.token_hex(4)}"
    yield name
    shutil.rmtree(templates_root() / name, ignore_errors=True)


def code(reply: httpx.Response) -> tuple[int, str]:
    assert "Traceback" not in reply.text
    return reply.status_code, reply.json()["error"]["code"]


def record(daemon: Daemon, sandbox_id: str) -> dict[str, object]:
    found: dict[str, object] = json.loads(
        (daemon.state_dir / "sandboxes" / f"{sandbox_id}.json").read_text()
    )
    return found


def test_fork_snapshot_and_readopt(
    tmp_path: Path, template_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Daemon(tmp_path / "state", free_port())
    first.start()
    second: Daemon | None = None
    monkeypatch.setenv("EMBER_TOKEN", first.token)
    monkeypatch.delenv("EMBER_SERVER", raising=False)
    try:
        parent = Sandbox(server=first.url, metadata={"suite": "fork"}, timeout=900)
        assert isinstance(parent, RemoteSandbox)
        assert parent.run_code("x = 41").error is None
        parent.files.write("/tmp/f", b"parent")

        child = parent.fork()
        assert isinstance(child, RemoteSandbox) and child.id != parent.id
        assert child.metadata == {"suite": "fork"}
        assert child.info()["expires_at"] == parent.info()["expires_at"]  # the parent's deadline
        assert child.run_code("x + 1").value == "42"
        assert child.files.read("/tmp/f") == b"parent"
        assert child.run_code("x = 0").error is None  # the two diverge
        child.files.write("/tmp/f", b"child")
        assert parent.run_code("x").value == "41"
        assert parent.files.read("/tmp/f") == b"parent"
        assert [s["id"] for s in Sandbox.list(server=first.url, metadata={"suite": "fork"})] in (
            [parent.id, child.id], [child.id, parent.id],
        )  # fmt: skip

        with first.client() as api:
            base = f"/sandboxes/{parent.id}"
            # Its own metadata and timeout (null: none).
            reply = api.post(f"{base}/fork", json={"metadata": {"k": "v"}, "timeout": None})
            assert reply.status_code == 201, reply.text
            other = reply.json()
            assert (other["metadata"], other["expires_at"], other["state"]) == (
                {"k": "v"}, None, "running",
            )  # fmt: skip
            assert api.delete(f"/sandboxes/{other['id']}").status_code == 204

            # Bad requests: JSON bodies with stable codes, no traceback.
            assert code(api.post("/sandboxes/sb-nosuchsandbox/fork")) == (404, "not_found")
            assert code(api.post("/sandboxes/../etc/fork")) == (404, "not_found")
            assert code(api.post("/sandboxes/sb-nosuch/snapshot", json={"name": "ok"})) == (
                404, "not_found",
            )  # fmt: skip
            assert code(api.post(f"{base}/fork", json={"timeout": -1})) == (422, "invalid_request")
            assert code(api.post(f"{base}/fork", json={"dir": "/tmp"})) == (422, "invalid_request")
            for bad in ("../x", "/etc/passwd", "a/b", "", ".hidden", "default", "default-x",
                        "x" * 65, 7):  # fmt: skip
                assert code(api.post(f"{base}/snapshot", json={"name": bad})) == (
                    422, "invalid_request",
                ), bad  # fmt: skip
            assert code(api.post(f"{base}/snapshot", json={})) == (422, "invalid_request")
            assert code(api.post(f"{base}/snapshot", json={"name": "ok", "path": "/tmp"})) == (
                422, "invalid_request",
            )  # fmt: skip
        with pytest.raises(ConfigError):
            parent.snapshot("../x")  # refused before it is sent, as in-process

        # Snapshot into a template, then a new sandbox from it.
        parent.snapshot(template_name)
        assert (templates_root() / template_name).is_dir()
        assert parent.run_code("x").value == "41"  # the parent runs on
        with Sandbox(server=first.url, template=template_name) as restored:
            assert isinstance(restored, RemoteSandbox)
            assert restored.run_code("x + 1").value == "42"
            assert restored.files.read("/tmp/f") == b"parent"
            assert restored.info()["template"] == template_name

        # kill -9 the daemon: the next one re-adopts the fork from its record.
        child_record = record(first, child.id)
        parent.detach()
        child.detach()
        first.kill9()
        assert alive(int(str(child_record["pid"])))
        second = Daemon(first.state_dir, free_port())
        second.start()
        again = Sandbox.connect(child.id, server=second.url)
        assert isinstance(again, RemoteSandbox)
        assert again.info()["state"] == "running" and again.metadata == {"suite": "fork"}
        assert again.run_code("x").value == "0"
        assert again.files.read("/tmp/f") == b"child"
        grandchild = again.fork()  # a re-adopted sandbox forks too
        assert grandchild.run_code("x + 2").value == "2"
        assert record(second, grandchild.id)["template"] == "default"
        grandchild.kill()
        again.kill()
        assert not alive(int(str(child_record["pid"])))
        Sandbox.connect(parent.id, server=second.url).kill()
        with second.client() as api:
            assert api.get("/sandboxes").json()["sandboxes"] == []
    finally:
        for d in (second, first):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.delete_all()
                d.stop()


def test_async_fork_and_snapshot(
    tmp_path: Path, template_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = Daemon(tmp_path / "state", free_port())
    daemon.start()
    monkeypatch.setenv("EMBER_TOKEN", daemon.token)
    monkeypatch.delenv("EMBER_SERVER", raising=False)

    async def scenario() -> None:
        async with AsyncSandbox(server=daemon.url, metadata={"suite": "afork"}) as sb:
            assert (await sb.run_code("y = 6")).error is None
            child = await sb.fork()
            assert isinstance(child, AsyncRemoteSandbox) and child.id != sb.id
            assert child.metadata == {"suite": "afork"}
            assert (await child.run_code("y * 7")).value == "42"
            await child.close()
            with pytest.raises(ConfigError):
                await sb.snapshot("a/b")
            await sb.snapshot(template_name)
        async with AsyncSandbox(server=daemon.url, template=template_name) as restored:
            assert (await restored.run_code("y")).value == "6"

    try:
        asyncio.run(scenario())
        with daemon.client() as api:
            assert api.get("/sandboxes").json()["sandboxes"] == []
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.delete_all()
        daemon.stop()
