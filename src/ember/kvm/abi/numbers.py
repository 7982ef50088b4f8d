"""The ABI's numbers: ioctl requests, capabilities, and what ``KVM_RUN`` leaves in ``kvm_run``.

An ioctl number encodes the size of the struct it passes, so each one below
is built from its struct in :mod:`ember.kvm.abi.structs`.
"""

from __future__ import annotations

import ctypes

from ember.kvm.abi.structs import (
    kvm_clock_data,
    kvm_cpuid2,
    kvm_debugregs,
    kvm_fpu,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqchip,
    kvm_irqfd,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_msr_list,
    kvm_msrs,
    kvm_pit_config,
    kvm_pit_state2,
    kvm_regs,
    kvm_sregs,
    kvm_userspace_memory_region,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
    u64,
)

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
