"""The daemon's HTTP API without I/O: what each remote facade method asks, how to read it.

:class:`~ember.sandbox.remote.RemoteSandbox` (``httpx.Client``) and
:class:`~ember.sandbox.remote_async.AsyncRemoteSandbox` (``httpx.AsyncClient``) both
build a :class:`Request` here, send it their way, and hand the decoded reply back to
the request's ``parse``; a streamed exec's NDJSON lines go through
:func:`stream_event`.  Errors come back as the SDK's exceptions, decoded from the
daemon's stable error codes (:mod:`ember.sandbox.wire`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ember.client import CodeResult, ExecResult, OutputChunk, Source
from ember.errors import ConfigError, SandboxError
from ember.sandbox import wire
from ember.sandbox.options import ExecArgs, StreamArgs
from ember.sandbox.signature import refused

if TYPE_CHECKING:
    import httpx  # imported by the remote facades; the in-process ones never need it

CONNECT_TIMEOUT = 10.0
ELSEWHERE = "through the daemon yet: use it in-process"  # why a remote facade refuses a call
T = TypeVar("T")
H = TypeVar("H")


def _token(token: str | None) -> str:
    if token:
        return token
    if os.environ.get("EMBER_TOKEN"):
        return os.environ["EMBER_TOKEN"]
    try:
        return (wire.default_state_dir() / wire.TOKEN_NAME).read_text().strip()
    except OSError:
        raise ConfigError(
            "no token for the Ember daemon: set EMBER_TOKEN (its token file is "
            "STATE_DIR/token, printed by `ember serve`)"
        ) from None


def http_client(make: Callable[..., H], server: str | None, token: str | None) -> tuple[str, H]:
    """The daemon's URL (``server``, else ``$EMBER_SERVER``) and ``make`` (``httpx.Client``
    or ``httpx.AsyncClient``) made for it: its base URL, bearer token and timeouts."""
    import httpx

    url = server if server else os.environ.get("EMBER_SERVER", "")
    if not url:
        raise ConfigError("no Ember daemon given: pass server= or set EMBER_SERVER")
    url = url.rstrip("/")
    return url, make(
        base_url=url,
        headers={"Authorization": f"Bearer {_token(token)}"},
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
    )


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Around a request: the daemon unreachable is a SandboxError that names it."""
    import httpx

    try:
        yield
    except httpx.TransportError as exc:
        raise SandboxError(f"cannot reach the Ember daemon at {url}: {exc}") from exc


# What a remote facade refuses (the name in its message), not available through a daemon yet.
HOST_SIDE = {
    "set_memory": "set_memory()",
    "memory_stats": "memory_stats()",
    "_connect_port": "connect(port)",
    "listen": "listen()",  # the VMM's sockets are on the daemon's host
}


C = TypeVar("C", bound=type)


def _none(self: object) -> None:
    return None


def on_the_daemons_host(cls: C) -> C:
    """Decorates the remote facades: a daemon's sandbox runs on the daemon's host, so its
    VMM's ``address`` and ``cgroup`` are None here, and the calls of :data:`HOST_SIDE` raise
    SandboxError (each keeps the in-process facade's signature and kind, see ``refused``)."""
    for name in ("address", "cgroup"):
        setattr(cls, name, property(_none, doc=f"None: the {name} is on the daemon's host"))
    for name, what in HOST_SIDE.items():
        if name not in cls.__dict__:
            setattr(cls, name, refused(getattr(cls, name), what, ELSEWHERE))
    return cls


def _json(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return reply.text


def raise_for(reply: httpx.Response) -> None:
    """The daemon's error (a read reply of status >= 400) as the SDK's exception."""
    if reply.status_code >= 400:
        wire.raise_for(reply.status_code, _json(reply))


def decode(reply: httpx.Response) -> Any:
    """A whole reply's value: JSON, else its bytes (a file); an error raised."""
    raise_for(reply)
    if reply.headers.get("content-type", "").startswith("application/json"):
        return reply.json()
    return reply.content


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call on a sandbox: ``method`` on ``/sandboxes/{id}{tail}``; ``parse`` reads the
    decoded reply."""

    method: str
    tail: str
    parse: Callable[[Any], T] = _same
    options: dict[str, Any] = field(default_factory=dict)  # httpx's params=, json=, content=


def list_params(metadata: dict[str, str] | None) -> list[tuple[str, str]]:
    return [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]


# --- the sandbox's requests
def state(method: str = "GET", tail: str = "", **options: Any) -> Request[dict[str, Any]]:
    """A request answered by the sandbox's record (info, timeout, pause, resume, delete)."""
    return Request(method, tail, options=options)


def fork() -> Request[dict[str, Any]]:
    """A fork: the new sandbox's record (its own id; the parent's metadata and deadline)."""
    return Request("POST", "/fork", options={"json": {}})


def snapshot(name: str) -> Request[None]:
    return Request("POST", "/snapshot", lambda _reply: None, {"json": {"name": name}})


def expose(port: int) -> Request[tuple[str, int]]:
    """A networked sandbox's TCP ``port``, forwarded on the daemon's host."""
    return Request("POST", "/expose", lambda r: (str(r["address"]), int(r["port"])),
                   {"json": {"port": port}})  # fmt: skip


def ping() -> Request[dict[str, Any]]:
    return Request("GET", "/ping")


def console() -> Request[str]:
    return Request("GET", "/console", lambda reply: str(reply["console"]))


def exec_(a: ExecArgs) -> Request[ExecResult]:
    body = {**_exec_body(a), "max_output": a.max_output}
    return Request("POST", "/exec", wire.exec_result, {"json": body})


def run_code(code: str, timeout: float | None) -> Request[CodeResult]:
    body = {"code": code, "timeout": timeout}
    return Request("POST", "/run_code", wire.code_result, {"json": body})


def _exec_body(a: StreamArgs) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": a.cmd if isinstance(a.cmd, str) else list(a.cmd)}
    for key, value in (("timeout", a.timeout), ("env", a.env), ("cwd", a.cwd)):
        if value is not None:
            body[key] = value
    if a.stdin is not None:
        body["stdin"] = wire.b64(_read_all(a.stdin))
    if a.files:
        body["files"] = {path: wire.b64(bytes(data)) for path, data in a.files.items()}
    return body


def _read_all(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if hasattr(source, "read"):
        return bytes(source.read())
    return b"".join(bytes(c) for c in source)


def stream_body(a: StreamArgs) -> dict[str, Any]:
    """``POST /exec``'s body for a streamed exec (NDJSON lines, see :func:`stream_event`)."""
    return {**_exec_body(a), "stream": True}


def stream_event(line: str) -> OutputChunk | ExecResult | None:
    """One line of a streamed exec: a chunk, the result (the last), or None (a blank)."""
    if not line:
        return None
    event = json.loads(line)
    kind = event.get("type")
    if kind in ("stdout", "stderr"):
        return OutputChunk(kind, wire.unb64(event["data"]))
    if kind == "exit":
        return wire.exec_result(event)
    if kind == "error":
        wire.raise_for(wire.STATUS.get(event["error"]["code"], 500), event)
    return None


NO_RESULT = "the daemon ended the exec stream without a result"
