"""Boot a VM from a kernel (and initrd): the one place that wires a machine together.

Follows the recipe shared by the small VMMs (shared/DESIGN.md §4):
create VM → TSS → irqchip → PIT → RAM → devices (their command-line
announcements) → kernel, initrd, command line, boot_params, MP table, GDT,
page tables → vCPUs (CPUID, MSRs, registers, FPU, LAPIC).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

from ember.arch.x86_64 import layout, loader, regs
from ember.arch.x86_64.bootparams import build_boot_params, e820_map
from ember.arch.x86_64.cpuid import CpuTemplate, guest_cpuid, resolve_template
from ember.arch.x86_64.mptable import mptable
from ember.devices.bus import Bus
from ember.devices.legacy.i8042 import I8042, I8042_PORT_BASE, I8042_PORT_LEN
from ember.devices.legacy.serial import COM1_IRQ, COM1_PORT, UART_PORT_LEN, Serial8250
from ember.devices.virtio.block.device import Block
from ember.errors import ConfigError, KvmError
from ember.kvm import abi
from ember.kvm.system import Kvm, Vcpu, c_address
from ember.memory import GuestMemory
from ember.vmm.config import VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.event_loop import EventLoop
from ember.vmm.machine import Machine
from ember.vmm.virtio_slots import VirtioSlots

log = logging.getLogger(__name__)

_REQUIRED_CAPS = {
    abi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    abi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    abi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    abi.KVM_CAP_PIT2: "KVM_CAP_PIT2",
    abi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    abi.KVM_CAP_IOEVENTFD: "KVM_CAP_IOEVENTFD",
    abi.KVM_CAP_IRQFD: "KVM_CAP_IRQFD",
}


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
        kvm = Kvm()
        undo.callback(kvm.close)
        for cap, name in _REQUIRED_CAPS.items():
            if not kvm.check_extension(cap):
                raise KvmError(f"this KVM lacks {name}, which Ember needs")
        template = resolve_template(config.cpu_template)
        supported = kvm.supported_cpuid()
        msr_list = set(kvm.msr_index_list())
        vm = kvm.create_vm()
        undo.callback(vm.close)
        memory = GuestMemory.anonymous(config.mem_mib << 20)
        undo.callback(memory.close)

        vm.set_tss_addr(layout.KVM_TSS_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2()
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.guest_addr, region.size, c_address(region.mem))

        pio = Bus("pio")
        mmio = Bus("mmio")
        events = EventLoop()
        undo.callback(events.close)
        slots = VirtioSlots(vm, memory, mmio, events)
        undo.callback(slots.close)
        if config.rootfs is not None:
            slots.attach(Block(config.rootfs, read_only=True, serial="ember-rootfs"))
        for disk in config.disks:
            slots.attach(Block(disk.path, read_only=disk.read_only))
        if config.vsock_uds is not None:
            from ember.devices.virtio.vsock.device import Vsock

            slots.attach(Vsock(config.guest_cid, config.vsock_uds, events))

        kernel = loader.load_kernel(memory, kernel_data)
        initrd = loader.load_initrd(memory, kernel, initrd_data) if initrd_data else None
        cmdline = _cmdline(config, template, slots.cmdline)
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
                e820=e820_map(memory),
            ),
        )
        memory.write(layout.EBDA_START, mptable(config.vcpus))
        memory.write(layout.BOOT_GDT_START, regs.gdt_bytes())
        memory.write(layout.BOOT_IDT_START, bytes(8))
        pt_addr, pt_bytes = regs.identity_page_tables()
        memory.write(pt_addr, pt_bytes)

        vcpus: list[Vcpu] = []
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            undo.callback(vcpu.close)
            vcpus.append(vcpu)
            _setup_vcpu(vcpu, config.vcpus, supported, template, msr_list, kernel.entry)

        machine = Machine(kvm, vm, memory, vcpus, pio, mmio, console, events, slots)
        serial = Serial8250(console, lambda level: vm.irq_line(COM1_IRQ, int(level)))
        pio.insert(serial, COM1_PORT, UART_PORT_LEN)
        pio.insert(I8042(machine.guest_reset), I8042_PORT_BASE, I8042_PORT_LEN)
        undo.pop_all()  # the machine owns everything now
        return machine
    raise AssertionError("unreachable")


def _cmdline(config: VmConfig, template: CpuTemplate, devices: list[str]) -> bytes:
    """User words first, then what the CPU template and the devices need (no repeats)."""
    words = config.full_cmdline().split()
    extra = [w for w in [*template.cmdline, *devices] if w not in words]
    return " ".join([*words, *extra]).encode()


def _setup_vcpu(
    vcpu: Vcpu,
    count: int,
    supported: list[abi.kvm_cpuid_entry2],
    template: CpuTemplate,
    msr_list: set[int],
    entry: int,
) -> None:
    vcpu.set_cpuid2(guest_cpuid(supported, template, vcpu.index, count))
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
