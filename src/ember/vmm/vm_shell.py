"""The part of a VM that depends on its memory alone, made before the request that runs it.

A restore makes a KVM VM, puts the guest's memory into its slots, adds the shared region,
the interrupt controllers and the vCPUs with their saved state, then the devices, whose
host sides (the sandbox's vsock socket, its tap) only the request names. Everything before
the devices depends on the snapshot alone, so the child the zygote forks ahead of the next
request (:mod:`ember.zygote_fork`) makes it while it waits, for the template it expects
(:func:`prepare_ahead`, with :mod:`ember.snapshot.premade`): ~4-5 ms of a restore here.

Only the VM-wide state that moves with time stays in the request's path
(:func:`ember.snapshot.kvm_state.restore_vm`: the kvmclock is set when the guest is about to
run, and the clock pair published after it). A vCPU's TSC, put back ahead, runs on while
the child waits: the guest then sees a longer gap since its snapshot, which it counts as
sleep whatever its length (templates are hours old), and the clock pair the VMM publishes
before the guest runs is read from the vCPU at that moment.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.arch.x86_64 import layout
from ember.errors import KvmError
from ember.kvm import abi
from ember.kvm.system import Kvm, Vcpu, Vm
from ember.memory import GuestMemory, c_address
from ember.snapshot import premade
from ember.snapshot.kvm_state import needs_pit, restore_vcpu
from ember.vmm.shm import SharedRegion

REQUIRED_CAPS = {
    abi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    abi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    abi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    abi.KVM_CAP_PIT2: "KVM_CAP_PIT2",
    abi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    abi.KVM_CAP_IOEVENTFD: "KVM_CAP_IOEVENTFD",
    abi.KVM_CAP_IRQFD: "KVM_CAP_IRQFD",
}


@dataclass
class VmShell:
    """A KVM VM with the guest's memory in its slots, the shared region, the interrupt
    controllers and, made ahead of a restore, its vCPUs with their saved state."""

    kvm: Kvm
    vm: Vm
    shm: SharedRegion | None
    pit: bool
    vcpus: list[Vcpu] = field(default_factory=list)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        if self.shm is not None:
            self.shm.close()  # after the VM's fd (see SharedRegion.close)
        self.kvm.close()


def make_shell(memory: GuestMemory, *, shm: bool, pit: bool) -> VmShell:
    """A :class:`VmShell` (no vCPUs) on ``memory``; with the shared region if ``shm``
    (memory channels need vsock for their control), with a PIT if ``pit``."""
    with ExitStack() as undo:
        kvm = Kvm()
        undo.callback(kvm.close)
        for cap, name in REQUIRED_CAPS.items():
            if not kvm.check_extension(cap):
                raise KvmError(f"this KVM lacks {name}, which Ember needs")
        vm = kvm.create_vm()
        undo.callback(vm.close)
        # Memory first, as Firecracker does: under kvm_pvm a memory slot added once the
        # in-kernel irqchip exists costs ~7 ms (before it, ~0.3 ms: bench/timeline.py);
        # hardware KVM does not mind the order.
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.guest_addr, region.size, c_address(region.mem))
        shared = None
        if shm:
            shared = SharedRegion(vm, memory, len(memory.regions))
            undo.callback(shared.close)
        vm.set_tss_addr(layout.KVM_TSS_ADDRESS)
        vm.create_irqchip()
        if pit:
            vm.create_pit2()
        undo.pop_all()
    return VmShell(kvm, vm, shared, pit)


def restore_vcpus(vm: Vm, states: list[dict[str, Any]]) -> list[Vcpu]:
    """One vCPU per saved state, each put back (``SnapshotError`` if one cannot be)."""
    vcpus: list[Vcpu] = []
    try:
        for index, state in enumerate(states):
            vcpus.append(vm.create_vcpu(index))
            restore_vcpu(vcpus[-1], state)
    except BaseException:
        for vcpu in vcpus:
            vcpu.close()
        raise
    return vcpus


def _ahead(state: dict[str, Any], memory: GuestMemory) -> VmShell:
    # With the shared region: templates are restored for the SDK, whose sandboxes all have
    # vsock (a request without it makes a shell of its own).
    shell = make_shell(memory, shm=True, pit=needs_pit(state.get("vm")))
    try:
        shell.vcpus = restore_vcpus(shell.vm, state["vcpus"])
    except BaseException:
        shell.close()
        raise
    return shell


def prepare_ahead(directory: Path) -> bool:
    """In the child forked ahead: ``directory``'s state and memory
    (:func:`ember.snapshot.premade.prepare`) and the :class:`VmShell` on that memory, which
    :func:`ember.vmm.builder.restore_machine` takes."""
    return premade.prepare(directory, _ahead)
