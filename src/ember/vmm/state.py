"""Life-cycle states and stop reasons of a VM."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    """Why a VM stopped; ``clean`` ones are the guest's own request."""

    REBOOT = "reboot"
    POWER_OFF = "power-off"
    TRIPLE_FAULT = "triple fault"
    PANIC = "kernel panic"
    INTERNAL_ERROR = "KVM internal error"
    FAIL_ENTRY = "KVM entry failure"
    VMM_ERROR = "VMM error"
    HOST_REQUEST = "stopped by the host"
    TIMEOUT = "timed out"

    @property
    def clean(self) -> bool:
        return self in (StopKind.REBOOT, StopKind.POWER_OFF, StopKind.HOST_REQUEST)


@dataclass(frozen=True)
class StopReason:
    kind: StopKind
    detail: str = ""
    vcpu: int | None = None
    exit_status: int | None = None  # the guest workload's, when ember-init reported one

    def describe(self) -> str:
        where = f" on vCPU {self.vcpu}" if self.vcpu is not None else ""
        return f"{self.kind.value}{where}" + (f": {self.detail}" if self.detail else "")
