"""The SDK's client of an ``ember serve`` daemon: ``Sandbox(server=URL)``.

:class:`RemoteSandbox` has the in-process :class:`~ember.sandbox.Sandbox`'s
methods, each one HTTP request (``exec_stream`` one streamed NDJSON reply),
so code moves between the two by adding ``server=``.  Errors come back as
the same exceptions (``SandboxCrashed``, ``AgentFileNotFoundError``,
``SandboxTimeout``, ...) decoded from the daemon's stable error codes.
Sandboxes outlive their clients: ``Sandbox.connect(ID)`` re-attaches from any
process.  ``close()``/``kill()`` (and leaving a ``with`` block) destroy the
sandbox; :meth:`RemoteSandbox.detach` only lets go of it.

The server defaults to ``$EMBER_SERVER``; the token to ``$EMBER_TOKEN``, else
the daemon's token file in the default state directory when readable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from ember.client import (
    DEFAULT_MAX_OUTPUT,
    CodeResult,
    Command,
    DirEntry,
    ExecResult,
    FileStat,
    OutputChunk,
    PathArg,
    Source,
)
from ember.errors import ConfigError, SandboxError
from ember.launcher import DEFAULT_MEM_MIB
from ember.network.policy import NetworkPolicy
from ember.sandbox import Sandbox
from ember.serve import wire

CONNECT_TIMEOUT = 10.0


def _token(token: str | None) -> str:
    if token:
        return token
    if os.environ.get("EMBER_TOKEN"):
        return os.environ["EMBER_TOKEN"]
    from ember.serve.state import TOKEN_NAME, default_state_dir

    try:
        return (default_state_dir() / TOKEN_NAME).read_text().strip()
    except OSError:
        raise ConfigError(
            "no token for the Ember daemon: set EMBER_TOKEN (its token file is "
            "STATE_DIR/token, printed by `ember serve`)"
        ) from None


class Api:
    """One daemon: its base URL, token and a pooled HTTP client."""

    def __init__(self, server: str | None = None, token: str | None = None) -> None:
        url = server if server else os.environ.get("EMBER_SERVER", "")
        if not url:
            raise ConfigError("no Ember daemon given: pass server= or set EMBER_SERVER")
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {_token(token)}"},
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise SandboxError(f"cannot reach the Ember daemon at {self.url}: {exc}") from exc
        if reply.status_code >= 400:
            wire.raise_for(reply.status_code, _json(reply))
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return reply.content

    def close(self) -> None:
        self.http.close()


def _json(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return reply.text


def list_sandboxes(
    *, server: str | None = None, metadata: dict[str, str] | None = None, token: str | None = None
) -> list[dict[str, Any]]:
    api = Api(server, token)
    try:
        params = [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
        found: list[dict[str, Any]] = api.call("GET", "/sandboxes", params=params)["sandboxes"]
        return found
    finally:
        api.close()


class RemoteSandbox(Sandbox):
    """A sandbox of a daemon: made by ``Sandbox(server=...)`` or ``Sandbox.connect(ID)``."""

    def __init__(
        self,
        *,
        mem_mib: int = DEFAULT_MEM_MIB,
        vcpus: int = 1,
        kernel: Path | None = None,
        rootfs: Path | None = None,
        cpu_template: str = "auto",
        boot_timeout: float = 600.0,
        cpus: float | None = None,
        memory_mib: int | None = None,
        pids: int | None = None,
        template: str | None = None,
        boot: bool = False,
        jail: bool | None = None,
        network: bool | NetworkPolicy | None = None,
        server: str | None = None,
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        if kernel is not None or rootfs is not None or boot or network or jail is False:
            raise ConfigError(
                "kernel=, rootfs=, boot=, network= and jail=False are not available through "
                'a daemon: use them in-process (server="")'
            )
        api = Api(server)
        body: dict[str, Any] = {"mem_mib": mem_mib, "vcpus": vcpus, "metadata": metadata or {}}
        for key, value in (("cpus", cpus), ("memory_mib", memory_mib), ("pids", pids),
                           ("template", template), ("timeout", timeout)):  # fmt: skip
            if value is not None:
                body[key] = value
        try:
            info = api.call("POST", "/sandboxes", json=body)
        except BaseException:
            api.close()
            raise
        self._init_remote(api, info)

    def _init_remote(self, api: Api, info: dict[str, Any]) -> None:
        self._api = api
        self._info = info
        self._id: str = info["id"]
        self._closed = False
        self.files = RemoteFiles(self)  # type: ignore[assignment]

    @classmethod
    def attach(cls, sandbox_id: str, *, server: str | None = None) -> RemoteSandbox:
        api = Api(server)
        try:
            info = api.call("GET", f"/sandboxes/{sandbox_id}")
        except BaseException:
            api.close()
            raise
        sb = object.__new__(cls)
        sb._init_remote(api, info)
        return sb

    # --- plumbing
    def _path(self, tail: str = "") -> str:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        return f"/sandboxes/{self._id}{tail}"

    # --- the daemon's own
    @property
    def id(self) -> str:
        return self._id

    @property
    def metadata(self) -> dict[str, str]:
        found: dict[str, str] = self._info.get("metadata", {})
        return found

    def info(self) -> dict[str, Any]:
        """The daemon's current view of this sandbox (state, expires_at, ...)."""
        self._info = self._api.call("GET", self._path())
        return self._info

    def set_timeout(self, seconds: float) -> None:
        self._info = self._api.call("POST", self._path("/timeout"), json={"timeout": seconds})

    def pause(self) -> None:
        """Snapshot the sandbox to the daemon's disk and stop it (no CPU, memory freed);
        :meth:`resume` (from any process, after a daemon restart too) brings it back."""
        self._info = self._api.call("POST", self._path("/pause"))

    def resume(self) -> None:
        self._info = self._api.call("POST", self._path("/resume"))

    def detach(self) -> None:
        """Let go of the sandbox without destroying it (``Sandbox.connect(ID)`` gets it back)."""
        if not self._closed:
            self._closed = True
            self._api.close()

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._api.call("DELETE", self._path())
        finally:
            self.detach()

    # --- the Sandbox API
    @property
    def console(self) -> str:
        text: str = self._api.call("GET", self._path("/console"))["console"]
        return text

    def ping(self) -> dict[str, Any]:
        found: dict[str, Any] = self._api.call("GET", self._path("/ping"))
        return found

    def exec(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        body = _exec_body(cmd, timeout, env, cwd, stdin)
        body["max_output"] = max_output
        return wire.exec_result(self._api.call("POST", self._path("/exec"), json=body))

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
    ) -> Iterator[OutputChunk]:
        body = _exec_body(cmd, timeout, env, cwd, stdin)
        body["stream"] = True
        return self._stream(body)

    def _stream(self, body: dict[str, Any]) -> Iterator[OutputChunk]:
        with self._api.http.stream("POST", self._path("/exec"), json=body) as reply:
            if reply.status_code >= 400:
                reply.read()
                wire.raise_for(reply.status_code, _json(reply))
            for line in reply.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type")
                if kind in ("stdout", "stderr"):
                    yield OutputChunk(kind, wire.unb64(event["data"]))
                elif kind == "exit":
                    return wire.exec_result(event)  # type: ignore[return-value]
                elif kind == "error":
                    wire.raise_for(wire.STATUS.get(event["error"]["code"], 500), event)
        raise SandboxError("the daemon ended the exec stream without a result")

    def run_code(self, code: str, *, timeout: float | None = None) -> CodeResult:
        body = {"code": code, "timeout": timeout}
        return wire.code_result(self._api.call("POST", self._path("/run_code"), json=body))

    def _unsupported(self, what: str) -> SandboxError:
        return SandboxError(f"{what} is not available through the daemon yet: use it in-process")

    def channel(self, name: str, *, timeout: float | None = None) -> Iterator[bytes]:
        raise self._unsupported("channel()")

    def set_memory(self, target_mib: int, *, timeout: float = 120.0) -> int:
        raise self._unsupported("set_memory()")

    def memory_stats(self, *, timeout: float = 30.0) -> dict[str, int]:
        raise self._unsupported("memory_stats()")

    def _connect_port(self, port: int) -> Any:
        raise self._unsupported("connect(port)")

    def expose(self, port: int) -> tuple[str, int]:
        raise self._unsupported("expose()")

    def listen(self, port: int, *, backlog: int = 16) -> Any:
        raise self._unsupported("listen()")  # the VMM's sockets are on the daemon's host

    @property
    def address(self) -> str | None:
        return None

    @property
    def cgroup(self) -> None:
        return None

    def fork(self) -> Sandbox:
        raise self._unsupported("fork()")

    def snapshot(self, name: str) -> None:
        raise self._unsupported("snapshot()")


def _exec_body(
    cmd: Command,
    timeout: float | None,
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: Source | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    for key, value in (("timeout", timeout), ("env", env), ("cwd", cwd)):
        if value is not None:
            body[key] = value
    if stdin is not None:
        data = _read_all(stdin)
        body["stdin"] = wire.b64(data)
    return body


def _read_all(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if hasattr(source, "read"):
        return bytes(source.read())
    return b"".join(bytes(c) for c in source)


class RemoteFiles:
    """``sb.files`` of a daemon's sandbox (whole files per request, bounded by the daemon)."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        params: dict[str, Any] = {"path": str(path)}
        if mode is not None:
            params["mode"] = mode
        content = data if isinstance(data, bytes) else data.read()
        reply = self._sb._api.call("PUT", self._sb._path("/files"), params=params, content=content)
        return int(reply["size"])

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        params: dict[str, Any] = {"path": str(path)}
        if max_output is not None:
            params["max_output"] = max_output
        data: bytes = self._sb._api.call("GET", self._sb._path("/files"), params=params)
        return data

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return fileobj.write(self.read(path))

    def stat(self, path: PathArg) -> FileStat:
        d = self._sb._api.call("GET", self._sb._path("/files/stat"), params={"path": str(path)})
        return FileStat(d["size"], d["mode"], d["mtime"], d["is_dir"], d["is_file"])

    def list(self, path: PathArg) -> list[DirEntry]:
        d = self._sb._api.call("GET", self._sb._path("/files/list"), params={"path": str(path)})
        return [DirEntry(e["name"], e["size"], e["is_dir"]) for e in d["entries"]]

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        params = {"path": str(path), "recursive": recursive}
        self._sb._api.call("DELETE", self._sb._path("/files"), params=params)
