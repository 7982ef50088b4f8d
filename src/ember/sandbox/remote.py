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
The requests themselves are built and read in :mod:`ember.sandbox.daemon`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import httpx

from ember.client import CodeResult, ExecResult, OutputChunk, PathArg
from ember.errors import SandboxError
from ember.sandbox import daemon, remote_streams, remote_terminal
from ember.sandbox.files import RemoteFiles
from ember.sandbox.options import ExecArgs, SandboxOptions, StreamArgs
from ember.sandbox.remote_terminal import RemoteTerminal
from ember.sandbox.remote_watch import RemoteWatch, watch_params
from ember.sandbox.signature import takes
from ember.sandbox.sync import Sandbox
from ember.templates import check_name

T = TypeVar("T")


class Api:
    """One daemon: its base URL, token and a pooled HTTP client."""

    def __init__(self, server: str | None = None, token: str | None = None) -> None:
        self.url, self.http = daemon.http_client(httpx.Client, server, token)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with daemon.reaching(self.url):
            return daemon.decode(self.http.request(method, path, **kwargs))

    def twin(self) -> Api:
        """Another client of the same daemon (same token), closed on its own."""
        twin = object.__new__(Api)
        twin.url = self.url
        twin.http = httpx.Client(
            base_url=self.url, headers=self.http.headers, timeout=self.http.timeout
        )
        return twin

    def close(self) -> None:
        self.http.close()


def list_sandboxes(
    *, server: str | None = None, metadata: dict[str, str] | None = None, token: str | None = None
) -> list[dict[str, Any]]:
    api = Api(server, token)
    try:
        reply = api.call("GET", "/sandboxes", params=daemon.list_params(metadata))
        found: list[dict[str, Any]] = reply["sandboxes"]
        return found
    finally:
        api.close()


@daemon.on_the_daemons_host
class RemoteSandbox(Sandbox):
    """A sandbox of a daemon: made by ``Sandbox(server=...)`` or ``Sandbox.connect(ID)``."""

    @takes(SandboxOptions)
    def __init__(self, options: SandboxOptions) -> None:
        body = options.daemon_body()
        api = Api(options.server)
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

    def _do(self, request: daemon.Request[T]) -> T:
        return request.parse(
            self._api.call(request.method, self._path(request.tail), **request.options)
        )

    def _watch(self, path: PathArg, recursive: bool) -> RemoteWatch:
        params = watch_params(path, recursive)
        with daemon.reaching(self._api.url):
            opened = self._api.http.stream("GET", self._path("/files/watch"), params=params)
            return RemoteWatch(opened, self._api.url)

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
        self._info = self._do(daemon.state())
        return self._info

    def set_timeout(self, seconds: float) -> None:
        self._info = self._do(daemon.state("POST", "/timeout", json={"timeout": seconds}))

    def expose(self, port: int) -> tuple[str, int]:
        """As in-process (a sandbox made with ``network=``): the address is on the daemon's
        host, and the port stays exposed across a pause and a daemon restart."""
        return self._do(daemon.expose(port))

    def pause(self) -> None:
        """Snapshot the sandbox to the daemon's disk and stop it (no CPU, memory freed);
        :meth:`resume` (from any process, after a daemon restart too) brings it back."""
        self._info = self._do(daemon.state("POST", "/pause"))

    def resume(self) -> None:
        self._info = self._do(daemon.state("POST", "/resume"))

    def fork(self) -> RemoteSandbox:
        """A new sandbox of the daemon continuing from this one's state (its own id, this
        one's metadata and deadline); see ``Sandbox.fork``."""
        info = self._do(daemon.fork())
        sb = object.__new__(type(self))
        sb._init_remote(self._api.twin(), info)
        return sb

    def snapshot(self, name: str) -> None:
        """Save this sandbox as it is now as the daemon's template ``name``:
        ``Sandbox(template=name, server=...)``."""
        self._do(daemon.snapshot(check_name(name)))

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
            self._do(daemon.state("DELETE"))
        finally:
            self.detach()

    # --- the Sandbox API
    @property
    def console(self) -> str:
        return self._do(daemon.console())

    def ping(self) -> dict[str, Any]:
        return self._do(daemon.ping())

    @takes(ExecArgs)
    def exec(self, a: ExecArgs) -> ExecResult:
        return self._do(daemon.exec_(a))

    @takes(StreamArgs)
    def exec_stream(self, a: StreamArgs) -> Iterator[OutputChunk]:
        return self._stream(daemon.stream_body(a))

    def _stream(self, body: dict[str, Any]) -> Iterator[OutputChunk]:
        with self._api.http.stream("POST", self._path("/exec"), json=body) as reply:
            if reply.status_code >= 400:
                reply.read()
                daemon.raise_for(reply)
            for line in reply.iter_lines():
                event = daemon.stream_event(line)
                if isinstance(event, ExecResult):
                    return event  # type: ignore[return-value]
                if event is not None:
                    yield event
        raise SandboxError(daemon.NO_RESULT)

    def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        """As in-process; with a callback the daemon streams the output (NDJSON) to it."""
        if on_stdout is None and on_stderr is None:
            return self._do(daemon.run_code(code, timeout))
        body = remote_streams.code_body(code, timeout)
        return remote_streams.run_code(self._api.http, self._api.url, self._path("/run_code"),
                                       body, on_stdout, on_stderr)  # fmt: skip

    def channel(self, name: str, *, timeout: float | None = None) -> Iterator[bytes]:
        """Frames guest code sends with ``ember.agent.channel(name)``, over a WebSocket."""
        headers = {"Authorization": self._api.http.headers["Authorization"]}
        return remote_streams.channel(self._api.url, headers, self._path(), name, timeout)

    def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> RemoteTerminal:
        """``Sandbox.pty`` over the daemon's ``/pty/ws`` WebSocket (``ember shell``'s)."""
        first = remote_terminal.request(argv, rows=rows, cols=cols, env=env, cwd=cwd,
                                        timeout=timeout)  # fmt: skip
        auth = self._api.http.headers["Authorization"]
        return remote_terminal.open_sync(self._api.url, auth, self._path("/pty/ws"), first)
