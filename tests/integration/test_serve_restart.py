"""``kill -9`` of the daemon: its VMMs live on (children of the keeper), and the next daemon
re-adopts them from its state dir with their state intact; one whose VMM died meanwhile is
reported as crashed and its leftovers are removed."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path

import pytest

from ember.serve.keeper import keeper_pid
from tests.integration.serve_daemon import Daemon, alive, free_port, wait_for

pytestmark = pytest.mark.kvm


def test_daemon_killed_and_restarted(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "state", free_port())
    first.start()
    second: Daemon | None = None
    try:
        with first.client() as api:
            kept = api.post("/sandboxes", json={"metadata": {"role": "kept"}}).json()["id"]
            lost = api.post("/sandboxes", json={}).json()["id"]
            base = f"/sandboxes/{kept}"
            assert api.post(f"{base}/run_code", json={"code": "x = 41"}).json()["error"] is None
            api.put(f"{base}/files", params={"path": "/tmp/kept"}, content=b"survives")
            paused = api.post("/sandboxes", json={}).json()["id"]
            code = {"code": "import os; p = os.getpid()"}
            assert api.post(f"/sandboxes/{paused}/run_code", json=code).json()["error"] is None
            pid_in_guest = api.post(f"/sandboxes/{paused}/run_code", json={"code": "p"}).json()
            paused_vmm = json.loads((first.state_dir / "sandboxes" / f"{paused}.json").read_text())
            assert api.post(f"/sandboxes/{paused}/pause").json()["state"] == "paused"
            assert not alive(paused_vmm["pid"]) and not Path(paused_vmm["dir"]).exists()
            reply = api.post(f"/sandboxes/{paused}/exec", json={"cmd": ["true"]})
            assert reply.status_code == 409 and reply.json()["error"]["code"] == "sandbox_paused"
        records = {
            p.stem: json.loads(p.read_text()) for p in (first.state_dir / "sandboxes").iterdir()
        }
        keeper = keeper_pid(first.state_dir)
        assert keeper is not None

        first.kill9()
        assert alive(records[kept]["pid"]) and alive(records[lost]["pid"]) and alive(keeper)
        os.kill(records[lost]["pid"], signal.SIGKILL)  # dies while no daemon runs
        wait_for(lambda: not alive(records[lost]["pid"]), 30, "the VMM to die")

        second = Daemon(first.state_dir, free_port())
        second.start()
        with second.client() as api:
            info = api.get(base).json()
            assert (info["state"], info["metadata"]) == ("running", {"role": "kept"})
            assert api.post(f"{base}/run_code", json={"code": "x + 1"}).json()["value"] == "42"
            assert api.get(f"{base}/files", params={"path": "/tmp/kept"}).content == b"survives"
            r = api.post(f"{base}/exec", json={"cmd": ["sh", "-c", "echo again"]}).json()
            assert base64.b64decode(r["stdout"]) == b"again\n"

            crashed = api.get(f"/sandboxes/{lost}").json()
            assert crashed["state"] == "crashed" and crashed["error"]
            assert not Path(records[lost]["dir"]).exists()
            reply = api.post(f"/sandboxes/{lost}/exec", json={"cmd": ["true"]})
            assert reply.json()["error"]["code"] == "sandbox_crashed"
            assert api.delete(f"/sandboxes/{lost}").status_code == 204
            assert 'ember_sandbox_events_total{event="adopted"} 1.0' in api.get("/metrics").text

            # Paused under the first daemon, resumed by the second: the same interpreter.
            assert api.get(f"/sandboxes/{paused}").json()["state"] == "paused"
            assert api.post(f"/sandboxes/{paused}/resume").json()["state"] == "running"
            again = api.post(f"/sandboxes/{paused}/run_code", json={"code": "p"}).json()
            assert again["value"] == pid_in_guest["value"] is not None
            assert not (second.state_dir / "paused" / paused).exists()
            assert api.delete(f"/sandboxes/{paused}").status_code == 204

            assert api.delete(base).status_code == 204
            assert not alive(records[kept]["pid"]) and not Path(records[kept]["dir"]).exists()
            assert api.get("/sandboxes").json()["sandboxes"] == []
        assert keeper_pid(second.state_dir) == keeper  # the same keeper served both daemons
        second.stop()
        wait_for(lambda: not alive(keeper), 30, "the keeper to leave")
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                daemon.delete_all()
                daemon.stop()
