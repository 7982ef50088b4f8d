"""The VMM's control socket: snapshot, pause and resume a running VM from outside.

One request per connection, one JSON object per line each way, served on
the event thread (so no device callback runs during a snapshot)::

    {"op": "snapshot", "path": "/dir", "durable": false}  ->  {"ok": true, "paused_ms": ...}
    {"op": "pause"} / {"op": "resume"} / {"op": "status"}

Only the sandbox's owner can reach it: the socket lives in the sandbox's
private directory.  A malformed request gets ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.vmm.event_loop import EventLoop
from ember.vmm.machine import Machine

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, machine: Machine, events: EventLoop) -> None:
        self.path = path
        self.machine = machine
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
            self._sock.listen(8)
        except OSError as exc:
            self._sock.close()
            raise EmberError(f"cannot listen on control socket {path}: {exc.strerror}") from None
        events.add_reader(self._sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                request = _read_line(conn)
                reply = self.handle(json.loads(request))
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "a request is an object with an 'op'"}
        op = request["op"]
        try:
            if op == "snapshot":
                path = request.get("path")
                if not isinstance(path, str) or not path:
                    return {"ok": False, "error": "snapshot needs a 'path'"}
                timings = self.machine.snapshot(Path(path), durable=bool(request.get("durable")))
                return {"ok": True, **timings}
            if op == "pause":
                self.machine.pause()
                return {"ok": True}
            if op == "resume":
                self.machine.resume()
                return {"ok": True}
            if op == "status":
                return {"ok": True, "paused": self.machine.paused, "pid": os.getpid()}
        except EmberError as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


def request(
    socket_path: Path | str, op: str, timeout: float = 120.0, **args: Any
) -> dict[str, Any]:
    """Client side: send one request, return the reply (raises EmberError on failure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = _read_line(sock)
        except OSError as exc:
            raise EmberError(f"the VMM's control socket did not answer: {exc}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise EmberError("the VMM's control socket sent garbage") from None
    if not reply.get("ok"):
        raise EmberError(f"VMM {op} failed: {reply.get('error')}")
    return reply
