"""What one sandbox is made of, before any process exists: :class:`SandboxSpec`.

The SDK, the templates, the daemon and the CLI all describe a sandbox this way (guest RAM,
vCPUs, images, quotas, network, the agent's interpreters) and check it here, once, so a
bad value is a :class:`~ember.errors.ConfigError` before anything is started. A spec also
names the guest agent's command line (:func:`agent_argv`), which is part of a template's
key. Starting a VMM from it is :mod:`ember.launcher`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ConfigError, require_whole_number
from ember.jailer.cgroups import Quotas
from ember.network.policy import NetworkPolicy
from ember.vmm.config import MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB

__all__ = [
    "AGENT_ARGV",
    "DEFAULT_MEM_MIB",
    "MAX_POOL",
    "VMM_OVERHEAD_MIB",
    "SandboxSpec",
    "agent_argv",
    "quotas_from",
    "resolve_images",
    "resolve_preload",
]

DEFAULT_MEM_MIB = 512
AGENT_ARGV = ("python3", "-m", "ember.agent")
# The VMM's own memory on top of the guest RAM it maps: the interpreter and its modules
# (~25 MiB) plus what a guest can make it hold, vsock's buffers included (at most
# devices/virtio/vsock/budget.py TX_BUDGET = 16 MiB per VMM).
VMM_OVERHEAD_MIB = 64
# Pre-started interpreters a template may ask for: each costs the template build ~65 s of
# emulated start-up here and the guest its heap, so a handful is already a lot.
MAX_POOL = 8


@dataclass(frozen=True)
class SandboxSpec:
    kernel: Path | None = None
    rootfs: Path | None = None
    mem_mib: int = DEFAULT_MEM_MIB
    vcpus: int = 1
    cpu_template: str = "auto"
    boot_timeout: float = 600.0
    quotas: Quotas | None = None
    # None: jail the VMM when we are root (the jail needs it), else run it unjailed.
    jail: bool | None = None
    # None: no network device at all; else a TAP in a namespace of its own, with this policy.
    network: NetworkPolicy | None = None
    # Modules the booted agent's interpreters import before anything runs (ember.agent.preload);
    # None: the image's own (numpy for the default image, nothing for another rootfs).
    preload: tuple[str, ...] | None = None
    # The template's pre-started interpreters for exec and each warm interpreter's pre-faulted
    # heap (ember.agent.pool, ember.agent.heap); None: the agent's defaults (2, 64 MiB).
    pool: int | None = None
    heap_mib: int | None = None

    @property
    def jailed(self) -> bool:
        return self.jail if self.jail is not None else os.geteuid() == 0

    def __post_init__(self) -> None:
        # The VMM checks these too, but only once it runs: for a size with no template yet,
        # after the SDK had started building one (a boot that fails minutes in).
        require_whole_number("mem_mib", self.mem_mib)
        require_whole_number("vcpus", self.vcpus)
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus={self.vcpus}: from 1 to {MAX_VCPUS}")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(f"mem_mib={self.mem_mib}: from {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB")
        if self.pool is not None and not 0 <= self.pool <= MAX_POOL:
            raise ConfigError(
                f"pool={self.pool}: from 0 (no pre-started interpreters) to {MAX_POOL}"
            )
        if self.heap_mib is not None and not 0 <= self.heap_mib <= self.mem_mib:
            raise ConfigError(
                f"heap_mib={self.heap_mib}: from 0 (no pre-faulted heap) to the guest's RAM, "
                f"{self.mem_mib} MiB (the agent shrinks it to what the guest can spare)"
            )
        # The memory quota covers the whole VMM process, guest RAM included:
        # below this the VMM would be OOM-killed as soon as the guest used its RAM.
        limit = self.quotas.memory_mib if self.quotas is not None else None
        if limit is not None and limit < self.mem_mib + VMM_OVERHEAD_MIB:
            raise ConfigError(
                f"a memory limit of {limit} MiB is too small for {self.mem_mib} MiB of guest RAM: "
                f"it caps the whole VMM, so give at least guest RAM + {VMM_OVERHEAD_MIB} MiB "
                f"= {self.mem_mib + VMM_OVERHEAD_MIB} MiB"
            )


def quotas_from(cpus: float | None, memory_mib: int | None, pids: int | None) -> Quotas | None:
    """The SDK's ``cpus=``/``memory_mib=``/``pids=`` as Quotas; None (no cgroup) when all unset."""
    if cpus is None and memory_mib is None and pids is None:
        return None
    return Quotas(cpus=cpus, memory_mib=memory_mib, pids=pids)


def resolve_images(spec: SandboxSpec) -> tuple[Path, Path, Path]:
    from ember.images import artifact_path

    kernel = spec.kernel or artifact_path("kernel")
    rootfs = spec.rootfs or artifact_path("rootfs")
    return kernel, rootfs, artifact_path("initrd")


def resolve_preload(spec: SandboxSpec) -> tuple[str, ...]:
    """The modules a booted sandbox preloads: ``spec.preload``, else its image's default."""
    if spec.preload is not None:
        return spec.preload
    from ember.images.packages import DEFAULT_PRELOAD

    return DEFAULT_PRELOAD if spec.rootfs is None else ()


def agent_argv(spec: SandboxSpec) -> tuple[str, ...]:
    """The guest agent's command line for a boot of ``spec`` (part of a template's key: an
    option left at the agent's default is not given, so it does not change the key)."""
    preload = resolve_preload(spec)
    argv = [*AGENT_ARGV, "--preload", ",".join(preload)] if preload else [*AGENT_ARGV]
    if spec.pool is not None:
        argv += ["--pool", str(spec.pool)]
    if spec.heap_mib is not None:
        argv += ["--heap-mib", str(spec.heap_mib)]
    return tuple(argv)
