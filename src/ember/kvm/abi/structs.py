"""The structs KVM's ioctls read and write, with the flags and limits of their fields.

A vCPU's registers and state (``kvm_regs``, ``kvm_sregs``, CPUID, MSRs, the
local APIC...) and the VM's memory slots, interrupt lines, PIT and clock.
"""

from __future__ import annotations

import ctypes

# the kernel's __u8, __u16, __u32, __u64 and __s32
u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_READONLY = 1 << 1


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
KVM_MAX_CPUID_ENTRIES = 256


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``cpuid2_buffer`` appends the flexible ``entries`` array."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> type[ctypes.Structure]:
    """A ``kvm_cpuid2`` with room for ``nent`` entries (the C flexible array)."""

    class _kvm_cpuid2_n(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    return _kvm_cpuid2_n


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(n: int) -> type[ctypes.Structure]:
    """A ``kvm_msrs`` with room for ``n`` entries."""

    class _kvm_msrs_n(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs_n


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


def msr_list_buffer(n: int) -> type[ctypes.Structure]:
    class _kvm_msr_list_n(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return _kvm_msr_list_n


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0


# --- state for snapshots (arch/x86/include/uapi/asm/kvm.h); the VMM never looks inside most
# of these, it only saves and restores them, so opaque byte arrays of the kernel's sizes do.
class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("data", u8 * 64)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, u8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


KVM_IOAPIC_NUM_PINS = 24
IOAPIC_REDIR_MASKED = 1 << 16  # redirection entry bit 16: the pin is masked


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", u8 * 72), ("flags", u32), ("reserved", u32 * 9)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3
