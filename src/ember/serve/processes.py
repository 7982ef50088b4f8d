"""Background processes: started by one request, listed, re-attached and killed by later ones.

Each runs as an exec stream held by the daemon on a thread of its own; its
output goes to a bounded buffer (the newest ``BUFFER_BYTES``; older output is
dropped and counted), which an attaching client gets replayed before it
follows the live output to the exit.  Killing one hangs up its exec
connection and sends its process group SIGKILL; another signal is sent the
same way.  (The command runs under a ``sh`` that records its pid, the group's
id, in the guest's ``/tmp/.ember-processes`` and then ``exec``-s it: closing
an exec connection alone does not stop a silent guest process today.)
They live as long as the daemon: a restart drops them from its view.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from ember.client import Command, ExecStream
from ember.sandbox import Sandbox, wire
from ember.serve import models
from ember.serve.guard import json_lines
from ember.serve.manager import Manager, NotFound

BUFFER_BYTES = 1 << 20
MAX_PER_SANDBOX = 64
SIGNAL_TIMEOUT = 180.0  # a guest exec on a loaded, emulated-kernel host takes seconds
Signal = Literal["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP"]
# $0: the pid file; the rest: the command (argv) or, with WRAP_SHELL, one shell command line.
WRAP = 'mkdir -p "${0%/*}" && echo $$ > "$0" && exec "$@"'
WRAP_SHELL = 'mkdir -p "${0%/*}" && echo $$ > "$0" && exec sh -c "$1"'


def pidfile(process_id: str) -> str:
    return f"/tmp/.ember-processes/{process_id}.pid"


def wrapped(process_id: str, cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["sh", "-c", WRAP_SHELL, pidfile(process_id), cmd]
    return ["sh", "-c", WRAP, pidfile(process_id), *cmd]


@dataclass
class Process:
    id: str
    cmd: Command
    stream: ExecStream
    sandbox: Sandbox
    started_at: float = field(default_factory=time.time)
    events: deque[tuple[int, str, bytes]] = field(default_factory=deque)  # (seq, stream, data)
    buffered: int = 0
    dropped: int = 0
    seq: int = 0
    done: bool = False
    killed: bool = False
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def json(self) -> dict[str, Any]:
        with self.cond:
            state = "running" if not self.done else ("killed" if self.killed else "exited")
            return {
                "id": self.id, "cmd": self.cmd, "state": state, "started_at": self.started_at,
                "exit_code": self.result["exit_code"] if self.result else None,
                "dropped_bytes": self.dropped,
            }  # fmt: skip

    def pump(self) -> None:
        """On its own thread: output into the buffer until the exec ends."""
        try:
            for chunk in self.stream:
                with self.cond:
                    self.events.append((self.seq, chunk.stream, chunk.data))
                    self.seq += 1
                    self.buffered += len(chunk.data)
                    while self.buffered > BUFFER_BYTES and len(self.events) > 1:
                        _, _, old = self.events.popleft()
                        self.buffered -= len(old)
                        self.dropped += len(old)
                    self.cond.notify_all()
            if self.stream.result is not None:
                self.result = wire.exec_result_json(self.stream.result)
        except Exception as exc:
            if not self.killed:
                self.error = wire.error_body(exc)[1]
        finally:
            self.stream.close()
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def follow(self) -> Iterator[dict[str, Any]]:
        """The buffered output, then the live output, then how it ended."""
        next_seq = 0
        while True:
            with self.cond:
                batch = [e for e in self.events if e[0] >= next_seq]
                while not batch and not self.done:
                    self.cond.wait(30)
                    batch = [e for e in self.events if e[0] >= next_seq]
            if not batch:
                break
            for seq, stream, data in batch:
                next_seq = seq + 1
                yield {"type": stream, "data": wire.b64(data)}
        if self.killed:  # by a request: its SIGKILL's exit status may still have come back
            yield {"type": "killed"}
        elif self.result is not None:
            yield {"type": "exit", **self.result}
        elif self.error is not None:
            yield {"type": "error", **self.error}
        else:
            yield {"type": "killed"}

    def signal(self, name: str) -> None:
        """Send SIGname to the process group (the command and what it started)."""
        if self.done:
            return
        script = (  # a process started a moment ago may not have written its pid yet
            'i=0; while [ ! -s "$0" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; '
            'kill -s "$1" -- "-$(cat "$0")" 2>/dev/null; true'
        )
        self.sandbox.exec(["sh", "-c", script, pidfile(self.id), name], timeout=SIGNAL_TIMEOUT)

    def kill(self) -> None:
        with self.cond:
            self.killed = not self.done
        try:
            self.signal("KILL")
        finally:
            self.stream.close()


class Processes:
    """Every sandbox's background processes, by sandbox id and process id."""

    def __init__(self) -> None:
        self._by_sandbox: dict[str, dict[str, Process]] = {}
        self._lock = threading.Lock()

    def start(self, sandbox_id: str, sb: Sandbox, cmd: Command, **kwargs: Any) -> Process:
        with self._lock:
            mine = self._by_sandbox.setdefault(sandbox_id, {})
            if sum(not p.done for p in mine.values()) >= MAX_PER_SANDBOX:
                raise ValueError(f"at most {MAX_PER_SANDBOX} background processes per sandbox")
        process_id = "p-" + secrets.token_urlsafe(9)
        stream: ExecStream = sb._call(sb._client.exec_stream, wrapped(process_id, cmd), **kwargs)
        proc = Process(process_id, cmd, stream, sb)
        with self._lock:
            self._by_sandbox.setdefault(sandbox_id, {})[proc.id] = proc
        threading.Thread(target=proc.pump, name=f"ember-bg-{proc.id}", daemon=True).start()
        return proc

    def list(self, sandbox_id: str) -> list[Process]:
        with self._lock:
            return list(self._by_sandbox.get(sandbox_id, {}).values())

    def get(self, sandbox_id: str, process_id: str) -> Process | None:
        with self._lock:
            return self._by_sandbox.get(sandbox_id, {}).get(process_id)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone (its VMM with it): drop its processes' records."""
        with self._lock:
            gone = self._by_sandbox.pop(sandbox_id, {})
        for proc in gone.values():
            with proc.cond:
                proc.killed = not proc.done
            proc.stream.close()  # the VMM is gone or going: nothing to signal


class StartBody(models.Strict):
    cmd: models.Cmd
    timeout: models.Seconds | None = None
    env: models.Env | None = None
    cwd: models.Cwd | None = None


class SignalBody(models.Strict):
    signal: Signal = "TERM"


def register(
    app: FastAPI,
    manager: Manager,
    call: Callable[[str, Callable[[Sandbox], Any]], Any],
) -> Processes:
    """The /sandboxes/ID/processes routes."""
    processes = Processes()

    def find(sandbox_id: str, process_id: str) -> Process:
        proc = processes.get(sandbox_id, process_id)
        if proc is None:
            raise NotFound(process_id, "process")
        return proc

    @app.post("/sandboxes/{sandbox_id}/processes", status_code=201)
    def start(sandbox_id: str, body: StartBody) -> dict[str, Any]:
        """Start a command in the background; its output is kept for later attaching."""
        kwargs = {"timeout": body.timeout, "env": body.env, "cwd": body.cwd, "stdin": None}
        proc: Process = call(
            sandbox_id, lambda sb: processes.start(sandbox_id, sb, body.cmd, **kwargs)
        )
        return proc.json()

    @app.get("/sandboxes/{sandbox_id}/processes")
    def list_processes(sandbox_id: str) -> dict[str, Any]:
        manager.get(sandbox_id)
        return {"processes": [p.json() for p in processes.list(sandbox_id)]}

    @app.get("/sandboxes/{sandbox_id}/processes/{process_id}")
    def get_process(sandbox_id: str, process_id: str) -> dict[str, Any]:
        return find(sandbox_id, process_id).json()

    @app.get("/sandboxes/{sandbox_id}/processes/{process_id}/output")
    def attach(sandbox_id: str, process_id: str) -> StreamingResponse:
        """NDJSON: the buffered output replayed, then the live output, then exit/killed."""
        proc = find(sandbox_id, process_id)
        lines = (json_lines(event) for event in proc.follow())
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @app.post("/sandboxes/{sandbox_id}/processes/{process_id}/signal", status_code=204)
    def signal(sandbox_id: str, process_id: str, body: SignalBody) -> Response:
        """Send a signal to the process's group (TERM, INT, HUP, KILL, ...)."""
        proc = find(sandbox_id, process_id)
        call(sandbox_id, lambda _sb: proc.signal(body.signal))
        return Response(status_code=204)

    @app.delete("/sandboxes/{sandbox_id}/processes/{process_id}", status_code=204)
    def kill(sandbox_id: str, process_id: str) -> Response:
        """Kill the process (and its whole process group)."""
        proc = find(sandbox_id, process_id)
        call(sandbox_id, lambda _sb: proc.kill())
        return Response(status_code=204)

    return processes
