"""The arguments the sandbox facades share, each set written (and checked) once.

:class:`SandboxOptions` is what ``Sandbox(...)``, ``AsyncSandbox(...)`` and their
daemon clients take; it becomes a :class:`~ember.spec.SandboxSpec` in-process
(:meth:`SandboxOptions.local_spec`) or the body of ``POST /sandboxes`` for a daemon
(:meth:`SandboxOptions.daemon_body`).  :class:`StreamArgs` and :class:`ExecArgs` are
a command's ``cmd, *, timeout, env, cwd, stdin`` (and ``max_output``).  The facades
take them through :func:`ember.sandbox.signature.takes`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ember.client import DEFAULT_MAX_OUTPUT, Command, Source
from ember.errors import ConfigError
from ember.network.policy import NetworkPolicy
from ember.spec import DEFAULT_MEM_MIB, SandboxSpec, quotas_from


def server_url(server: str | None) -> str:
    """The daemon a sandbox is made in: ``server``, else ``$EMBER_SERVER``; "" is in-process."""
    return os.environ.get("EMBER_SERVER", "") if server is None else server


F = TypeVar("F")


def new_facade(cls: type[F], local: type[F], server: str | None, remote: str) -> F:
    """``local.__new__``: a daemon's client (``remote``, "module:Class") when ``server``
    (else ``$EMBER_SERVER``) names a daemon and ``local`` itself was called."""
    if cls is local and server_url(server):
        module, _, name = remote.partition(":")
        cls = getattr(importlib.import_module(module), name)
    return object.__new__(cls)


@dataclass(frozen=True, kw_only=True)
class SandboxOptions:
    """One sandbox's shape and where it runs (see :class:`ember.sandbox.Sandbox`)."""

    mem_mib: int = DEFAULT_MEM_MIB
    vcpus: int = 1
    kernel: Path | None = None
    rootfs: Path | None = None
    cpu_template: str = "auto"
    boot_timeout: float = 600.0
    cpus: float | None = None
    memory_mib: int | None = None
    pids: int | None = None
    template: str | None = None
    boot: bool = False
    jail: bool | None = None
    network: bool | NetworkPolicy | None = None
    server: str | None = None
    metadata: dict[str, str] | None = None
    timeout: float | None = None
    idle_timeout: float | None = None
    on_timeout: Literal["kill", "pause"] = "kill"

    def local_spec(self) -> SandboxSpec:
        """The VMM to start in this process (``template``/``boot`` pick how, not what)."""
        if self.timeout is not None or self.idle_timeout is not None:
            raise ConfigError(
                "timeout= and idle_timeout= (lifetimes) are for sandboxes of a daemon: pass server="
            )
        return SandboxSpec(
            self.kernel, self.rootfs, self.mem_mib, self.vcpus, self.cpu_template,
            self.boot_timeout, quotas=quotas_from(self.cpus, self.memory_mib, self.pids),
            jail=self.jail, network=NetworkPolicy.coerce(self.network),
        )  # fmt: skip

    def daemon_body(self) -> dict[str, Any]:
        """The JSON body of ``POST /sandboxes``: what a daemon lets a client choose."""
        if self.kernel is not None or self.rootfs is not None or self.boot or self.jail is False:
            raise ConfigError(
                "kernel=, rootfs=, boot= and jail=False are not available through a daemon: "
                'use them in-process (server="")'
            )
        policy = NetworkPolicy.coerce(self.network)
        if policy is not None and policy.dns_upstream is not None:
            raise ConfigError("dns_upstream= is the daemon's host's business, not a client's")
        body: dict[str, Any] = {"mem_mib": self.mem_mib, "vcpus": self.vcpus,
                                "metadata": self.metadata or {}}  # fmt: skip
        for key, value in (("cpus", self.cpus), ("memory_mib", self.memory_mib),
                           ("pids", self.pids), ("template", self.template),
                           ("timeout", self.timeout),
                           ("idle_timeout", self.idle_timeout)):  # fmt: skip
            if value is not None:
                body[key] = value
        if self.on_timeout != "kill":
            body["on_timeout"] = self.on_timeout
        if policy is not None:
            body["network"] = policy.to_json()
        return body


@dataclass(frozen=True)
class StreamArgs:
    """A command: ``cmd`` (argv list, or a shell string), and how to run it.

    ``files`` (guest path -> bytes, at most 512 KiB in all) are written before the command
    starts, in the same request: a script and its inputs cost one round trip, not one more
    per file. Each is written as ``files.write`` would (atomically, parents created).
    """

    cmd: Command
    _: KW_ONLY
    timeout: float | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: Source | None = None
    files: Mapping[str, bytes] | None = None


@dataclass(frozen=True)
class ExecArgs(StreamArgs):
    """A command run to completion: at most ``max_output`` bytes of output are kept."""

    _: KW_ONLY
    max_output: int | None = DEFAULT_MAX_OUTPUT


def check_port(port: int) -> int:
    """A guest vsock port (``connect``); the same check in-process and async."""
    if not 0 < port < 0xFFFFFFFF:
        raise ValueError(f"vsock port {port} is out of range")
    return port
