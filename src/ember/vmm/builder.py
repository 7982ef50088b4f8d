"""Boot a VM from a kernel (and initrd): the one place that wires a machine together.

Follows the recipe shared by the small VMMs (shared/DESIGN.md §4):
create VM → RAM → TSS → irqchip → PIT → devices (their command-line
announcements) → kernel, initrd, command line, boot_params, MP table, GDT,
page tables → vCPUs (CPUID, MSRs, registers, FPU, LAPIC).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ember.arch.x86_64 import layout, loader, regs
from ember.arch.x86_64.bootparams import build_boot_params, e820_map
from ember.arch.x86_64.cpuid import CpuTemplate, guest_cpuid, resolve_template
from ember.arch.x86_64.mptable import mptable
from ember.devices.bus import Bus
from ember.devices.legacy.i8042 import I8042, I8042_PORT_BASE, I8042_PORT_LEN
from ember.devices.legacy.page_clear import PAGE_CLEAR_LEN, PageClear
from ember.devices.legacy.serial import COM1_IRQ, COM1_PORT, UART_PORT_LEN, Serial8250
from ember.devices.virtio.block.device import Block
from ember.errors import ConfigError, SnapshotError
from ember.kvm import abi
from ember.kvm.system import Kvm, Vcpu, Vm
from ember.memory import GuestMemory
from ember.snapshot import STATE_FILE, prefault, premade
from ember.snapshot.format import read_state, unblob
from ember.snapshot.kvm_state import needs_pit, restore_vm
from ember.vmm.config import VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.event_loop import EventLoop
from ember.vmm.machine import Machine
from ember.vmm.machine_state import config_from_state, confine_disks
from ember.vmm.shm import SharedRegion
from ember.vmm.virtio_slots import VirtioSlots
from ember.vmm.vm_shell import VmShell, make_shell, restore_vcpus

log = logging.getLogger(__name__)


def _read(path: object, what: str) -> bytes:
    try:
        with open(str(path), "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def build_machine(config: VmConfig, console: ConsoleSink) -> Machine:
    config.validate()
    kernel_data = _read(config.kernel, "kernel")
    loader.detect_kind(kernel_data)  # fail on a non-kernel before touching KVM
    initrd_data = _read(config.initrd, "initrd") if config.initrd is not None else None

    with ExitStack() as undo:
        template = resolve_template(config.cpu_template)
        memory = GuestMemory.anonymous(config.mem_mib << 20)
        undo.callback(memory.close)
        parts = _create_vm(config, memory, undo)
        kvm, vm, slots = parts.kvm, parts.vm, parts.slots
        supported = kvm.supported_cpuid()
        msr_list = set(kvm.msr_index_list())

        kernel = loader.load_kernel(memory, kernel_data)
        initrd = loader.load_initrd(memory, kernel, initrd_data) if initrd_data else None
        extra = [*slots.cmdline, parts.shm.cmdline()] if parts.shm else slots.cmdline
        cmdline = _cmdline(config, template, extra)
        if len(cmdline) >= min(kernel.cmdline_size, layout.CMDLINE_MAX_SIZE):
            raise ConfigError(
                f"kernel command line is {len(cmdline)} bytes; this kernel takes "
                f"{min(kernel.cmdline_size, layout.CMDLINE_MAX_SIZE) - 1}"
            )
        memory.write(layout.CMDLINE_START, cmdline + b"\0")
        memory.write(
            layout.ZERO_PAGE_START,
            build_boot_params(
                setup_header=kernel.setup_header,
                cmdline_addr=layout.CMDLINE_START,
                cmdline_size=len(cmdline) + 1,
                initrd=initrd,
                e820=e820_map(memory) + ([parts.shm.e820_entry()] if parts.shm else []),
            ),
        )
        memory.write(layout.EBDA_START, mptable(config.vcpus))
        memory.write(layout.BOOT_GDT_START, regs.gdt_bytes())
        memory.write(layout.BOOT_IDT_START, bytes(8))
        pt_addr, pt_bytes = regs.identity_page_tables()
        memory.write(pt_addr, pt_bytes)

        vcpus: list[Vcpu] = []
        cpuids: list[list[abi.kvm_cpuid_entry2]] = []
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            undo.callback(vcpu.close)
            vcpus.append(vcpu)
            cpuids.append(guest_cpuid(supported, template, vcpu.index, config.vcpus))
            _setup_vcpu(vcpu, cpuids[-1], msr_list, kernel.entry)

        machine = _finish(config, parts, memory, vcpus, cpuids, console)
        undo.pop_all()  # the machine owns everything now
        return machine
    raise AssertionError("unreachable")


def restore_machine(
    directory: Path,
    console: ConsoleSink,
    *,
    vsock_uds: Path | None = None,
    guest_cid: int | None = None,
    tap: str | None = None,
    netns: str | None = None,
) -> Machine:
    """A new VM from a snapshot: RAM mapped copy-on-write, KVM and device state put back.

    The devices are the snapshot's (same slots, same order), with fresh host
    sides: ``vsock_uds`` is this sandbox's socket, and the guest is told
    its old connections are gone.
    """
    ahead = premade.take(directory)  # made by the child forked ahead of this request
    state = ahead.state if ahead is not None else read_state(directory / STATE_FILE)
    try:
        config = config_from_state(
            state["config"], vsock_uds=vsock_uds, guest_cid=guest_cid, tap=tap, netns=netns
        )
        mem_size = int(state["memory"]["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot {directory} has an unusable config: {exc!r}") from None
    config = confine_disks(config, directory)  # before any disk is opened (as root)
    if mem_size != config.mem_mib << 20:
        raise SnapshotError(f"snapshot {directory}: memory size does not match its config")
    if len(state.get("vcpus", ())) != config.vcpus:
        raise SnapshotError(
            f"snapshot {directory}: {config.vcpus} vCPUs in the config, "
            f"{len(state.get('vcpus', ()))} saved"
        )
    with ExitStack() as undo:
        if ahead is not None:
            memory = ahead.memory
            shell = ahead.vm if isinstance(ahead.vm, VmShell) else None
        else:
            memory, shell = premade.restore_memory(directory, mem_size), None
        undo.callback(memory.close)
        parts = _create_vm(config, memory, undo, pit=needs_pit(state.get("vm")), shell=shell)
        taken = shell if shell is not None and parts.vm is shell.vm else None
        # vCPUs made from this same state ahead (vm_shell.prepare_ahead), or made now.
        vcpus = taken.vcpus if taken is not None and taken.vcpus else None
        if vcpus is None:
            vcpus = restore_vcpus(parts.vm, state["vcpus"])
        for vcpu in vcpus:
            undo.callback(vcpu.close)
        cpuids = [[unblob(abi.kvm_cpuid_entry2, e) for e in v["cpuid"]] for v in state["vcpus"]]
        restore_vm(parts.vm, state["vm"])
        machine = _finish(config, parts, memory, vcpus, cpuids, console)
        machine.exec_prefault = [
            prefault.read(directory, mem_size, name) for name in prefault.EXEC_FILES
        ]
        if ahead is not None:  # what of this restore the child forked ahead made
            machine.made_ahead = ["memory"]
            if taken is not None:
                machine.made_ahead.append("vm")
                if vcpus is taken.vcpus:
                    machine.made_ahead.append("vcpus")
        try:
            machine.serial.load_state(state["serial"])
            devices = state["devices"]
            made = len(parts.slots.transports)
            if len(devices) != made:
                raise ValueError(f"{len(devices)} devices saved, {made} made")
            for transport, device_state in zip(parts.slots.transports, devices, strict=True):
                transport.load_state(device_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot {directory}: device state unusable: {exc}") from None
        undo.pop_all()
        return machine
    raise AssertionError("unreachable")


@dataclass
class _VmParts:
    kvm: Kvm
    vm: Vm
    pio: Bus
    mmio: Bus
    events: EventLoop
    slots: VirtioSlots
    shm: SharedRegion | None


def _create_vm(
    config: VmConfig,
    memory: GuestMemory,
    undo: ExitStack,
    *,
    pit: bool = True,
    shell: VmShell | None = None,
) -> _VmParts:
    """KVM objects, memory slots and devices: what a boot and a restore share (a restore
    whose guest no longer listens to the PIT goes without one: ``kvm_state.needs_pit``).
    ``shell``: the VM made ahead on ``memory``, taken if it is the one this VM needs."""
    want_shm = config.vsock_uds is not None
    if shell is not None and ((shell.shm is not None) != want_shm or shell.pit != pit):
        shell.close()
        shell = None
    if shell is None:
        shell = make_shell(memory, shm=want_shm, pit=pit)
    kvm, vm, shm = shell.kvm, shell.vm, shell.shm
    undo.callback(kvm.close)
    if shm is not None:
        undo.callback(shm.close)  # LIFO: after vm.close()
    undo.callback(vm.close)

    events = EventLoop()
    undo.callback(events.close)
    mmio = Bus("mmio")
    slots = VirtioSlots(vm, memory, mmio, events)
    undo.callback(slots.close)
    if config.rootfs is not None:
        slots.attach(Block(config.rootfs, read_only=True, serial="ember-rootfs"))
    for disk in config.disks:
        slots.attach(Block(disk.path, read_only=disk.read_only))
    if config.vsock_uds is not None:
        from ember.devices.virtio.vsock.device import Vsock

        slots.attach(Vsock(config.guest_cid, config.vsock_uds, events))
    if config.balloon:
        from ember.devices.virtio.balloon.device import Balloon

        slots.attach(Balloon())
    if config.net is not None:
        from ember.devices.virtio.net.device import Net
        from ember.devices.virtio.net.tap import open_tap, set_offload

        fd = open_tap(config.net.tap, config.net.netns)
        try:
            device = Net(fd, events, config.net.mac_bytes(), set_offload=set_offload)
        except BaseException:
            os.close(fd)
            raise
        slots.attach(device)  # closed with the slots from here on
    if shm is not None:  # after every device: their lines (and a template's) stay put
        shm.attach_guest_bell(vm, slots.reserve_irq())
    return _VmParts(kvm, vm, Bus("pio"), mmio, events, slots, shm)


def _finish(
    config: VmConfig,
    parts: _VmParts,
    memory: GuestMemory,
    vcpus: list[Vcpu],
    cpuids: list[list[abi.kvm_cpuid_entry2]],
    console: ConsoleSink,
) -> Machine:
    vm = parts.vm
    serial = Serial8250(console, lambda level: vm.irq_line(COM1_IRQ, int(level)))
    machine = Machine(
        parts.kvm, vm, memory, vcpus, parts.pio, parts.mmio, console, parts.events, parts.slots,
        config=config, serial=serial, cpuids=cpuids,
    )  # fmt: skip
    machine.shm = parts.shm
    if parts.shm is not None and vcpus:
        parts.shm.publish_clock(vcpus[0])  # after the vCPUs' state (a restore's TSC) is set
    parts.pio.insert(serial, COM1_PORT, UART_PORT_LEN)
    parts.pio.insert(I8042(machine.guest_reset), I8042_PORT_BASE, I8042_PORT_LEN)
    machine.page_clear = PageClear(memory)
    parts.pio.insert(machine.page_clear, layout.HOST_CLEAR_PORT, PAGE_CLEAR_LEN)
    return machine


def _cmdline(config: VmConfig, template: CpuTemplate, devices: list[str]) -> bytes:
    """User words first, then what the CPU template and the devices need (no repeats)."""
    words = config.full_cmdline().split()
    extra = [w for w in [*template.cmdline, *devices] if w not in words]
    return " ".join([*words, *extra]).encode()


def _setup_vcpu(
    vcpu: Vcpu, cpuid: list[abi.kvm_cpuid_entry2], msr_list: set[int], entry: int
) -> None:
    vcpu.set_cpuid2(cpuid)
    wanted = {k: v for k, v in regs.boot_msrs().items() if k in msr_list}
    if vcpu.set_msrs(wanted) != len(wanted):
        for index, value in wanted.items():  # find and skip the ones this KVM refuses
            if vcpu.set_msrs({index: value}) != 1:
                log.debug("KVM refused MSR %#x", index)
    vcpu.set_fpu(regs.boot_fpu())
    lapic = vcpu.get_lapic()
    regs.boot_lapic(lapic)
    vcpu.set_lapic(lapic)
    if vcpu.index == 0:  # application processors wait for INIT/SIPI from the BSP
        sregs = vcpu.get_sregs()
        regs.boot_sregs(sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs.boot_regs(entry))
