"""The ctypes ABI in ember.kvm.abi against the real linux/kvm.h, compiled with gcc.

A wrong size or ioctl number would make KVM reject a call or, worse, read a
different struct than we wrote; this pins every one of them to the headers.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.kvm import abi

STRUCTS = [
    "kvm_userspace_memory_region",
    "kvm_regs",
    "kvm_sregs",
    "kvm_segment",
    "kvm_dtable",
    "kvm_fpu",
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_msr_entry",
    "kvm_msrs",
    "kvm_msr_list",
    "kvm_lapic_state",
    "kvm_pit_config",
    "kvm_irq_level",
    "kvm_irqfd",
    "kvm_ioeventfd",
    "kvm_mp_state",
    "kvm_xsave",
    "kvm_xcr",
    "kvm_xcrs",
    "kvm_vcpu_events",
    "kvm_debugregs",
    "kvm_irqchip",
    "kvm_pic_state",
    "kvm_ioapic_state",
    "kvm_pit_state2",
    "kvm_clock_data",
]

IOCTLS = [
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_GET_MSR_INDEX_LIST",
    "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP",
    "KVM_IRQ_LINE",
    "KVM_IRQFD",
    "KVM_CREATE_PIT2",
    "KVM_IOEVENTFD",
    "KVM_RUN",
    "KVM_GET_REGS",
    "KVM_SET_REGS",
    "KVM_GET_SREGS",
    "KVM_SET_SREGS",
    "KVM_GET_MSRS",
    "KVM_SET_MSRS",
    "KVM_GET_FPU",
    "KVM_SET_FPU",
    "KVM_GET_LAPIC",
    "KVM_SET_LAPIC",
    "KVM_SET_CPUID2",
    "KVM_GET_MP_STATE",
    "KVM_SET_MP_STATE",
    "KVM_GET_IRQCHIP",
    "KVM_SET_IRQCHIP",
    "KVM_GET_CLOCK",
    "KVM_SET_CLOCK",
    "KVM_GET_PIT2",
    "KVM_SET_PIT2",
    "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS",
    "KVM_GET_DEBUGREGS",
    "KVM_SET_DEBUGREGS",
    "KVM_GET_XSAVE",
    "KVM_SET_XSAVE",
    "KVM_GET_XCRS",
    "KVM_SET_XCRS",
    "KVM_GET_TSC_KHZ",
    "KVM_SET_TSC_KHZ",
]

CONSTANTS = [
    "KVM_API_VERSION",
    "KVM_IOAPIC_NUM_PINS",
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_USER_MEMORY",
    "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_PIT2",
    "KVM_CAP_IOEVENTFD",
    "KVM_CAP_IRQFD",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_ADJUST_CLOCK",
    "KVM_CAP_VCPU_EVENTS",
    "KVM_CAP_DEBUGREGS",
    "KVM_CAP_XSAVE",
    "KVM_CAP_XCRS",
    "KVM_MAX_XCRS",
    "KVM_IRQCHIP_PIC_MASTER",
    "KVM_IRQCHIP_PIC_SLAVE",
    "KVM_IRQCHIP_IOAPIC",
    "KVM_CLOCK_TSC_STABLE",
    "KVM_CLOCK_REALTIME",
    "KVM_CLOCK_HOST_TSC",
    "KVM_EXIT_IO",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_HLT",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_INTERNAL_ERROR_EMULATION",
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES",
    "KVM_SYSTEM_EVENT_RESET",
    "KVM_PIT_SPEAKER_DUMMY",
    "KVM_IOEVENTFD_FLAG_PIO",
    "KVM_MEM_READONLY",
]

# struct kvm_run field offsets that the vCPU loop reads directly.
RUN_OFFSETS = {
    "KVM_RUN_IMMEDIATE_EXIT": "immediate_exit",
    "KVM_RUN_EXIT_REASON": "exit_reason",
    "KVM_RUN_UNION": "io",
    "KVM_RUN_IO_DATA_OFFSET": "io.data_offset",
    "KVM_RUN_MMIO_DATA": "mmio.data",
    "KVM_RUN_MMIO_LEN": "mmio.len",
    "KVM_RUN_MMIO_IS_WRITE": "mmio.is_write",
    "KVM_RUN_INTERNAL_DATA": "internal.data",
    "KVM_RUN_EMULATION_INSN_SIZE": "emulation_failure.insn_size",
    "KVM_RUN_EMULATION_INSN_BYTES": "emulation_failure.insn_bytes",
}


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.fail("gcc and linux/kvm.h (Debian: gcc, linux-libc-dev) are needed")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    for name, field in RUN_OFFSETS.items():
        lines.append(f'printf("{name} %zu\\n", offsetof(struct kvm_run, {field}));')
    lines += ["return 0;", "}"]
    tmp = tmp_path_factory.mktemp("abi")
    src = tmp / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp / "abi"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        *name, value = line.split()
        values[" ".join(name)] = int(value)
    return values


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size(header_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(getattr(abi, name)) == header_values[f"sizeof {name}"]


@pytest.mark.parametrize("name", IOCTLS + CONSTANTS)
def test_number(header_values: dict[str, int], name: str) -> None:
    assert getattr(abi, name) == header_values[name], f"{name} differs from linux/kvm.h"


@pytest.mark.parametrize("name", sorted(RUN_OFFSETS))
def test_kvm_run_offset(header_values: dict[str, int], name: str) -> None:
    assert getattr(abi, name) == header_values[name]


def test_sized_buffers_match_flexible_arrays() -> None:
    assert ctypes.sizeof(abi.cpuid2_buffer(3)) == 8 + 3 * ctypes.sizeof(abi.kvm_cpuid_entry2)
    assert ctypes.sizeof(abi.msrs_buffer(2)) == 8 + 2 * ctypes.sizeof(abi.kvm_msr_entry)
