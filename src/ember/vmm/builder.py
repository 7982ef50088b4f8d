"""Boot a VM from a kernel (and initrd): the one place that wires a machine together.

Follows the recipe shared by the small VMMs (shared/DESIGN.md §4):
create VM → TSS → irqchip → PIT → RAM → kernel, initrd, command line,
boot_params, MP table, GDT, page tables → vCPUs (CPUID, MSRs, registers,
FPU, LAPIC) → legacy devices on the PIO bus.
"""

from __future__ import annotations

import logging

from ember.arch.x86_64 import layout, loader, regs
from ember.arch.x86_64.bootparams import build_boot_params, e820_map
from ember.arch.x86_64.cpuid import guest_cpuid, resolve_template
from ember.arch.x86_64.mptable import mptable
from ember.devices.bus import Bus
from ember.devices.legacy.i8042 import I8042, I8042_PORT_BASE, I8042_PORT_LEN
from ember.devices.legacy.serial import COM1_IRQ, COM1_PORT, UART_PORT_LEN, Serial8250
from ember.errors import ConfigError, KvmError
from ember.kvm import abi
from ember.kvm.system import Kvm, Vcpu, c_address
from ember.memory import GuestMemory
from ember.vmm.config import VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.machine import Machine

log = logging.getLogger(__name__)

_REQUIRED_CAPS = {
    abi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    abi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    abi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    abi.KVM_CAP_PIT2: "KVM_CAP_PIT2",
    abi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
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

    kvm = Kvm()
    try:
        for cap, name in _REQUIRED_CAPS.items():
            if not kvm.check_extension(cap):
                raise KvmError(f"this KVM lacks {name}, which Ember needs")
        template = resolve_template(config.cpu_template)
        supported = kvm.supported_cpuid()
        msr_list = set(kvm.msr_index_list())
        vm = kvm.create_vm()
    except BaseException:
        kvm.close()
        raise

    memory = GuestMemory.anonymous(config.mem_mib << 20)
    vcpus: list[Vcpu] = []
    try:
        vm.set_tss_addr(layout.KVM_TSS_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2()
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.guest_addr, region.size, c_address(region.mem))

        kernel = loader.load_kernel(memory, kernel_data)
        initrd = loader.load_initrd(memory, kernel, initrd_data) if initrd_data else None
        user_words = config.full_cmdline().split()
        extra = [word for word in template.cmdline if word not in user_words]
        cmdline = " ".join([*user_words, *extra]).encode()
        if len(cmdline) >= kernel.cmdline_size:
            raise ConfigError(
                f"kernel command line is {len(cmdline)} bytes; this kernel takes "
                f"{kernel.cmdline_size - 1}"
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

        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            vcpus.append(vcpu)
            vcpu.set_cpuid2(guest_cpuid(supported, template, index, config.vcpus))
            wanted = {k: v for k, v in regs.boot_msrs().items() if k in msr_list}
            accepted = vcpu.set_msrs(wanted)
            if accepted != len(wanted):
                log.debug("KVM accepted %d of %d boot MSRs", accepted, len(wanted))
            vcpu.set_fpu(regs.boot_fpu())
            lapic = vcpu.get_lapic()
            regs.boot_lapic(lapic)
            vcpu.set_lapic(lapic)
            if index == 0:  # application processors wait for INIT/SIPI from the BSP
                sregs = vcpu.get_sregs()
                regs.boot_sregs(sregs)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(regs.boot_regs(kernel.entry))

        pio = Bus("pio")
        mmio = Bus("mmio")
        machine = Machine(kvm, vm, memory, vcpus, pio, mmio, console)
        serial = Serial8250(console, lambda level: vm.irq_line(COM1_IRQ, int(level)))
        pio.insert(serial, COM1_PORT, UART_PORT_LEN)
        pio.insert(I8042(machine.guest_reset), I8042_PORT_BASE, I8042_PORT_LEN)
        return machine
    except BaseException:
        for vcpu in vcpus:
            vcpu.close()
        vm.close()
        memory.close()
        kvm.close()
        raise
