"""boot_params, e820, GDT, page tables, CPU templates and the MP table (no KVM)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from ember.arch.x86_64 import bootparams, layout, regs
from ember.arch.x86_64.cpuid import TEMPLATES, guest_cpuid, resolve_template
from ember.arch.x86_64.mptable import mptable
from ember.errors import ConfigError
from ember.kvm import abi
from ember.memory import MMIO_GAP_END, MMIO_GAP_START, GuestMemory

MIB = 1 << 20


def test_e820_small_guest() -> None:
    mem = GuestMemory.anonymous(128 * MIB)
    try:
        entries = bootparams.e820_map(mem)
    finally:
        mem.close()
    assert [(e.addr, e.size, e.type) for e in entries] == [
        (0, layout.EBDA_START, bootparams.E820_RAM),
        (layout.EBDA_START, 0x400, bootparams.E820_RESERVED),
        (layout.HIMEM_START, 128 * MIB - layout.HIMEM_START, bootparams.E820_RAM),
    ]


def test_e820_big_guest_skips_the_mmio_gap() -> None:
    mem = GuestMemory.anonymous(4096 * MIB)  # MAP_NORESERVE: costs nothing until touched
    try:
        entries = bootparams.e820_map(mem)
    finally:
        mem.close()
    ram = [(e.addr, e.addr + e.size) for e in entries if e.type == bootparams.E820_RAM]
    assert ram[-2] == (layout.HIMEM_START, MMIO_GAP_START)
    assert ram[-1] == (MMIO_GAP_END, MMIO_GAP_END + 4096 * MIB - MMIO_GAP_START)
    # all RAM is usable except the legacy hole between base memory and 1 MiB
    legacy_hole = layout.HIMEM_START - layout.EBDA_START
    assert sum(end - start for start, end in ram) + legacy_hole == 4096 * MIB


def test_boot_params_for_vmlinux() -> None:
    e820 = [bootparams.E820Entry(0, 0x9FC00, 1), bootparams.E820Entry(0x100000, 0x7F00000, 1)]
    bp = bootparams.build_boot_params(
        setup_header=b"",
        cmdline_addr=0x20000,
        cmdline_size=42,
        initrd=(0x7000000, 0x1234),
        e820=e820,
    )
    assert len(bp) == 4096
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<I", bp, 0x202)[0] == 0x53726448
    assert bp[0x210] == 0xFF  # type_of_loader
    assert bp[0x211] & 0x01  # LOADED_HIGH
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", bp, 0x238)[0] == 42
    assert struct.unpack_from("<II", bp, 0x218) == (0x7000000, 0x1234)
    assert bp[0x1E8] == 2
    assert struct.unpack_from("<QQI", bp, 0x2D0 + 20) == (0x100000, 0x7F00000, 1)


def test_boot_params_keeps_a_bzimage_header_and_amends_it() -> None:
    header = bytearray(0x26C - 0x1F1)
    header[0x1F1 - 0x1F1] = 27  # setup_sects
    struct.pack_into("<H", header, 0x206 - 0x1F1, 0x020F)
    bp = bootparams.build_boot_params(
        setup_header=bytes(header), cmdline_addr=0x20000, cmdline_size=10, initrd=None, e820=[]
    )
    assert bp[0x1F1] == 27 and struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert bp[0x210] == 0xFF and bp[0x211] & 0x80  # CAN_USE_HEAP
    assert struct.unpack_from("<II", bp, 0x218) == (0, 0)


def test_gdt_entries_decode_to_flat_long_mode_segments() -> None:
    code = regs.segment_from_gdt(regs.BOOT_GDT[2], 2)
    data = regs.segment_from_gdt(regs.BOOT_GDT[3], 3)
    assert (code.selector, code.l, code.present, code.type, code.limit) == (
        0x10,
        1,
        1,
        0xB,
        0xFFFFFFFF,
    )
    assert (data.selector, data.db, data.type, data.limit) == (0x18, 1, 0x3, 0xFFFFFFFF)
    assert regs.gdt_bytes()[16:24] == struct.pack("<Q", 0x00AF9B000000FFFF)


def test_page_tables_identity_map_4gib_with_2mib_pages() -> None:
    start, tables = regs.identity_page_tables()
    assert start == layout.PML4_START

    def walk(vaddr: int) -> int:
        def entry(table_addr: int, index: int) -> int:
            off = table_addr - start + index * 8
            return int(struct.unpack_from("<Q", tables, off)[0])

        pml4e = entry(start, (vaddr >> 39) & 511)
        assert pml4e & 1
        pdpte = entry(pml4e & ~0xFFF, (vaddr >> 30) & 511)
        assert pdpte & 1
        pde = entry(pdpte & ~0xFFF, (vaddr >> 21) & 511)
        assert pde & 0x81 == 0x81  # present, 2 MiB page
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (vaddr & 0x1FFFFF)

    for addr in (0, 0x7000, 0x1000000, 0x7FFF123, 0xFEE00000, 0xFFFFFFFF):
        assert walk(addr) == addr
    assert start + len(tables) <= layout.CMDLINE_START


def test_boot_sregs_enter_long_mode() -> None:
    sregs = abi.kvm_sregs()
    regs.boot_sregs(sregs)
    assert sregs.cr0 & regs.X86_CR0_PG and sregs.cr0 & regs.X86_CR0_PE
    assert sregs.cr4 & regs.X86_CR4_PAE
    assert sregs.efer & regs.EFER_LMA and sregs.efer & regs.EFER_LME
    assert (
        sregs.cr3 == layout.PML4_START and sregs.cs.selector == 0x10 and sregs.ss.selector == 0x18
    )
    r = regs.boot_regs(0x1000000)
    assert (r.rip, r.rsi, r.rflags) == (0x1000000, layout.ZERO_PAGE_START, 2)


def test_lapic_lint0_extint_lint1_nmi() -> None:
    lapic = abi.kvm_lapic_state()
    lapic.regs[0x350] = 0xFF
    lapic.regs[0x351] = 0x07  # some bits set in the delivery-mode field already
    regs.boot_lapic(lapic)
    lvt0 = struct.unpack_from("<I", bytes(lapic.regs), 0x350)[0]
    lvt1 = struct.unpack_from("<I", bytes(lapic.regs), 0x360)[0]
    assert (lvt0 >> 8) & 7 == 7 and lvt0 & 0xFF == 0xFF
    assert (lvt1 >> 8) & 7 == 4


def _entry(function: int, index: int = 0, **regs_: int) -> abi.kvm_cpuid_entry2:
    e = abi.kvm_cpuid_entry2(function=function, index=index)
    for name, value in regs_.items():
        setattr(e, name, value)
    return e


SUPPORTED = [
    _entry(1, eax=0xC06F2, ebx=0x00020800, ecx=0xFFFFFFFF, edx=0x1FFFFFFF),
    _entry(7, 0, ebx=0xFFFFFFFF, ecx=0xFFFFFFFF),
    _entry(0xB, 0, edx=77),
    _entry(0xD, 0, eax=0x2E7),
    _entry(0xD, 1, eax=0xF),
    _entry(0x40000001, eax=0x01FFFFFF),
]


def test_pvm_template_hides_what_the_emulator_cannot_run() -> None:
    out = guest_cpuid(SUPPORTED, TEMPLATES["pvm"], vcpu_index=1, vcpu_count=2)
    leaf1 = next(e for e in out if e.function == 1)
    leaf7 = next(e for e in out if e.function == 7)
    for bit in (13, 23, 26, 27, 30, 17):  # CX16 POPCNT XSAVE OSXSAVE RDRAND PCID
        assert not leaf1.ecx & (1 << bit)
    assert leaf1.ecx & (1 << 31)  # hypervisor
    assert leaf1.ecx & 1  # SSE3 untouched
    for bit in (0, 7, 10, 18, 20):  # FSGSBASE SMEP INVPCID RDSEED SMAP
        assert not leaf7.ebx & (1 << bit)
    assert not leaf7.ecx & (1 << 22)  # RDPID
    assert not any(e.function == 0xD for e in out)
    assert leaf1.ebx >> 24 == 1 and (leaf1.ebx >> 16) & 0xFF == 2
    assert next(e for e in out if e.function == 0xB).edx == 1
    assert "noxsave" in TEMPLATES["pvm"].cmdline
    kvm = next(e for e in out if e.function == 0x40000001)
    for bit in (4, 9, 10, 11, 13, 14):  # ASYNC_PF PV_TLB_FLUSH ASYNC_PF_VMEXIT SEND_IPI YIELD INT
        assert not kvm.eax & (1 << bit)
    assert kvm.eax & (1 << 3)  # CLOCKSOURCE2 (kvm-clock) untouched


def test_a_cpu_templates_signature_changes_with_what_the_guest_sees() -> None:
    pvm = TEMPLATES["pvm"]
    assert pvm.signature() == TEMPLATES["pvm"].signature()
    assert pvm.signature() != TEMPLATES["host"].signature()
    fewer = dict(pvm.clear)
    fewer[(0x40000001, 0, "eax")] &= ~(1 << 4)  # async page faults shown again
    assert replace(pvm, clear=fewer).signature() != pvm.signature()
    assert replace(pvm, cmdline=pvm.cmdline[1:]).signature() != pvm.signature()


def test_host_template_passes_features_through_and_does_not_alias_input() -> None:
    out = guest_cpuid(SUPPORTED, TEMPLATES["host"], vcpu_index=0, vcpu_count=1)
    assert next(e for e in out if e.function == 1).ecx == 0xFFFFFFFF
    assert len(out) == len(SUPPORTED)
    out[0].ecx = 0
    assert SUPPORTED[0].ecx == 0xFFFFFFFF
    assert TEMPLATES["host"].cmdline == ()


def test_template_resolution() -> None:
    assert resolve_template("auto", pvm=True).name == "pvm"
    assert resolve_template("auto", pvm=False).name == "host"
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_template("skylake")


def test_mptable_checksums_and_cpus() -> None:
    table = mptable(3)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    (physptr,) = struct.unpack_from("<I", table, 4)
    assert physptr == layout.EBDA_START + 16
    config = table[16:]
    assert config[:4] == b"PCMP" and sum(config) % 256 == 0
    length, _rev, _ck, _oem, _prod, _p, _s, count, lapic, _r = struct.unpack_from(
        "<HBB8s12sIHHII", config, 4
    )
    assert length == len(config) and lapic == layout.APIC_DEFAULT_PHYS_BASE
    cpus = [config[44 + i * 20 : 44 + (i + 1) * 20] for i in range(3)]
    assert [c[0] for c in cpus] == [0, 0, 0] and [c[1] for c in cpus] == [0, 1, 2]
    assert cpus[0][3] == 3 and cpus[1][3] == 1  # BSP flag only on CPU 0
    assert count == 3 + 1 + 1 + 24 + 2
    assert layout.EBDA_START + len(table) <= layout.BASE_MEMORY_END


def test_mptable_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        mptable(0)
    with pytest.raises(ValueError):
        mptable(200)
