"""The asyncio SDK's client of an ``ember serve`` daemon: ``AsyncSandbox(server=URL)``.

The same requests as :mod:`ember.sandbox.remote` (built and read in
:mod:`ember.sandbox.daemon`) over ``httpx.AsyncClient``; the sandbox is made by
``start()`` (``async with``), re-attached with ``await AsyncSandbox.connect(ID)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import httpx

from ember.client import CodeResult, ExecResult, OutputChunk, PathArg
from ember.errors import SandboxError
from ember.sandbox import daemon, remote_streams, remote_terminal
from ember.sandbox.aio import AsyncSandbox
from ember.sandbox.files import AsyncRemoteFiles
from ember.sandbox.options import ExecArgs, SandboxOptions, StreamArgs
from ember.sandbox.remote_terminal import AsyncRemoteTerminal
from ember.sandbox.remote_watch import AsyncRemoteWatch, watch_params
from ember.sandbox.signature import takes
from ember.templates import check_name

T = TypeVar("T")


class AsyncApi:
    def __init__(self, server: str | None = None, token: str | None = None) -> None:
        self.url, self.http = daemon.http_client(httpx.AsyncClient, server, token)

    def twin(self) -> AsyncApi:
        """Another client of the same daemon (same token), closed on its own."""
        twin = object.__new__(AsyncApi)
        twin.url = self.url
        twin.http = httpx.AsyncClient(
            base_url=self.url, headers=self.http.headers, timeout=self.http.timeout
        )
        return twin

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with daemon.reaching(self.url):
            return daemon.decode(await self.http.request(method, path, **kwargs))


@daemon.on_the_daemons_host
class AsyncRemoteSandbox(AsyncSandbox):
    """A daemon's sandbox for asyncio code (see :class:`ember.sandbox.remote.RemoteSandbox`)."""

    @takes(SandboxOptions)
    def __init__(self, options: SandboxOptions) -> None:
        body = options.daemon_body()
        self._setup_remote(AsyncApi(options.server), body=body)

    def _setup_remote(self, api: AsyncApi, *, body: dict[str, Any]) -> None:
        self._api = api
        self._body = body  # what start() asks the daemon for (none: attached)
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
        sb._setup_remote(AsyncApi(server), body={})
        sb._info = await sb._api.call("GET", f"/sandboxes/{sandbox_id}")
        return sb

    def _path(self, tail: str = "") -> str:
        if self._closed or not self._info:
            raise SandboxError("this sandbox is not running (use `async with AsyncSandbox()`)")
        return f"/sandboxes/{self._info['id']}{tail}"

    async def _do(self, request: daemon.Request[T]) -> T:
        reply = await self._api.call(request.method, self._path(request.tail), **request.options)
        return request.parse(reply)

    async def _watch(self, path: PathArg, recursive: bool) -> AsyncRemoteWatch:
        params = watch_params(path, recursive)
        with daemon.reaching(self._api.url):
            opened = self._api.http.stream("GET", self._path("/files/watch"), params=params)
            return await AsyncRemoteWatch(opened, self._api.url)._open()

    @property
    def id(self) -> str | None:
        return self._info.get("id")

    @property
    def metadata(self) -> dict[str, str]:
        found: dict[str, str] = self._info.get("metadata", {})
        return found

    async def info(self) -> dict[str, Any]:
        self._info = await self._do(daemon.state())
        return self._info

    async def set_timeout(self, seconds: float) -> None:
        self._info = await self._do(daemon.state("POST", "/timeout", json={"timeout": seconds}))

    async def expose(self, port: int) -> tuple[str, int]:
        """See ``RemoteSandbox.expose``."""
        return await self._do(daemon.expose(port))

    async def pause(self) -> None:
        self._info = await self._do(daemon.state("POST", "/pause"))

    async def resume(self) -> None:
        self._info = await self._do(daemon.state("POST", "/resume"))

    async def fork(self) -> AsyncRemoteSandbox:
        """A new (started) sandbox of the daemon continuing from this one's state; see
        ``RemoteSandbox.fork``."""
        info = await self._do(daemon.fork())
        sb = object.__new__(type(self))
        sb._setup_remote(self._api.twin(), body={})
        sb._info = info
        return sb

    async def snapshot(self, name: str) -> None:
        """Save this sandbox as it is now as the daemon's template ``name``."""
        await self._do(daemon.snapshot(check_name(name)))

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
                await self._do(daemon.state("DELETE"))
        finally:
            await self.detach()

    async def ping(self) -> dict[str, Any]:
        return await self._do(daemon.ping())

    @takes(ExecArgs)
    async def exec(self, a: ExecArgs) -> ExecResult:
        return await self._do(daemon.exec_(a))

    @takes(StreamArgs)
    async def exec_stream(self, a: StreamArgs) -> AsyncIterator[OutputChunk]:
        body = daemon.stream_body(a)
        async with self._api.http.stream("POST", self._path("/exec"), json=body) as reply:
            if reply.status_code >= 400:
                await reply.aread()
                daemon.raise_for(reply)
            async for line in reply.aiter_lines():
                event = daemon.stream_event(line)
                if isinstance(event, ExecResult):
                    return
                if event is not None:
                    yield event
        raise SandboxError(daemon.NO_RESULT)

    async def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        if on_stdout is None and on_stderr is None:
            return await self._do(daemon.run_code(code, timeout))
        body = remote_streams.code_body(code, timeout)
        return await remote_streams.aio_run_code(
            self._api.http, self._api.url, self._path("/run_code"), body, on_stdout, on_stderr
        )

    async def channel(self, name: str, *, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Frames guest code sends on channel ``name``, over a WebSocket to the daemon."""
        headers = {"Authorization": self._api.http.headers["Authorization"]}
        frames = remote_streams.aio_channel(self._api.url, headers, self._path(), name, timeout)
        try:
            async for frame in frames:
                yield frame
        finally:
            await frames.aclose()  # left early: hang up now, not when it is collected

    async def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncRemoteTerminal:
        """``RemoteSandbox.pty`` for asyncio."""
        first = remote_terminal.request(argv, rows=rows, cols=cols, env=env, cwd=cwd,
                                        timeout=timeout)  # fmt: skip
        auth = self._api.http.headers["Authorization"]
        return await remote_terminal.open_async(self._api.url, auth, self._path("/pty/ws"), first)

    @property
    def console(self) -> str:
        raise SandboxError("console is not available through the daemon's asyncio client yet")
