"""The SDK's side of the restore hook: the first request to a new VMM carries ``resume``.

The agent's side (clock step, entropy, reseed) is tested in ``test_agent_resume.py``; here a
fake agent records what the host sends. Only the first request carries it, whichever call it
is (a kept-connection call, or one that opens its own connection), sync and asyncio alike.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.client import (
    AgentClient,
    AsyncAgentClient,
    CodeError,
    CodeResult,
    explain_crashed_worker,
)
from ember.client.attach import attach
from ember.protocol import Kind, decode_json, read_frame, write_json

from .test_client_bounds import BOUNDS, STAT_OK, FakeAgent, Script, fake, result, run_async

__all__ = ["fake"]  # the fixture, imported for pytest


class KeepingAgent:
    """Answers every request on a connection (the agent keeps short-call connections)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        return ours

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            while (frame := read_frame(sock)) is not None:
                self.requests.append(decode_json(frame[1]))
                write_json(sock, Kind.RESULT, self.answer)


def check_announced(requests: list[dict[str, object]], before_ns: int) -> None:
    first, *rest = requests
    resume = first["resume"]
    assert isinstance(resume, dict)
    assert before_ns <= int(resume["realtime_ns"]) <= time.clock_gettime_ns(time.CLOCK_REALTIME)
    assert len(base64.b64decode(str(resume["entropy"]))) == 32
    assert all("resume" not in r for r in rest)


def test_the_first_request_announces_the_resume() -> None:
    agent = KeepingAgent(STAT_OK)
    client = AgentClient(agent.connect, announce_resume=True, **BOUNDS)
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    client.files.stat("/a")
    client.files.stat("/b")  # on the kept connection
    client.close()
    check_announced(agent.requests, before)
    other = KeepingAgent(STAT_OK)
    AgentClient(other.connect, announce_resume=True, **BOUNDS).files.stat("/a")
    # fresh bytes per sandbox
    assert other.requests[0]["resume"]["entropy"] != agent.requests[0]["resume"]["entropy"]


def test_a_client_that_is_not_told_announces_nothing(fake: Callable[[Script], FakeAgent]) -> None:
    agent = fake(result(STAT_OK))
    AgentClient(agent.connect, **BOUNDS).files.stat("/a")
    assert "resume" not in agent.requests[0]


class FakeVmm:
    """What :func:`ember.client.attach.attach` asks of a VMM, answered by a fake agent."""

    def __init__(self, agent: KeepingAgent) -> None:
        self.agent = agent
        self.restored = False  # no polling worker to wait for: vsock at once
        self.resumes = 0

    def connect(self, port: int = 0) -> socket.socket:
        return self.agent.connect()

    def resume(self, port: int = 0) -> socket.socket | None:
        self.resumes += 1
        return None  # no connection carried over: the client connects

    def exited(self) -> bool:
        return False

    def shm_region(self) -> None:
        return None


def test_attach_announces_for_a_new_vm_and_not_for_an_adopted_one() -> None:
    """A daemon that adopts a VM another process ran must not take over a snapshot's
    connection or announce a resume again (it would step the clock and reseed a running VM)."""
    fresh = FakeVmm(KeepingAgent(STAT_OK))
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    attached = attach(fresh)
    attached.client.files.stat("/a")
    attached.client.files.stat("/b")
    attached.close()
    check_announced(fresh.agent.requests, before)
    assert fresh.resumes == 1

    adopted = FakeVmm(KeepingAgent(STAT_OK))
    attached = attach(adopted, new_vm=False)
    attached.client.files.stat("/a")
    attached.close()
    assert [r.get("resume") for r in adopted.agent.requests] == [None]
    assert adopted.resumes == 0


def test_the_async_client_announces_once() -> None:
    agent = KeepingAgent({"pong": True, "version": 1})

    async def aconnect() -> Any:
        return await asyncio.open_unix_connection(sock=agent.connect())

    client = AsyncAgentClient(aconnect, announce_resume=True, **BOUNDS)
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)

    async def two_pings() -> None:
        await client.ping()
        await client.ping()
        await client.close()

    run_async(two_pings())
    check_announced(agent.requests, before)


def test_a_crashed_worker_error_names_the_console_line() -> None:
    crashed = CodeResult("", "", None, CodeError("WorkerCrashed", "killed by signal 11", ""))
    console = "boot\npython3[25]: segfault at ab ip 0000000000573428 sp 00007ffe677d7dc0\nmore"
    explained = explain_crashed_worker(crashed, console)
    assert explained.error is not None
    assert "segfault at ab" in explained.error.message
    assert "killed by signal 11" in explained.error.message
    other = CodeResult("", "", None, CodeError("ZeroDivisionError", "division by zero", ""))
    assert explain_crashed_worker(other, console) == other
