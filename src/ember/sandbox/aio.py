"""``AsyncSandbox``: the asyncio twin of :class:`ember.sandbox.Sandbox`, same names, awaitable.

::

    async with AsyncSandbox() as sb:
        r = await sb.exec(["python3", "-c", "print(6*7)"])
        async for chunk in sb.exec_stream("python3 sim.py"):
            ...

Booting (process start, waiting for the agent) runs in a worker thread, so
the event loop is never blocked; every operation is then plain asyncio I/O
on the VMM's vsock Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from ember import protocol
from ember.client import (
    AsyncAgentClient,
    ChannelServer,
    CodeResult,
    CodeRing,
    ExecResult,
    LazyRegion,
    OutputChunk,
    Streams,
    explain_crashed_worker,
)
from ember.client.terminal import AsyncTerminal
from ember.descriptors import descriptors_checked, out_of_descriptors
from ember.errors import AgentError, ConfigError, ProtocolError, SandboxError, SandboxTimeout
from ember.jailer.cgroups import SandboxCgroup
from ember.launcher import HANDSHAKE_TIMEOUT, VmmProcess, fork_vmm
from ember.sandbox import spares
from ember.sandbox.files import AsyncSandboxFiles
from ember.sandbox.options import ExecArgs, SandboxOptions, StreamArgs, check_port, new_facade
from ember.sandbox.signature import takes
from ember.spec import SandboxSpec

P = ParamSpec("P")
T = TypeVar("T")


class _AsyncConnect:
    """``await AsyncSandbox.connect(ID, server=...)``: a daemon's sandbox by id;
    ``await sb.connect(PORT)``: streams to a guest vsock port (see ``Sandbox.connect``)."""

    @overload
    def __get__(
        self, sb: None, owner: type[AsyncSandbox]
    ) -> Callable[..., Awaitable[AsyncSandbox]]: ...
    @overload
    def __get__(
        self, sb: AsyncSandbox, owner: type[AsyncSandbox]
    ) -> Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]: ...
    def __get__(self, sb: AsyncSandbox | None, owner: type[AsyncSandbox]) -> Callable[..., Any]:
        if sb is None:
            return _attach
        return sb._connect_port


async def _attach(sandbox_id: str, *, server: str | None = None) -> AsyncSandbox:
    from ember.sandbox.remote_async import AsyncRemoteSandbox

    return await AsyncRemoteSandbox.attach(sandbox_id, server=server)


class AsyncSandbox:
    """Create with ``async with AsyncSandbox() as sb`` (or ``await AsyncSandbox().start()``).

    ``server=URL`` (default ``$EMBER_SERVER``; ``""``: in-process) makes it in an
    ``ember serve`` daemon instead, as ``Sandbox(server=...)`` does.  The arguments
    are those of :class:`~ember.sandbox.options.SandboxOptions`, as for ``Sandbox``.
    """

    def __new__(cls, *args: Any, server: str | None = None, **kwargs: Any) -> AsyncSandbox:
        remote = "ember.sandbox.remote_async:AsyncRemoteSandbox"
        return new_facade(cls, AsyncSandbox, server, remote)

    @takes(SandboxOptions)
    def __init__(self, options: SandboxOptions) -> None:
        self._setup(options.local_spec(), None, template=options.template, boot=options.boot)

    @classmethod
    def _of_vmm(cls, vmm: VmmProcess, spec: SandboxSpec) -> AsyncSandbox:
        """The (not yet started) sandbox driving a VMM started elsewhere, e.g. a fork."""
        sandbox = object.__new__(cls)
        sandbox._setup(spec, vmm)
        return sandbox

    def _setup(
        self,
        spec: SandboxSpec,
        vmm: VmmProcess | None,
        *,
        template: str | None = None,
        boot: bool = False,
    ) -> None:
        self._spec = spec
        self._vmm = vmm  # None until start() starts it (from template, or booted)
        self._template = template
        self._boot = boot
        self._channels: ChannelServer | None = None
        self._closed = False
        # One mapping of the VMM's region for channels, code rings and file transfers.
        self._region = LazyRegion(lambda: self._require().shm_region())
        self._code_ring = CodeRing(
            self._region,
            alive=lambda: self._vmm is not None and not self._vmm.exited(),
            expect=not boot if vmm is None else vmm.restored,  # None: start() restores it
        )
        self._client = AsyncAgentClient(
            self._connect, resume=self._resume, announce_resume=True, code_ring=self._code_ring,
            shm=self._region, ring_connect=lambda: self._require().connect(),
        )  # fmt: skip
        self.files = AsyncSandboxFiles(self)

    async def _resume(self) -> Streams | None:
        """The agent connection carried over in the snapshot, if any (see VmmProcess.resume)."""
        vmm = self._require()
        sock = await asyncio.to_thread(vmm.resume)
        if sock is None:
            return None
        return await asyncio.open_unix_connection(sock=sock)

    async def start(self) -> AsyncSandbox:
        vmm, warm = self._vmm, None
        if vmm is None:
            started, warm = await asyncio.to_thread(
                spares.vmm_for, self._spec, self._template, self._boot
            )
            vmm = self._vmm = started
        try:
            with descriptors_checked():
                self._channels = ChannelServer(vmm.take_channel_listener(), shm=self._region)
                if warm is not None:
                    self._client.adopt(await asyncio.open_unix_connection(sock=warm.conn))
        except BaseException:
            self._closed = True
            if warm is not None:
                warm.conn.close()
            await asyncio.to_thread(vmm.close)  # nobody will drive it: it must not linger
            raise
        return self

    async def set_memory(self, target_mib: int, *, timeout: float = 120.0) -> int:
        """Move the balloon so the guest keeps ``target_mib``; see ``Sandbox.set_memory``."""
        return await asyncio.to_thread(self._require().set_memory, target_mib, timeout=timeout)

    async def memory_stats(self, *, timeout: float = 30.0) -> dict[str, int]:
        """The guest's memory statistics; see ``Sandbox.memory_stats``."""
        return await asyncio.to_thread(self._require().memory_stats, timeout=timeout)

    async def _connect_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams to ``port`` in the guest (a vsock listener there); see ``Sandbox.connect``."""
        check_port(port)
        sock = await asyncio.to_thread(self._require().connect, port)
        return await asyncio.open_unix_connection(sock=sock)

    connect = _AsyncConnect()

    async def expose(self, port: int) -> tuple[str, int]:
        """Make TCP ``port`` of the guest reachable from the host; see ``Sandbox.expose``."""
        return await asyncio.to_thread(self._require().expose, port)

    def listen(self, port: int, *, backlog: int = 16) -> socket.socket:
        """A listening socket for guest connections to host vsock ``port``; see
        ``Sandbox.listen`` (use it with ``loop.sock_accept``)."""
        return self._require().listen(port, backlog=backlog)

    @property
    def address(self) -> str | None:
        """The sandbox's address as the host sees it; see ``Sandbox.address``."""
        vmm = self._vmm
        return vmm.network.address if vmm is not None and vmm.network is not None else None

    async def fork(self) -> AsyncSandbox:
        """A started sandbox continuing from this one's exact state; see ``Sandbox.fork``."""
        vmm = await asyncio.to_thread(fork_vmm, self._require(), self._spec)
        return await AsyncSandbox._of_vmm(vmm, self._spec).start()

    async def snapshot(self, name: str) -> None:
        """Save this sandbox as it is now as template ``name``; see ``Sandbox.snapshot``."""
        from ember import templates

        await asyncio.to_thread(templates.save_from, self._require(), name)

    def _require(self) -> VmmProcess:
        if self._vmm is None or self._closed:
            raise SandboxError("this sandbox is not running (use `async with AsyncSandbox()`)")
        return self._vmm

    async def _connect(self) -> Streams:
        vmm = self._require()
        reader, writer = await asyncio.open_unix_connection(vmm.uds)
        try:
            writer.write(f"CONNECT {protocol.AGENT_PORT}\n".encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            if not line.startswith(b"OK "):
                raise ConnectionError(f"vsock handshake refused: {line!r}")
        except BaseException:
            writer.close()
            raise
        return reader, writer

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except SandboxTimeout as exc:  # no sign of a crash: see Sandbox._guard
            vmm = self._require()
            if vmm.exited():
                raise vmm.crashed("the sandbox crashed") from exc
            raise
        except AgentError:
            raise  # the agent answered (FileNotFoundError is an OSError too): no crash to look for
        except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            vmm = self._require()
            if isinstance(exc, OSError) and (fds := out_of_descriptors(exc)) is not None:
                raise fds from exc  # this process's limit, not the VM's failure
            crash = await asyncio.to_thread(vmm.crash_after_failure)
            if crash is not None:
                raise crash from exc
            raise

    async def _call(
        self, func: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``await func(*args, **kwargs)``, a dead VM's failure as SandboxCrashed."""
        async with self._guard():
            return await func(*args, **kwargs)

    @property
    def console(self) -> str:
        return self._require().console_tail()

    @property
    def cgroup(self) -> SandboxCgroup | None:
        """The VMM's cgroup, None without quotas or before start(); as Sandbox.cgroup."""
        return self._vmm.cgroup if self._vmm is not None else None

    @property
    def id(self) -> str | None:
        """The daemon's id for this sandbox (None in-process; see Sandbox(server=...))."""
        return None

    @staticmethod
    async def list(
        *, server: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The daemon's sandboxes (those whose metadata include ``metadata``), as JSON objects."""
        from ember.sandbox.remote import list_sandboxes

        return await asyncio.to_thread(list_sandboxes, server=server, metadata=metadata)

    async def kill(self) -> None:
        """Destroy the sandbox now (in-process: the same as :meth:`close`)."""
        await self.close()

    async def set_timeout(self, seconds: float) -> None:
        """A lifetime is for sandboxes of a daemon (the SDK's ``Sandbox(server=...)``)."""
        raise ConfigError("set_timeout needs a sandbox of a daemon: use Sandbox(server=...)")

    async def _prefault_exec(self) -> None:
        """An exec's first step (``VmmHandle.prefault_exec``), off the event loop."""
        vmm = self._require()
        if not vmm.exec_prefaulted:
            await asyncio.to_thread(vmm.prefault_exec)

    async def ping(self) -> dict[str, Any]:
        return await self._call(self._client.ping)

    @takes(ExecArgs)
    async def exec(self, a: ExecArgs) -> ExecResult:
        """Run ``cmd`` and wait for it; see ``Sandbox.exec``."""
        await self._prefault_exec()
        return await self._call(self._client.exec, a.cmd, timeout=a.timeout, env=a.env,
                                cwd=a.cwd, stdin=a.stdin, max_output=a.max_output,
                                files=a.files)  # fmt: skip

    @takes(StreamArgs)
    async def exec_stream(self, a: StreamArgs) -> AsyncIterator[OutputChunk]:
        """Stdout/stderr chunks as they are produced; see ``Sandbox.exec_stream``."""
        await self._prefault_exec()
        stream = self._client.exec_stream(a.cmd, timeout=a.timeout, env=a.env, cwd=a.cwd,
                                          stdin=a.stdin, files=a.files)  # fmt: skip
        async with self._guard(), stream:
            async for chunk in stream:
                yield chunk

    async def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        result = await self._call(
            self._client.run_code, code, timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )
        return explain_crashed_worker(result, self._require().console_tail(200))

    async def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncTerminal:
        """A program on a guest terminal; see ``Sandbox.pty``."""
        return await self._call(
            self._client.pty, argv, rows=rows, cols=cols, env=env, cwd=cwd, timeout=timeout
        )

    async def channel(self, name: str, *, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Frames from guest code's ``channel(name)``; the blocking reads run in a thread."""
        self._require()
        assert self._channels is not None
        frames: Iterator[bytes] = await asyncio.to_thread(
            self._channels.channel, name, timeout=timeout
        )
        done = object()
        while True:
            frame = await asyncio.to_thread(next, frames, done)
            if frame is done:
                return
            assert isinstance(frame, bytes)
            yield frame

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()
        if self._channels is not None:
            self._channels.close()
        self._code_ring.close()
        self._region.close()
        if self._vmm is not None:
            await asyncio.to_thread(self._vmm.close)

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
