"""The Intel MultiProcessor table (MP spec 1.4, chapter 4).

Without ACPI, this is how the guest kernel (``CONFIG_X86_MPPARSE``) learns
how many CPUs there are and where the I/O APIC is.  It sits in the last KiB
of base memory, where the kernel scans for the ``_MP_`` floating pointer.
"""

from __future__ import annotations

import struct

from ember.arch.x86_64 import layout

MPC_SIGNATURE = b"PCMP"
MPF_SIGNATURE = b"_MP_"
MP_SPEC_REVISION = 4
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4
MP_IRQTYPE_INT = 0
MP_IRQTYPE_NMI = 1
MP_IRQTYPE_EXTINT = 3
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
MPC_APIC_USABLE = 1
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IRQ_MAX = 23  # the KVM I/O APIC has 24 pins
BUS_ID_ISA = 0
# CPUID.1 signature and feature bits a BIOS reports for each CPU (informational).
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 1 << 9
CPU_FEATURE_FPU = 1 << 0
MAX_CPUS = 254  # APIC ids 0..253; the I/O APIC takes the next one


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytearray, offset: int) -> bytes:
    data[offset] = 0
    data[offset] = _checksum(bytes(data))
    return bytes(data)


def mptable(vcpu_count: int, start: int = layout.EBDA_START) -> bytes:
    """The floating pointer followed by the configuration table, to write at ``start``."""
    if not 1 <= vcpu_count <= MAX_CPUS:
        raise ValueError(f"the MP table describes 1 to {MAX_CPUS} CPUs, not {vcpu_count}")
    ioapic_id = vcpu_count
    entries = bytearray()
    for cpu in range(vcpu_count):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack(
            "<BBBBII8x",
            MP_PROCESSOR,
            cpu,
            APIC_VERSION,
            flags,
            CPU_STEPPING,
            CPU_FEATURE_APIC | CPU_FEATURE_FPU,
        )
    entries += struct.pack("<BB6s", MP_BUS, BUS_ID_ISA, b"ISA   ")
    entries += struct.pack(
        "<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, layout.IOAPIC_ADDR
    )
    for irq in range(IRQ_MAX + 1):
        entries += struct.pack(
            "<BBHBBBB", MP_INTSRC, MP_IRQTYPE_INT, 0, BUS_ID_ISA, irq, ioapic_id, irq
        )
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQTYPE_EXTINT, 0, BUS_ID_ISA, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQTYPE_NMI, 0, BUS_ID_ISA, 0, 0xFF, 1)
    count = vcpu_count + 1 + 1 + (IRQ_MAX + 1) + 2

    header_size = 44
    table_addr = start + 16
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHII",
            MPC_SIGNATURE,
            header_size + len(entries),
            MP_SPEC_REVISION,
            0,
            b"EMBER   ",
            b"MICROVM     ",
            0,
            0,
            count,
            layout.APIC_DEFAULT_PHYS_BASE,
            0,
        )
    )
    config = bytearray(header + entries)
    config = bytearray(_with_checksum(config, 7))
    floating = bytearray(
        struct.pack("<4sIBBB5x", MPF_SIGNATURE, table_addr, 1, MP_SPEC_REVISION, 0)
    )
    result = _with_checksum(floating, 10) + bytes(config)
    if start + len(result) > layout.BASE_MEMORY_END:
        raise ValueError(f"an MP table for {vcpu_count} CPUs does not fit in base memory")
    return result
