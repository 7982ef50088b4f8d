"""``ember serve`` over HTTP: a real daemon on a free port, real httpx clients, real sandboxes.

One daemon serves the module (its sandboxes are restored from the default
template); each test deletes what it made, and the last checks that nothing
was left behind: no VMM, no sandbox directory, no record, and the keeper gone.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from ember.serve.keeper import keeper_pid
from tests.integration.serve_daemon import Daemon, alive, running_daemon, wait_for

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("serve")
    with running_daemon(tmp, "--reap-interval", "0.2", "--max-body-mib", "1") as d:
        yield d


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c


def make(api: httpx.Client, **body: object) -> dict[str, object]:
    reply = api.post("/sandboxes", json=body)
    assert reply.status_code == 201, reply.text
    info: dict[str, object] = reply.json()
    return info


def record(daemon: Daemon, sandbox_id: object) -> dict[str, object]:
    found: dict[str, object] = json.loads(
        (daemon.state_dir / "sandboxes" / f"{sandbox_id}.json").read_text()
    )
    return found


def error_code(reply: httpx.Response) -> str:
    assert "Traceback" not in reply.text
    code: str = reply.json()["error"]["code"]
    return code


def test_every_request_needs_the_token(daemon: Daemon) -> None:
    assert oct((daemon.state_dir / "token").stat().st_mode & 0o777) == "0o600"
    with httpx.Client(base_url=daemon.url) as anonymous:
        for path in ("/sandboxes", "/openapi.json", "/docs", "/metrics", "/health"):
            reply = anonymous.get(path)
            assert reply.status_code == 401, path
            assert error_code(reply) == "unauthorized"
    with daemon.client(token="x" * 43) as wrong:
        assert wrong.get("/sandboxes").status_code == 401
        assert wrong.post("/sandboxes", json={}).status_code == 401
    with daemon.client() as api:
        schema = api.get("/openapi.json").json()
        assert {
            "/sandboxes",
            "/sandboxes/{sandbox_id}/exec",
            "/sandboxes/{sandbox_id}/files",
        } <= set(schema["paths"])
        assert api.get("/docs").status_code == 200


def test_bad_requests_get_stable_codes(api: httpx.Client) -> None:
    assert error_code(api.get("/sandboxes/sb-nosuchsandbox")) == "not_found"
    assert api.get("/sandboxes/sb-nosuchsandbox").status_code == 404
    assert error_code(api.get("/sandboxes/..%2F..%2Fetc")) == "not_found"
    assert error_code(api.delete("/sandboxes/sb-nosuchsandbox")) == "not_found"
    assert error_code(api.get("/no/such/route")) == "not_found"
    for body in (
        {"mem_mib": "lots"},
        {"template": "../../etc/passwd"},
        {"template": "/root/.cache/ember/templates/x"},
        {"unknown_field": 1},
        {"metadata": {"k": 5}},
        {"timeout": -1},
    ):
        reply = api.post("/sandboxes", json=body)
        assert reply.status_code == 422, body
        assert error_code(reply) == "invalid_request"
    reply = api.post(
        "/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    reply = api.post(
        "/sandboxes", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413 and error_code(reply) == "payload_too_large"
    reply = api.post("/sandboxes", json={"template": "no-such-template"})
    assert reply.status_code == 400, reply.text


def test_create_exec_files_delete(daemon: Daemon, api: httpx.Client) -> None:
    info = make(api, metadata={"owner": "test", "run": "1"})
    sid = info["id"]
    assert info["state"] == "running" and info["metadata"] == {"owner": "test", "run": "1"}
    assert isinstance(sid, str) and sid.startswith("sb-") and len(sid) >= 20
    base = f"/sandboxes/{sid}"
    assert api.get(base).json()["id"] == sid
    listed = api.get("/sandboxes", params={"metadata": "owner=test"}).json()["sandboxes"]
    assert [s["id"] for s in listed] == [sid]
    assert api.get("/sandboxes", params={"metadata": "owner=other"}).json()["sandboxes"] == []

    reply = api.post(f"{base}/exec", json={"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    r = reply.json()
    assert (r["exit_code"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"])) == (
        3, b"out\n", b"err\n",
    )  # fmt: skip
    stdin = base64.b64encode(b"from stdin").decode()
    r = api.post(f"{base}/exec", json={"cmd": "cat; echo $FOO", "stdin": stdin,
                                       "env": {"FOO": "bar"}}).json()  # fmt: skip
    assert base64.b64decode(r["stdout"]) == b"from stdinbar\n"
    files = {"/tmp/api/x.sh": base64.b64encode(b"echo from a file").decode()}
    r = api.post(f"{base}/exec", json={"cmd": ["sh", "/tmp/api/x.sh"], "files": files}).json()
    assert base64.b64decode(r["stdout"]) == b"from a file\n"
    bad = api.post(f"{base}/exec", json={"cmd": ["true"], "files": {"/tmp/y": "not base64!"}})
    assert bad.status_code == 400, bad.text

    body = {"cmd": "for i in 1 2 3; do echo $i; echo e$i >&2; done; exit 7", "stream": True}
    with api.stream("POST", f"{base}/exec", json=body) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in stream.iter_lines() if line]
    out = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    err = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stderr")
    assert (out, err) == (b"1\n2\n3\n", b"e1\ne2\ne3\n")
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 7

    reply = api.post(f"{base}/exec", json={"cmd": ["no-such-program"]})
    assert error_code(reply) == "agent_error" and reply.json()["error"]["type"] == "ExecError"

    assert api.post(f"{base}/run_code", json={"code": "x = 6"}).json()["error"] is None
    r = api.post(f"{base}/run_code", json={"code": "print('p'); x * 7"}).json()
    assert (r["value"], r["stdout"]) == ("42", "p\n")
    r = api.post(f"{base}/run_code", json={"code": "1/0"}).json()
    assert r["error"]["type"] == "ZeroDivisionError"

    blob = os.urandom(300_000)
    reply = api.put(f"{base}/files", params={"path": "/tmp/d/blob"}, content=blob)
    assert reply.json() == {"size": len(blob)}
    assert api.get(f"{base}/files", params={"path": "/tmp/d/blob"}).content == blob
    st = api.get(f"{base}/files/stat", params={"path": "/tmp/d/blob"}).json()
    assert st["size"] == len(blob) and st["is_file"]
    entries = api.get(f"{base}/files/list", params={"path": "/tmp/d"}).json()["entries"]
    assert entries == [{"name": "blob", "size": len(blob), "is_dir": False}]
    assert api.delete(f"{base}/files", params={"path": "/tmp/d/blob"}).status_code == 204
    reply = api.get(f"{base}/files", params={"path": "/tmp/d/blob"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "FileNotFoundError"

    rec = record(daemon, sid)
    pid, directory = int(str(rec["pid"])), Path(str(rec["dir"]))
    assert alive(pid) and directory.is_dir()
    assert api.delete(base).status_code == 204
    assert error_code(api.get(base)) == "not_found"
    assert not alive(pid) and not directory.exists()
    assert not (daemon.state_dir / "sandboxes" / f"{sid}.json").exists()


def test_exec_over_websocket(daemon: Daemon, api: httpx.Client) -> None:
    sid = make(api)["id"]
    url = f"ws://127.0.0.1:{daemon.port}/sandboxes/{sid}/exec/ws"
    auth = {"Authorization": f"Bearer {daemon.token}"}
    with connect(url, additional_headers=auth) as ws:
        ws.send(
            json.dumps({"cmd": ["sh", "-c", "read a; echo got $a; cat; exit 9"], "stdin": True})
        )
        ws.send(b"first line\n")
        first = json.loads(ws.recv(timeout=120))
        assert (first["type"], base64.b64decode(first["data"])) == ("stdout", b"got first line\n")
        ws.send(b"rest")
        ws.send(json.dumps({"type": "eof"}))
        events = [json.loads(m) for m in ws]
    out = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    assert out == b"rest" and events[-1]["type"] == "exit" and events[-1]["exit_code"] == 9
    with connect(url, additional_headers=auth) as ws:
        ws.send("not json")
        event = json.loads(ws.recv(timeout=60))
        assert event["error"]["code"] == "invalid_request"
    with pytest.raises(InvalidStatus):
        connect(url, additional_headers={"Authorization": "Bearer wrong"})
    assert api.delete(f"/sandboxes/{sid}").status_code == 204


def test_background_process(api: httpx.Client) -> None:
    sid = make(api)["id"]
    base = f"/sandboxes/{sid}/processes"
    script = "echo started; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo done >&2; exit 6"
    proc = api.post(base, json={"cmd": ["sh", "-c", script]}).json()
    assert proc["state"] == "running" and proc["id"].startswith("p-")
    assert [p["id"] for p in api.get(base).json()["processes"]] == [proc["id"]]
    api.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/go"}, content=b"")
    with api.stream("GET", f"{base}/{proc['id']}/output") as reply:  # attached late: replayed
        events = [json.loads(line) for line in reply.iter_lines() if line]
    out = [(e["type"], base64.b64decode(e["data"])) for e in events if "data" in e]
    assert out == [("stdout", b"started\n"), ("stderr", b"done\n")]
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 6
    assert api.get(f"{base}/{proc['id']}").json()["state"] == "exited"

    comms = "cat /proc/[0-9]*/comm 2>/dev/null"  # every process's name

    def names() -> list[bytes]:
        r = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", comms]}).json()
        return base64.b64decode(r["stdout"]).split()

    script = "trap 'echo got TERM; exit 3' TERM; sleep 600 & echo ready; wait"
    tid = api.post(base, json={"cmd": script}).json()["id"]
    with api.stream("GET", f"{base}/{tid}/output") as reply:
        lines = (json.loads(line) for line in reply.iter_lines() if line)
        assert base64.b64decode(next(lines)["data"]) == b"ready\n"  # the trap is set
        signalled = api.post(f"{base}/{tid}/signal", json={"signal": "TERM"})
        assert signalled.status_code == 204, signalled.text
        events = list(lines)
    assert [base64.b64decode(e["data"]) for e in events if "data" in e] == [b"got TERM\n"]
    assert events[-1]["exit_code"] == 3
    assert api.post(f"{base}/{tid}/signal", json={"signal": "NOPE"}).status_code == 422

    sleeper = api.post(base, json={"cmd": ["sh", "-c", "echo up; exec sleep 600"]}).json()
    with api.stream("GET", f"{base}/{sleeper['id']}/output") as reply:
        lines = (json.loads(line) for line in reply.iter_lines() if line)
        assert next(lines)["type"] == "stdout"
        assert api.delete(f"{base}/{sleeper['id']}", timeout=600).status_code == 204
        assert [event["type"] for event in lines] == ["killed"]
    assert b"init" in names()  # the listing works
    wait_for(lambda: b"sleep" not in names(), 300, "the process groups to be killed")
    assert error_code(api.get(f"{base}/p-nosuchprocess")) == "not_found"
    assert api.delete(f"/sandboxes/{sid}").status_code == 204


def test_timeout_reaper(daemon: Daemon, api: httpx.Client) -> None:
    doomed = make(api, timeout=1)
    kept = make(api, timeout=60)  # then pushed back: the reaper must read the new time
    pid = int(str(record(daemon, doomed["id"])["pid"]))
    info = api.post(f"/sandboxes/{kept['id']}/timeout", json={"timeout": 600}).json()
    assert info["expires_at"] > doomed["expires_at"]  # type: ignore[operator]
    wait_for(lambda: api.get(f"/sandboxes/{doomed['id']}").status_code == 404, 60, "the reaper")
    wait_for(lambda: not alive(pid), 30, "the reaped VMM to exit")
    assert api.get(f"/sandboxes/{kept['id']}").json()["state"] == "running"
    reaped = 'ember_sandbox_events_total{event="reaped"} 1.0'
    wait_for(lambda: reaped in api.get("/metrics").text, 30, "the reaped metric")
    api.post(f"/sandboxes/{kept['id']}/timeout", json={"timeout": None})
    assert api.get(f"/sandboxes/{kept['id']}").json()["expires_at"] is None
    assert api.delete(f"/sandboxes/{kept['id']}").status_code == 204


def test_idle_reaper_kills_or_pauses_and_spares_an_open_stream(
    daemon: Daemon, api: httpx.Client
) -> None:
    idle = make(api, idle_timeout=1)
    paused = make(api, idle_timeout=3, on_timeout="pause")  # 3: time to call it once resumed
    streaming = make(api, idle_timeout=1)
    assert (idle["idle_timeout"], paused["on_timeout"]) == (1, "pause")
    assert error_code(api.post("/sandboxes", json={"on_timeout": "explode"})) == "invalid_request"
    body = {"cmd": ["sh", "-c", "sleep 4; echo done"], "stream": True}
    with api.stream("POST", f"/sandboxes/{streaming['id']}/exec", json=body) as reply:
        # a stream open for longer than idle_timeout: the sandbox is not idle meanwhile
        events = [json.loads(line) for line in reply.iter_lines() if line]
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
    wait_for(lambda: api.get(f"/sandboxes/{idle['id']}").status_code == 404, 60, "idle kill")
    wait_for(
        lambda: api.get(f"/sandboxes/{paused['id']}").json()["state"] == "paused", 120, "idle pause"
    )
    resumed = api.post(f"/sandboxes/{paused['id']}/resume", timeout=600).json()
    assert resumed["state"] == "running"
    assert (
        api.post(f"/sandboxes/{paused['id']}/run_code", json={"code": "6*7"}).json()["value"]
        == "42"
    )
    # after the stream ended, it is idle like any other
    wait_for(lambda: api.get(f"/sandboxes/{streaming['id']}").status_code == 404, 60, "idle kill")
    assert api.delete(f"/sandboxes/{paused['id']}").status_code == 204


def test_crash_is_reported(daemon: Daemon, api: httpx.Client) -> None:
    sid = make(api)["id"]
    os.kill(int(str(record(daemon, sid)["pid"])), 9)
    reply = api.post(f"/sandboxes/{sid}/exec", json={"cmd": ["true"]})
    assert reply.status_code == 409 and error_code(reply) == "sandbox_crashed"
    assert api.get(f"/sandboxes/{sid}").json()["state"] == "crashed"
    assert api.get("/sandboxes", params={"state": "crashed"}).json()["sandboxes"][0]["id"] == sid
    assert 'ember_sandboxes{state="crashed"} 1.0' in api.get("/metrics").text
    assert api.delete(f"/sandboxes/{sid}").status_code == 204


def test_zz_nothing_left_behind(daemon: Daemon, api: httpx.Client) -> None:
    assert api.get("/sandboxes").json()["sandboxes"] == []
    assert list((daemon.state_dir / "sandboxes").iterdir()) == []
    keeper = keeper_pid(daemon.state_dir)
    assert keeper is not None
    daemon.stop()
    wait_for(lambda: not alive(keeper), 30, "the keeper to leave")
