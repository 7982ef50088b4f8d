"""KVM's user-space ABI, verbatim from ``linux/kvm.h`` and ``asm/kvm.h`` (x86).

Struct and constant names follow the kernel headers so that a reader can grep
them there; ``tests/unit/test_kvm_abi.py`` compiles the real headers with gcc
and checks every size and ioctl number below.
"""

from __future__ import annotations

import ctypes

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h)
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


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


# --- system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, ctypes.sizeof(kvm_msr_list))
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.sizeof(kvm_cpuid2))

# --- vm ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.sizeof(u64))
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(kvm_irq_level))
KVM_IRQFD = _iow(0x76, ctypes.sizeof(kvm_irqfd))
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(kvm_pit_config))
KVM_IOEVENTFD = _iow(0x79, ctypes.sizeof(kvm_ioeventfd))
KVM_GET_IRQCHIP = _iowr(0x62, ctypes.sizeof(kvm_irqchip))
KVM_SET_IRQCHIP = _ior(0x63, ctypes.sizeof(kvm_irqchip))
KVM_SET_CLOCK = _iow(0x7B, ctypes.sizeof(kvm_clock_data))
KVM_GET_CLOCK = _ior(0x7C, ctypes.sizeof(kvm_clock_data))
KVM_GET_STATS_FD = _io(0xCE)  # on a VM or a vCPU fd: see ember.kvm.stats
KVM_GET_PIT2 = _ior(0x9F, ctypes.sizeof(kvm_pit_state2))
KVM_SET_PIT2 = _iow(0xA0, ctypes.sizeof(kvm_pit_state2))

# --- vcpu ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(kvm_sregs))
KVM_GET_MSRS = _iowr(0x88, ctypes.sizeof(kvm_msrs))
KVM_SET_MSRS = _iow(0x89, ctypes.sizeof(kvm_msrs))
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(kvm_fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(kvm_fpu))
KVM_GET_LAPIC = _ior(0x8E, ctypes.sizeof(kvm_lapic_state))
KVM_SET_LAPIC = _iow(0x8F, ctypes.sizeof(kvm_lapic_state))
KVM_SET_CPUID2 = _iow(0x90, ctypes.sizeof(kvm_cpuid2))
KVM_GET_MP_STATE = _ior(0x98, ctypes.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _iow(0x99, ctypes.sizeof(kvm_mp_state))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(kvm_vcpu_events))
KVM_GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(kvm_debugregs))
KVM_SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(kvm_debugregs))
KVM_GET_XSAVE = _ior(0xA4, ctypes.sizeof(kvm_xsave))
KVM_SET_XSAVE = _iow(0xA5, ctypes.sizeof(kvm_xsave))
KVM_GET_XCRS = _ior(0xA6, ctypes.sizeof(kvm_xcrs))
KVM_SET_XCRS = _iow(0xA7, ctypes.sizeof(kvm_xcrs))
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_TSC_KHZ = _io(0xA2)

KVM_API_VERSION = 12

# --- capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56

# --- kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --- struct kvm_run field offsets (the union starts at 32)
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_EXIT_REASON = 8
KVM_RUN_UNION = 32
KVM_RUN_IO_DATA_OFFSET = 40
KVM_RUN_MMIO_DATA = 40
KVM_RUN_MMIO_LEN = 48
KVM_RUN_MMIO_IS_WRITE = 52
KVM_RUN_INTERNAL_DATA = 40
KVM_RUN_EMULATION_INSN_SIZE = 48
KVM_RUN_EMULATION_INSN_BYTES = 49

KVM_MP_STATE_RUNNABLE = 0
KVM_MEM_READONLY = 1 << 1
