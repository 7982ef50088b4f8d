"""A real guest agent on a Unix socket, for the unit tests of its ops (no KVM).

``python -m ember.agent --listen-unix`` with a real run_code worker, exactly as in the
guest except for the socket family; the clients are the production ones. One agent per
test module (the fixture is module-scoped; ``conftest.py`` makes it visible).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember import protocol
from ember.client import AgentClient, AsyncAgentClient
from ember.protocol import Kind, read_frame
from tests.waiting import alive

__all__ = ["Agent", "agent", "alive"]

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    path: str
    channel_path: str
    client: AgentClient

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        return sock

    def aclient(self) -> AsyncAgentClient:
        return AsyncAgentClient(lambda: asyncio.open_unix_connection(self.path))


def _default_signals() -> None:
    """SIGINT and SIGQUIT as the guest's agent has them. A test run started in the
    background by a non-interactive shell inherits them ignored, and an ignored signal
    stays ignored across exec: ^C on a test terminal would then do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    base = tmp_path_factory.mktemp("agent")
    path, ready_path = str(base / "agent.sock"), str(base / "ready.sock")
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready.bind(ready_path)
    ready.listen(1)
    ready.settimeout(30)
    env = dict(os.environ, EMBER_CHANNEL_UNIX=str(base / "channel.sock"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.agent", "--listen-unix", path, "--ready-unix", ready_path],
        env=env,
        preexec_fn=_default_signals,
    )
    try:
        conn, _ = ready.accept()  # the readiness announcement
        with conn:
            conn.settimeout(30)
            frame = read_frame(conn)
        assert frame is not None and frame[0] is Kind.REQUEST
        hello = protocol.decode_json(frame[1])
        assert hello == {"op": "ready", "version": protocol.PROTOCOL_VERSION, "pid": proc.pid}
        a = Agent(proc, path, env["EMBER_CHANNEL_UNIX"], AgentClient(lambda: a.connect()))
        yield a
        a.client.shutdown()
        assert proc.wait(timeout=10) == 0
    finally:
        ready.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
