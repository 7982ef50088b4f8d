"""The asyncio SDK's client of an ``ember serve`` daemon: ``AsyncSandbox(server=URL)``.

The same requests as :mod:`ember.remote` (its request bodies and error
decoding are reused) over ``httpx.AsyncClient``; the sandbox is made by
``start()`` (``async with``), re-attached with ``await AsyncSandbox.connect(ID)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
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
from ember.remote import CONNECT_TIMEOUT, _exec_body, _json, _token
from ember.sandbox_async import AsyncSandbox
from ember.serve import wire


class AsyncApi:
    def __init__(self, server: str | None = None, token: str | None = None) -> None:
        url = server if server else os.environ.get("EMBER_SERVER", "")
        if not url:
            raise ConfigError("no Ember daemon given: pass server= or set EMBER_SERVER")
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {_token(token)}"},
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
        )

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise SandboxError(f"cannot reach the Ember daemon at {self.url}: {exc}") from exc
        if reply.status_code >= 400:
            wire.raise_for(reply.status_code, _json(reply))
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return reply.content


class AsyncRemoteSandbox(AsyncSandbox):
    """A daemon's sandbox for asyncio code (see :class:`ember.remote.RemoteSandbox`)."""

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
        self._api = AsyncApi(server)
        self._body: dict[str, Any] = {"mem_mib": mem_mib, "vcpus": vcpus,
                                      "metadata": metadata or {}}  # fmt: skip
        for key, value in (("cpus", cpus), ("memory_mib", memory_mib), ("pids", pids),
                           ("template", template), ("timeout", timeout)):  # fmt: skip
            if value is not None:
                self._body[key] = value
        self._info: dict[str, Any] = {}
        self._closed = False
        self.files = AsyncRemoteFiles(self)  # type: ignore[assignment]

    async def start(self) -> AsyncRemoteSandbox:
        if not self._info:
            self._info = await self._api.call("POST", "/sandboxes", json=self._body)
        return self

    @classmethod
    async def attach(cls, sandbox_id: str, *, server: str | None = None) -> AsyncRemoteSandbox:
        sb = object.__new__(cls)
        sb._api = AsyncApi(server)
        sb._closed = False
        sb.files = AsyncRemoteFiles(sb)  # type: ignore[assignment]
        sb._info = await sb._api.call("GET", f"/sandboxes/{sandbox_id}")
        return sb

    def _path(self, tail: str = "") -> str:
        if self._closed or not self._info:
            raise SandboxError("this sandbox is not running (use `async with AsyncSandbox()`)")
        return f"/sandboxes/{self._info['id']}{tail}"

    @property
    def id(self) -> str | None:
        return self._info.get("id")

    @property
    def metadata(self) -> dict[str, str]:
        found: dict[str, str] = self._info.get("metadata", {})
        return found

    async def info(self) -> dict[str, Any]:
        self._info = await self._api.call("GET", self._path())
        return self._info

    async def set_timeout(self, seconds: float) -> None:
        self._info = await self._api.call("POST", self._path("/timeout"), json={"timeout": seconds})

    async def pause(self) -> None:
        self._info = await self._api.call("POST", self._path("/pause"))

    async def resume(self) -> None:
        self._info = await self._api.call("POST", self._path("/resume"))

    async def detach(self) -> None:
        if not self._closed:
            self._closed = True
            await self._api.http.aclose()

    async def kill(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._info:
                await self._api.call("DELETE", self._path())
        finally:
            await self.detach()

    async def ping(self) -> dict[str, Any]:
        found: dict[str, Any] = await self._api.call("GET", self._path("/ping"))
        return found

    async def exec(
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
        return wire.exec_result(await self._api.call("POST", self._path("/exec"), json=body))

    async def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
    ) -> AsyncIterator[OutputChunk]:
        body = {**_exec_body(cmd, timeout, env, cwd, stdin), "stream": True}
        async with self._api.http.stream("POST", self._path("/exec"), json=body) as reply:
            if reply.status_code >= 400:
                await reply.aread()
                wire.raise_for(reply.status_code, _json(reply))
            async for line in reply.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type")
                if kind in ("stdout", "stderr"):
                    yield OutputChunk(kind, wire.unb64(event["data"]))
                elif kind == "exit":
                    return
                elif kind == "error":
                    wire.raise_for(wire.STATUS.get(event["error"]["code"], 500), event)
        raise SandboxError("the daemon ended the exec stream without a result")

    async def run_code(self, code: str, *, timeout: float | None = None) -> CodeResult:
        body = {"code": code, "timeout": timeout}
        return wire.code_result(await self._api.call("POST", self._path("/run_code"), json=body))

    @property
    def console(self) -> str:
        raise SandboxError("console is not available through the daemon's asyncio client yet")

    def _unsupported(self, what: str) -> SandboxError:
        return SandboxError(f"{what} is not available through the daemon yet: use it in-process")

    async def channel(self, name: str, *, timeout: float | None = None) -> AsyncIterator[bytes]:
        raise self._unsupported("channel()")
        yield b""  # an async generator, as AsyncSandbox.channel is

    async def set_memory(self, target_mib: int, *, timeout: float = 120.0) -> int:
        raise self._unsupported("set_memory()")

    async def memory_stats(self, *, timeout: float = 30.0) -> dict[str, int]:
        raise self._unsupported("memory_stats()")

    async def _connect_port(self, port: int) -> Any:
        raise self._unsupported("connect(port)")

    async def expose(self, port: int) -> tuple[str, int]:
        raise self._unsupported("expose()")

    async def fork(self) -> AsyncSandbox:
        raise self._unsupported("fork()")

    async def snapshot(self, name: str) -> None:
        raise self._unsupported("snapshot()")


class AsyncRemoteFiles:
    def __init__(self, sandbox: AsyncRemoteSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        params: dict[str, Any] = {"path": str(path)}
        if mode is not None:
            params["mode"] = mode
        content = data if isinstance(data, bytes) else data.read()
        reply = await self._sb._api.call(
            "PUT", self._sb._path("/files"), params=params, content=content
        )
        return int(reply["size"])

    async def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        params: dict[str, Any] = {"path": str(path)}
        if max_output is not None:
            params["max_output"] = max_output
        data: bytes = await self._sb._api.call("GET", self._sb._path("/files"), params=params)
        return data

    async def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        return fileobj.write(await self.read(path))

    async def stat(self, path: PathArg) -> FileStat:
        d = await self._sb._api.call(
            "GET", self._sb._path("/files/stat"), params={"path": str(path)}
        )
        return FileStat(d["size"], d["mode"], d["mtime"], d["is_dir"], d["is_file"])

    async def list(self, path: PathArg) -> list[DirEntry]:
        d = await self._sb._api.call(
            "GET", self._sb._path("/files/list"), params={"path": str(path)}
        )
        return [DirEntry(e["name"], e["size"], e["is_dir"]) for e in d["entries"]]

    async def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        params = {"path": str(path), "recursive": recursive}
        await self._sb._api.call("DELETE", self._sb._path("/files"), params=params)
