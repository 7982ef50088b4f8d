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
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from ember.client import (
    ChannelServer,
    CodeResult,
    ExecResult,
    ExecStream,
    OutputChunk,
    explain_crashed_worker,
)
from ember.client.attach import attach
from ember.client.terminal import Terminal
from ember.closing import Closing
from ember.descriptors import descriptors_checked, out_of_descriptors
from ember.errors import (
    AgentError,
    ConfigError,
    ProtocolError,
    SandboxCrashed,
    SandboxError,
    SandboxTimeout,
)
from ember.jailer.cgroups import SandboxCgroup
from ember.launcher import VmmProcess, fork_vmm
from ember.sandbox import spares
from ember.sandbox.files import SandboxFiles
from ember.sandbox.options import ExecArgs, SandboxOptions, StreamArgs, check_port, new_facade
from ember.sandbox.signature import takes
from ember.spec import SandboxSpec

P = ParamSpec("P")
T = TypeVar("T")


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
    from ember.sandbox.remote import RemoteSandbox

    return RemoteSandbox.attach(sandbox_id, server=server)


class Sandbox(Closing):
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
    its client (:class:`ember.sandbox.remote.RemoteSandbox`), with the same methods
    plus ``id``, ``metadata`` and ``timeout`` (seconds until the daemon kills it).

    The arguments are those of :class:`~ember.sandbox.options.SandboxOptions`.
    """

    def __new__(cls, *args: Any, server: str | None = None, **kwargs: Any) -> Sandbox:
        return new_facade(cls, Sandbox, server, "ember.sandbox.remote:RemoteSandbox")

    @takes(SandboxOptions)
    def __init__(self, options: SandboxOptions) -> None:
        spec = options.local_spec()
        vmm, warm = spares.vmm_for(spec, options.template, options.boot)
        try:
            with descriptors_checked():
                self._setup(vmm, spec, warm)
        except BaseException:
            if warm is not None:
                warm.conn.close()
            vmm.close()  # a VMM nobody drives must not outlive the failed constructor
            raise

    @classmethod
    def _of_vmm(cls, vmm: VmmProcess, spec: SandboxSpec) -> Sandbox:
        """The sandbox driving a VMM started elsewhere (a fork, a daemon's resume)."""
        sandbox = object.__new__(cls)
        sandbox._setup(vmm, spec)
        return sandbox

    def _setup(
        self,
        vmm: VmmProcess,
        spec: SandboxSpec,
        warm: spares.Warm | None = None,
        *,
        new_vm: bool = True,
    ) -> None:
        self._vmm = vmm
        self._spec = spec
        self._closed = False
        # One mapping of the VMM's region for channels, code rings and file transfers.
        self._attached = attach(vmm, self._connect, new_vm=new_vm)
        self._region = self._attached.region
        self._code_ring = self._attached.code_ring
        self._client = self._attached.client
        self._channels = ChannelServer(self._vmm.take_channel_listener(), shm=self._region)
        self.files = SandboxFiles(self)
        if warm is not None:
            self._client.adopt(warm.conn)

    # --- plumbing
    def _live(self) -> VmmProcess:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        return self._vmm

    def _connect(self) -> socket.socket:
        return self._live().connect()

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
        except AgentError:
            raise  # the agent answered (FileNotFoundError is an OSError too): no crash to look for
        except (OSError, ProtocolError) as exc:
            if self._closed:
                raise SandboxError("this sandbox is closed") from exc
            if isinstance(exc, OSError) and (fds := out_of_descriptors(exc)) is not None:
                raise fds from exc  # this process's limit, not the VM's failure
            crash = self._vmm.crash_after_failure()
            if crash is not None:
                raise crash from exc
            raise

    def _call(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` (an agent call), a dead VM's failure as SandboxCrashed."""
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
        from ember.sandbox.remote import list_sandboxes

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
        return self._call(self._client.ping)

    @takes(ExecArgs)
    def exec(self, a: ExecArgs) -> ExecResult:
        """Run ``cmd`` (argv list, or a shell string) and wait for it; see AgentClient.exec.

        More than ``max_output`` bytes of output (stdout and stderr together) stops the
        command and raises OutputTooLarge: use :meth:`exec_stream` for big outputs."""
        self._live().prefault_exec()
        return self._call(self._client.exec, a.cmd, timeout=a.timeout, env=a.env, cwd=a.cwd,
                          stdin=a.stdin, max_output=a.max_output, files=a.files)  # fmt: skip

    @takes(StreamArgs)
    def exec_stream(self, a: StreamArgs) -> Iterator[OutputChunk]:
        """Yield stdout/stderr chunks as they are produced; the generator's return is the result."""
        self._live().prefault_exec()
        stream = self._call(self._client.exec_stream, a.cmd, timeout=a.timeout, env=a.env,
                            cwd=a.cwd, stdin=a.stdin, files=a.files)  # fmt: skip
        return self._guarded_stream(stream)

    def _guarded_stream(self, stream: ExecStream) -> Iterator[OutputChunk]:
        with stream:
            while True:
                with self._guard():
                    chunk = next(stream, None)
                if chunk is None:
                    return stream.result  # type: ignore[return-value]
                yield chunk

    def run_code(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
    ) -> CodeResult:
        """Run Python source in the sandbox's persistent interpreter (state kept between calls).

        ``on_stdout``/``on_stderr`` are called with the cell's output as it is written."""
        result = self._call(
            self._client.run_code, code, timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )
        return explain_crashed_worker(result, self._vmm.console_tail(200))

    def pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Terminal:
        """``argv`` (default: a login shell) on a real terminal in the guest; see
        ``AgentClient.pty``. ``ember shell`` is this, wired to your own terminal."""
        return self._call(
            self._client.pty, argv, rows=rows, cols=cols, env=env, cwd=cwd, timeout=timeout
        )

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
        check_port(port)
        vmm = self._live()
        try:
            return vmm.connect(port)
        except OSError as exc:
            if vmm.exited():
                raise vmm.crashed("the sandbox crashed") from exc
            raise

    connect = _Connect()

    def expose(self, port: int) -> tuple[str, int]:
        """Make TCP ``port`` of the guest reachable from the host: the (address, port) to
        connect to.  Needs ``network=``; the egress policy does not apply to these replies."""
        return self._live().expose(port)

    def listen(self, port: int, *, backlog: int = 16) -> socket.socket:
        """A listening socket for connections the guest opens to the host's vsock ``port``
        (``socket(AF_VSOCK).connect((2, port))`` in the guest). Only this sandbox's VMM can
        reach it (even jailed, as its own uid); ``accept`` on it, close it when done."""
        return self._live().listen(port, backlog=backlog)

    @property
    def address(self) -> str | None:
        """The sandbox's address as the host and other sandboxes see it (None: no network)."""
        return self._vmm.network.address if self._vmm.network is not None else None

    def fork(self) -> Sandbox:
        """A new sandbox that continues from this one's exact state (memory, processes, files).

        Its RAM is copy-on-write from a snapshot taken now; connections open
        in this sandbox are not carried over.  The two then diverge.
        """
        return Sandbox._of_vmm(fork_vmm(self._live(), self._spec), self._spec)

    def snapshot(self, name: str) -> None:
        """Save this sandbox as it is now as template ``name``: ``Sandbox(template=name)``."""
        from ember import templates

        templates.save_from(self._live(), name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._channels.close()
        self._attached.close()
        self._vmm.close()


__all__ = ["Sandbox", "SandboxCrashed", "SandboxFiles"]
