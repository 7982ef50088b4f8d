"""ember serve's pieces that need no VM: the token file, ids, the guard, error codes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from ember.errors import (
    AgentFileNotFoundError,
    ConfigError,
    OutputTooLarge,
    SandboxCrashed,
    SandboxTimeout,
)
from ember.sandbox import wire
from ember.serve.guard import Guard
from ember.serve.manager import NotFound
from ember.serve.state import Record, StateDir, new_id, valid_id


def test_token_is_made_once_private_and_kept(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    token = state.token()
    assert len(token) >= 40
    assert stat.S_IMODE((tmp_path / "s" / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    assert StateDir(tmp_path / "s").token() == token


def test_ids_are_random_and_checked() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100 and all(valid_id(i) for i in ids)
    for bad in ("", "sb-", "x-abc", "sb-../../etc", "sb-a/b", "sb-" + "a" * 65):
        assert not valid_id(bad)


def test_records_round_trip_and_torn_ones_are_dropped(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    rec = Record(id=new_id(), dir="/tmp/x", pid=7, template="default", created_at=1.0,
                 metadata={"k": "v"}, expires_at=5.0)  # fmt: skip
    state.save(rec)
    (state.records / "sb-torn.json").write_text("{not json")
    assert state.load_all() == [rec]
    assert not (state.records / "sb-torn.json").exists()
    state.remove(rec.id)
    assert state.load_all() == []


@pytest.mark.parametrize(
    ("exc", "status", "code", "back"),
    [
        (SandboxCrashed("gone", "tail"), 409, "sandbox_crashed", SandboxCrashed),
        (AgentFileNotFoundError("FileNotFoundError", "x"), 400, "agent_error", FileNotFoundError),
        (SandboxTimeout("slow"), 504, "timeout", SandboxTimeout),
        (OutputTooLarge("big", 10), 413, "output_too_large", OutputTooLarge),
        (ConfigError("bad"), 400, "config_error", ConfigError),
        (RuntimeError("secret detail"), 500, "internal", wire.ServerError),
        (NotFound("sb-gone"), 404, "not_found", wire.ServerError),  # as exec/ws reports it
    ],
)
def test_errors_become_codes_and_back(
    exc: Exception, status: int, code: str, back: type[Exception]
) -> None:
    got_status, body = wire.error_body(exc)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert "secret detail" not in str(body)  # an unexpected error's text stays in the log
    with pytest.raises(back):
        wire.raise_for(got_status, body)


@pytest.fixture
def guarded() -> Iterator[TestClient]:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    with TestClient(Guard(app, token="right", max_body=1000)) as client:
        yield client


def test_guard_needs_the_token(guarded: TestClient) -> None:
    assert guarded.post("/echo", content=b"x").status_code == 401
    reply = guarded.post("/echo", content=b"x", headers={"Authorization": "Bearer wrong"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "unauthorized"
    ok = guarded.post("/echo", content=b"x" * 1000, headers={"Authorization": "Bearer right"})
    assert ok.json() == {"size": 1000}


def test_guard_limits_bodies_declared_or_not(guarded: TestClient) -> None:
    auth = {"Authorization": "Bearer right"}
    reply = guarded.post("/echo", content=b"x" * 1001, headers=auth)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield os.urandom(300)

    reply = guarded.post("/echo", content=chunks(), headers=auth)
    assert reply.status_code == 413
