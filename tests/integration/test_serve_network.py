"""A networked sandbox of the daemon: its policy at create, a port exposed on the daemon's
host, and both kept through a ``kill -9`` of the daemon (the next one takes the namespace
over and restarts its resolver), a pause and resume (a new namespace, the port exposed
again), and gone with the sandbox (no namespace left)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from ember.network.host import POOL
from ember.sandbox import Sandbox
from tests.integration.serve_daemon import Daemon, free_port, wait_for

pytestmark = pytest.mark.kvm

SERVER = """
import http.server, threading
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the guest"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Hello)
threading.Thread(target=srv.serve_forever, daemon=True).start()
"""


def fetch(address: str, port: int) -> str:
    """The guest server's answer (retried: a restored guest may take a moment to answer)."""
    answer: list[str] = []

    def got() -> bool:
        try:
            answer.append(httpx.get(f"http://{address}:{port}/", timeout=10).text)
        except httpx.TransportError:
            return False
        return True

    wait_for(got, 120, f"the guest's server at {address}:{port}")
    return answer[-1]


def slot_of(address: str) -> int:
    """The network slot behind a sandbox address (10.253.0.0/16, a /30 per slot)."""
    return (int(ipaddress.IPv4Address(address)) - int(POOL.network_address)) // 4


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_networked_sandbox_through_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Daemon(tmp_path / "state", free_port())
    first.start()
    second: Daemon | None = None
    try:
        with first.client() as api:
            bad = api.post("/sandboxes", json={"network": {"allow": ["10.0.0.1:99999"]}})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "config_error"
            info = api.post("/sandboxes", json={"network": {"allow": ["10.9.9.9:443"]}}).json()
            sid, address = info["id"], info["address"]
            assert address is not None and address.startswith("10.253.")
            assert (
                api.post(f"/sandboxes/{sid}/run_code", json={"code": SERVER}).json()["error"]
                is None
            )
            exposed = api.post(f"/sandboxes/{sid}/expose", json={"port": 8000}).json()
            assert exposed == {"address": address, "port": 8000}
            assert fetch(address, 8000) == "hello from the guest"
            plain = api.post("/sandboxes", json={}).json()
            refused = api.post(f"/sandboxes/{plain['id']}/expose", json={"port": 8000})
            assert refused.status_code == 400 and "no network" in refused.text
        record = json.loads((first.state_dir / "sandboxes" / f"{sid}.json").read_text())
        slot = record["network"]["slot"]
        assert slot == slot_of(address) and f"ember-{slot}" in namespaces()

        first.kill9()  # the resolver died with it; the namespace and the VMM did not
        second = Daemon(first.state_dir, free_port())
        second.start()
        with second.client() as api:
            assert api.get(f"/sandboxes/{sid}").json()["address"] == address
            assert fetch(address, 8000) == "hello from the guest"

            assert api.post(f"/sandboxes/{sid}/pause").json()["state"] == "paused"
            wait_for(lambda: not any(
                line.split()[0] == f"ember-{slot}" for line in namespaces().splitlines()
                if line.strip()
            ), 30, "its network to go with the VMM (deleted in the background)")  # fmt: skip
            resumed = api.post(f"/sandboxes/{sid}/resume", timeout=600).json()
            assert resumed["state"] == "running" and resumed["address"]
            assert fetch(resumed["address"], 8000) == "hello from the guest"  # exposed again
            monkeypatch.setenv("EMBER_TOKEN", second.token)
            sdk = Sandbox.connect(sid, server=second.url)  # the SDK's expose is this route
            assert sdk.expose(8000) == (resumed["address"], 8000) and sdk.address is None
            sdk.detach()

            new_slot = slot_of(resumed["address"])
            assert api.delete(f"/sandboxes/{sid}").status_code == 204
            wait_for(lambda: not any(
                line.split()[0] == f"ember-{new_slot}" for line in namespaces().splitlines()
                if line.strip()
            ), 30, "the namespace to go")  # fmt: skip
            assert api.delete(f"/sandboxes/{plain['id']}").status_code == 204
    finally:
        for daemon in (second, first):
            if daemon is not None:
                daemon.stop()
