"""Boot-time CPU state for the 64-bit entry: GDT, page tables, registers, MSRs, LAPIC.

The Linux x86 boot protocol's 64-bit entry wants long mode with paging on,
an identity map covering the kernel, boot_params and command line, flat
segments ``__BOOT_CS`` (0x10) and ``__BOOT_DS`` (0x18), and ``rsi`` pointing
at boot_params.  Everything here is pure: it returns bytes or fills ctypes
structs, so unit tests can check it without /dev/kvm.
"""

from __future__ import annotations

import struct

from ember.arch.x86_64 import layout
from ember.kvm import abi

# Control registers and EFER bits (Intel SDM vol. 3, 2.5).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a page directory
IDENTITY_MAP_GIB = 4

# MSRs (arch/x86/include/asm/msr-index.h).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRRdefType = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

# LAPIC registers (offsets into kvm_lapic_state.regs) and delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

GDT_SELECTOR_CODE = 0x10  # __BOOT_CS
GDT_SELECTOR_DATA = 0x18  # __BOOT_DS
GDT_SELECTOR_TSS = 0x20


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor, packed as in the SDM (vol. 3, 3.4.5)."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


# null, null, 64-bit code, data, TSS
BOOT_GDT = (
    0,
    0,
    gdt_entry(0xA09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
    gdt_entry(0x808B, 0, 0xFFFFF),
)


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


def segment_from_gdt(entry: int, index: int) -> abi.kvm_segment:
    """The kvm_segment the CPU would cache after loading descriptor ``index``."""
    flags = (entry >> 40) & 0xF0FF
    g = (flags >> 15) & 1
    limit = ((entry >> 32) & 0x000F0000) | (entry & 0xFFFF)
    if g:
        limit = (limit << 12) | 0xFFF
    base = ((entry >> 16) & 0x00FFFFFF) | ((entry >> 32) & 0xFF000000)
    return abi.kvm_segment(
        base=base,
        limit=limit,
        selector=index * 8,
        type=flags & 0xF,
        present=(flags >> 7) & 1,
        dpl=(flags >> 5) & 3,
        db=(flags >> 14) & 1,
        s=(flags >> 4) & 1,
        l=(flags >> 13) & 1,
        g=g,
        avl=(flags >> 12) & 1,
        unusable=0 if (flags >> 7) & 1 else 1,
    )


def identity_page_tables() -> tuple[int, bytes]:
    """PML4, PDPT and page directories mapping the low 4 GiB with 2 MiB pages.

    Returns (guest address, bytes) to write; the tables are contiguous
    from ``PML4_START``.
    """
    pml4 = struct.pack("<Q", layout.PDPTE_START | PTE_PRESENT | PTE_RW).ljust(4096, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (layout.PDE_START + i * 4096) | PTE_PRESENT | PTE_RW)
        for i in range(IDENTITY_MAP_GIB)
    ).ljust(4096, b"\0")
    pds = b"".join(
        struct.pack("<Q", (i << 21) | PTE_PRESENT | PTE_RW | PTE_PS)
        for i in range(512 * IDENTITY_MAP_GIB)
    )
    return layout.PML4_START, pml4 + pdpt + pds


def boot_sregs(sregs: abi.kvm_sregs) -> None:
    """Long mode, paging on, flat boot segments; keeps what KVM put elsewhere."""
    code = segment_from_gdt(BOOT_GDT[2], 2)
    data = segment_from_gdt(BOOT_GDT[3], 3)
    tss = segment_from_gdt(BOOT_GDT[4], 4)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt.base = layout.BOOT_GDT_START
    sregs.gdt.limit = len(BOOT_GDT) * 8 - 1
    sregs.idt.base = layout.BOOT_IDT_START
    sregs.idt.limit = 7
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG
    sregs.cr3 = layout.PML4_START
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def boot_regs(entry: int) -> abi.kvm_regs:
    regs = abi.kvm_regs()
    regs.rflags = 0x2  # bit 1 is reserved and always set
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = layout.ZERO_PAGE_START
    return regs


def boot_fpu() -> abi.kvm_fpu:
    fpu = abi.kvm_fpu()
    fpu.fcw = 0x37F  # x87 default: all exceptions masked
    fpu.mxcsr = 0x1F80  # SSE default: all exceptions masked
    return fpu


def boot_msrs() -> dict[int, int]:
    """MSRs a freshly reset CPU should present to the kernel."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRRdefType: MTRR_ENABLE | MTRR_TYPE_WRBACK,
    }


def set_lvt_delivery_mode(regs: bytearray, offset: int, mode: int) -> None:
    (value,) = struct.unpack_from("<I", regs, offset)
    struct.pack_into("<I", regs, offset, (value & ~0x700) | (mode << 8))


def boot_lapic(lapic: abi.kvm_lapic_state) -> None:
    """LINT0 = ExtINT so PIC interrupts reach the CPU, LINT1 = NMI (as a BIOS leaves them)."""
    regs = bytearray(bytes(lapic.regs))
    set_lvt_delivery_mode(regs, APIC_LVT0, APIC_MODE_EXTINT)
    set_lvt_delivery_mode(regs, APIC_LVT1, APIC_MODE_NMI)
    lapic.regs[:] = list(regs)
