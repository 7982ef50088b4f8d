"""The zero page (``struct boot_params``) and the e820 memory map.

Offsets are those of ``arch/x86/include/uapi/asm/bootparam.h``; the
setup-header fields keep the boot protocol's names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ember.arch.x86_64 import layout
from ember.memory import GuestMemory

BOOT_PARAMS_SIZE = 4096
E820_ENTRIES = 0x1E8
E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")

# setup_header fields (offsets in boot_params)
SETUP_HEADER = 0x1F1
BOOT_FLAG = 0x1FE
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
KERNEL_ALIGNMENT = 0x230
CMDLINE_SIZE = 0x238
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8

E820_RAM = 1
E820_RESERVED = 2

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
LOADER_TYPE_UNDEFINED = 0xFF


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """RAM as the kernel must see it: base memory, a hole for the BIOS area, the rest.

    The last KiB of base memory holds the MP table and is reserved; the
    MMIO gap below 4 GiB is simply absent from the map.
    """
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, layout.BASE_MEMORY_END - layout.EBDA_START, E820_RESERVED),
    ]
    for region in mem.regions:
        start = max(region.guest_addr, layout.HIMEM_START)
        if region.end > start:
            entries.append(E820Entry(start, region.end - start, E820_RAM))
    return entries


def build_boot_params(
    *,
    setup_header: bytes,
    cmdline_addr: int,
    cmdline_size: int,
    initrd: tuple[int, int] | None,
    e820: list[E820Entry],
) -> bytes:
    """A zero page for the 64-bit entry of a vmlinux or bzImage.

    A bzImage brings its own setup header, which is copied in and then
    amended, as the boot protocol asks of a boot loader; for a vmlinux the
    fields the kernel reads are filled in from scratch.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError("too many e820 entries")
    bp = bytearray(BOOT_PARAMS_SIZE)
    if setup_header:
        bp[SETUP_HEADER : SETUP_HEADER + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", bp, BOOT_FLAG, 0xAA55)
        struct.pack_into("<I", bp, HEADER, 0x53726448)
        struct.pack_into("<H", bp, VERSION, 0x020F)
        struct.pack_into("<I", bp, KERNEL_ALIGNMENT, 0x0100_0000)
    bp[TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    bp[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, CMDLINE_SIZE, cmdline_size)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<I", bp, RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        struct.pack_into("<I", bp, RAMDISK_SIZE, size & 0xFFFF_FFFF)
        struct.pack_into("<I", bp, EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, EXT_RAMDISK_SIZE, size >> 32)
    bp[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(
            bp, E820_TABLE + i * E820_ENTRY.size, entry.addr, entry.size, entry.type
        )
    return bytes(bp)
