"""``Sandbox``: a microVM that runs untrusted code, as a context manager.

::

    with Sandbox() as sb:
        r = sb.exec(["python3", "-c", "print(6*7)"], timeout=10)
        assert r.stdout == b"42\\n" and r.exit_code == 0

Every call opens its own connection to the guest agent, so a Sandbox may be
used from several threads at once.  When the guest or its VMM dies, pending
and later calls raise :class:`~ember.errors.SandboxCrashed` with the console
tail; nothing else in the host process is affected.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, overload

from ember.client import (
    DEFAULT_MAX_OUTPUT,
    AgentClient,
    ChannelServer,
    CodeResult,
    Command,
    DirEntry,
    ExecResult,
    ExecStream,
    FileStat,
    OutputChunk,
    PathArg,
    Source,
    explain_crashed_worker,
)
from ember.errors import ConfigError, ProtocolError, SandboxCrashed, SandboxError, SandboxTimeout
from ember.jailer.cgroups import SandboxCgroup
from ember.launcher import (
    DEFAULT_MEM_MIB,
    SandboxSpec,
    VmmProcess,
    fork_vmm,
    quotas_from,
    start_vmm,
)
from ember.network.policy import NetworkPolicy


class _Connect:
    """``Sandbox.connect(ID, server=...)`` re-attaches to a daemon's sandbox by id (the
    E2B name); ``sb.connect(PORT)`` opens a stream to a guest vsock port.  One name,
    two meanings told apart by whether it is looked up on the class or an instance."""

    @overload
    def __get__(self, sb: None, owner: type[Sandbox]) -> Callable[..., Sandbox]: ...
    @overload
    def __get__(self, sb: Sandbox, owner: type[Sandbox]) -> Callable[[int], socket.socket]: ...
    def __get__(self, sb: Sandbox | None, owner: type[Sandbox]) -> Callable[..., Any]:
        if sb is None:
            return _attach
        return sb._connect_port


def _attach(sandbox_id: str, *, server: str | None = None) -> Sandbox:
    """The sandbox ``sandbox_id`` of a daemon (``server``, default ``$EMBER_SERVER``)."""
    from ember.remote import RemoteSandbox

    return RemoteSandbox.attach(sandbox_id, server=server)


class Sandbox:
    """One sandbox VM, made on construction and destroyed by :meth:`close`.

    By default it is restored from the default template (a snapshot of the
    booted, warmed image, built once and cached): ready in milliseconds.
    ``template=NAME`` restores a named template (``sb.snapshot(NAME)``,
    ``ember template build NAME``); ``boot=True`` boots the image instead.
    With a template, ``mem_mib`` and ``vcpus`` select (or build) the default
    template of that shape; a named template keeps its own.

    ``jail`` (default: when running as root) confines the VMM process: its
    own namespaces, a chroot, an unprivileged uid and seccomp filters.

    ``cpus`` (e.g. 0.5), ``memory_mib`` (the whole VMM's RAM, so at least
    ``mem_mib`` + 64) and ``pids`` put the VMM in its own cgroup with those
    limits, so one sandbox cannot starve the host or its neighbours.

    ``network`` is off by default.  ``network=True`` lets the guest reach the
    public internet (never the host, its LAN or other sandboxes);
    ``network=NetworkPolicy(["10.0.0.5:443", "192.168.1.0/24"])`` lets it reach
    exactly those; either way :meth:`expose` forwards a port from the host.

    ``server="http://127.0.0.1:7777"`` (default: ``$EMBER_SERVER``; ``""`` forces
    in-process) makes the sandbox in an ``ember serve`` daemon instead and returns
    its client (:class:`ember.remote.RemoteSandbox`), with the same methods plus
    ``id``, ``metadata`` and ``timeout`` (seconds until the daemon kills it).
    """

    def __new__(cls, *args: Any, server: str | None = None, **kwargs: Any) -> Sandbox:
        url = os.environ.get("EMBER_SERVER", "") if server is None else server
        if cls is Sandbox and url:
            from ember.remote import RemoteSandbox

            return object.__new__(RemoteSandbox)
        return object.__new__(cls)

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
        if timeout is not None:
            raise ConfigError("timeout= (a lifetime) is for sandboxes of a daemon: pass server=")
        spec = SandboxSpec(
            kernel, rootfs, mem_mib, vcpus, cpu_template, boot_timeout,
            quotas=quotas_from(cpus, memory_mib, pids), jail=jail,
            network=NetworkPolicy.coerce(network),
        )  # fmt: skip
        self._setup(start_vmm(spec, template=template, boot=boot), spec)

    def _setup(self, vmm: VmmProcess, spec: SandboxSpec) -> None:
        self._vmm = vmm
        self._spec = spec
        self._closed = False
        self._client = AgentClient(self._connect, resume=self._vmm.resume, announce_resume=True)
        self._channels = ChannelServer(self._vmm.take_channel_listener(), shm=self._vmm.shm_region)
        self.files = SandboxFiles(self)

    # --- plumbing
    def _connect(self) -> socket.socket:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        return self._vmm.connect()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn a broken connection into SandboxCrashed when the VM is in fact gone."""
        try:
            yield
        except SandboxTimeout as exc:
            # Also an OSError, but no sign of a crash: a dead VMM shows up as a broken
            # connection, not silence. Say so at once rather than wait for one to exit.
            if self._closed:
                raise SandboxError("this sandbox is closed") from exc
            if self._vmm.exited():
                raise self._vmm.crashed("the sandbox crashed") from exc
            raise
        except (OSError, ProtocolError) as exc:
            if self._closed:
                raise SandboxError("this sandbox is closed") from exc
            crash = self._vmm.crash_after_failure()
            if crash is not None:
                raise crash from exc
            raise

    def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return func(*args, **kwargs)

    # --- public API
    @property
    def id(self) -> str | None:
        """The daemon's id for this sandbox (None in-process: it has no name outside it)."""
        return None

    @staticmethod
    def list(
        *, server: str | None = None, metadata: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The daemon's sandboxes (those whose metadata include ``metadata``), as JSON objects."""
        from ember.remote import list_sandboxes

        return list_sandboxes(server=server, metadata=metadata)

    def kill(self) -> None:
        """Destroy the sandbox now (in-process: the same as :meth:`close`)."""
        self.close()

    def set_timeout(self, seconds: float) -> None:
        """Have the daemon kill this sandbox ``seconds`` from now (needs ``server=``)."""
        raise ConfigError("set_timeout needs a sandbox of a daemon: pass server=")

    @property
    def console(self) -> str:
        """The tail of the guest console (kernel messages, the VMM's stop reason)."""
        return self._vmm.console_tail()

    @property
    def cgroup(self) -> SandboxCgroup | None:
        """The VMM's cgroup (usage: ``cpu_usage_seconds()``...), None without quotas."""
        return self._vmm.cgroup

    def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self._client.ping)
        return result

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
        """Run ``cmd`` (argv list, or a shell string) and wait for it; see AgentClient.exec.

        More than ``max_output`` bytes of output (stdout and stderr together) stops the
        command and raises OutputTooLarge: use :meth:`exec_stream` for big outputs."""
        result: ExecResult = self._call(
            self._client.exec,
            cmd,
            timeout=timeout,
            env=env,
            cwd=cwd,
            stdin=stdin,
            max_output=max_output,
        )
        return result

    def exec_stream(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: Source | None = None,
    ) -> Iterator[OutputChunk]:
        """Yield stdout/stderr chunks as they are produced; the generator's return is the result."""
        stream: ExecStream = self._call(
            self._client.exec_stream, cmd, timeout=timeout, env=env, cwd=cwd, stdin=stdin
        )
        return self._guarded_stream(stream)

    def _guarded_stream(self, stream: ExecStream) -> Iterator[OutputChunk]:
        with stream:
            while True:
                with self._guard():
                    chunk = next(stream, None)
                if chunk is None:
                    return stream.result  # type: ignore[return-value]
                yield chunk

    def run_code(self, code: str, *, timeout: float | None = None) -> CodeResult:
        """Run Python source in the sandbox's persistent interpreter (state kept between calls)."""
        result: CodeResult = self._call(self._client.run_code, code, timeout)
        return explain_crashed_worker(result, self._vmm.console_tail(200))

    def channel(self, name: str, *, timeout: float | None = None) -> Iterator[bytes]:
        """Frames guest code sends with ``ember.agent.channel(name)``, in order."""
        return self._channels.channel(name, timeout=timeout)

    def set_memory(self, target_mib: int, *, timeout: float = 120.0) -> int:
        """Shrink (or grow back) the guest's usable RAM to ``target_mib`` with the balloon.

        The guest gives the difference back to the host; returns the MiB the
        guest holds once the balloon has settled (or when ``timeout`` runs out).
        """
        return self._vmm.set_memory(target_mib, timeout=timeout)

    def memory_stats(self, *, timeout: float = 30.0) -> dict[str, int]:
        """The guest's memory statistics (bytes and counts, virtio-balloon §5.5.6.3 names) plus
        the balloon's own: ``balloon_mib``, ``reported_mib`` (freed by free page reporting)."""
        return self._vmm.memory_stats(timeout=timeout)

    def _connect_port(self, port: int) -> socket.socket:
        """A stream socket to ``port`` in the guest (a vsock listener there), e.g. a server
        the sandboxed code runs; raises ConnectionError when nothing listens on it."""
        if not 0 < port < 0xFFFFFFFF:
            raise ValueError(f"vsock port {port} is out of range")
        if self._closed:
            raise SandboxError("this sandbox is closed")
        try:
            return self._vmm.connect(port)
        except OSError as exc:
            if self._vmm.exited():
                raise self._vmm.crashed("the sandbox crashed") from exc
            raise

    connect = _Connect()

    def expose(self, port: int) -> tuple[str, int]:
        """Make TCP ``port`` of the guest reachable from the host: the (address, port) to
        connect to.  Needs ``network=``; the egress policy does not apply to these replies."""
        if self._closed:
            raise SandboxError("this sandbox is closed")
        return self._vmm.expose(port)

    def listen(self, port: int, *, backlog: int = 16) -> socket.socket:
        """A listening socket for connections the guest opens to the host's vsock ``port``
        (``socket(AF_VSOCK).connect((2, port))`` in the guest). Only this sandbox's VMM can
        reach it (even jailed, as its own uid); ``accept`` on it, close it when done."""
        if self._closed:
            raise SandboxError("this sandbox is closed")
        return self._vmm.listen(port, backlog=backlog)

    @property
    def address(self) -> str | None:
        """The sandbox's address as the host and other sandboxes see it (None: no network)."""
        return self._vmm.network.address if self._vmm.network is not None else None

    def fork(self) -> Sandbox:
        """A new sandbox that continues from this one's exact state (memory, processes, files).

        Its RAM is copy-on-write from a snapshot taken now; connections open
        in this sandbox are not carried over.  The two then diverge.
        """
        if self._closed:
            raise SandboxError("this sandbox is closed")
        child = object.__new__(Sandbox)
        child._setup(fork_vmm(self._vmm, self._spec), self._spec)
        return child

    def snapshot(self, name: str) -> None:
        """Save this sandbox as it is now as template ``name``: ``Sandbox(template=name)``."""
        from ember import templates

        if self._closed:
            raise SandboxError("this sandbox is closed")
        templates.save_from(self._vmm, name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        self._channels.close()
        self._vmm.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SandboxFiles:
    """``sb.files``: the guest's file system, streamed in bounded pieces."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._files = sandbox._client.files

    def write(self, path: PathArg, data: bytes | BinaryIO, *, mode: int | None = None) -> int:
        result: int = self._sb._call(self._files.write, path, data, mode=mode)
        return result

    def read(self, path: PathArg, *, max_output: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The whole file; beyond ``max_output`` bytes OutputTooLarge (then use read_into)."""
        result: bytes = self._sb._call(self._files.read, path, max_output=max_output)
        return result

    def read_into(self, path: PathArg, fileobj: BinaryIO) -> int:
        result: int = self._sb._call(self._files.read_into, path, fileobj)
        return result

    def stat(self, path: PathArg) -> FileStat:
        result: FileStat = self._sb._call(self._files.stat, path)
        return result

    def list(self, path: PathArg) -> list[DirEntry]:
        result: list[DirEntry] = self._sb._call(self._files.list, path)
        return result

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        self._sb._call(self._files.remove, path, recursive=recursive)


__all__ = ["Sandbox", "SandboxCrashed", "SandboxFiles"]
