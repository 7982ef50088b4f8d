"""Kernel loaders: ELF ``vmlinux`` (64-bit entry) and ``bzImage``.

Both parse untrusted files, so every offset and size is checked against the
file and against guest memory; a bad file raises :class:`ImageError` with a
one-line reason the CLI can show as is.

References: the ELF-64 object file format, and the Linux x86 boot protocol
(Documentation/x86/boot.rst), whose field names are kept below.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ember.arch.x86_64 import layout
from ember.errors import ImageError
from ember.memory import GuestMemory, GuestMemoryError

ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")

# Boot protocol: offsets in the real-mode header (boot.rst, "The real-mode kernel header").
SETUP_SECTS = 0x1F1
SETUP_HEADER_START = 0x1F1
BOOT_FLAG = 0x1FE
HDRS_MAGIC = 0x202
JUMP_END = 0x201  # byte at 0x201 = length of the header after 0x202
VERSION = 0x206
LOADFLAGS = 0x211
INITRD_ADDR_MAX = 0x22C
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
INIT_SIZE = 0x260
HDRS = 0x53726448  # "HdrS"
BOOT_FLAG_MAGIC = 0xAA55
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags, so we can check for a 64-bit entry
STARTUP_64_OFFSET = 0x200  # the 64-bit entry is 0x200 past the protected-mode start


@dataclass(frozen=True)
class LoadedKernel:
    """What the rest of boot needs to know about a loaded kernel."""

    entry: int  # guest-physical 64-bit entry point
    end: int  # first guest-physical byte after the kernel image (incl. bss / init_size)
    setup_header: bytes  # a bzImage's header to copy into boot_params; b"" for vmlinux
    initrd_addr_max: int
    cmdline_size: int
    kind: str  # "elf" or "bzimage"


def detect_kind(data: bytes) -> str:
    if data[:4] == ELFMAG:
        return "elf"
    if len(data) > HDRS_MAGIC + 4 and struct.unpack_from("<I", data, HDRS_MAGIC)[0] == HDRS:
        return "bzimage"
    raise ImageError("not a Linux kernel: expected an ELF vmlinux or a bzImage")


def load_kernel(mem: GuestMemory, data: bytes) -> LoadedKernel:
    """Load a kernel of either format into guest memory."""
    if detect_kind(data) == "elf":
        return load_elf(mem, data)
    return load_bzimage(mem, data)


def load_elf(mem: GuestMemory, data: bytes) -> LoadedKernel:
    if len(data) < _EHDR.size:
        raise ImageError("truncated ELF header")
    (
        ident,
        _type,
        machine,
        _ver,
        entry,
        phoff,
        _shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        *_rest,
    ) = _EHDR.unpack_from(data, 0)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ImageError("ELF kernel is not 64-bit little-endian")
    if machine != EM_X86_64:
        raise ImageError(f"ELF kernel is for machine {machine}, not x86_64")
    if phentsize != _PHDR.size or phnum == 0:
        raise ImageError("ELF kernel has no usable program headers")
    if phoff + phnum * phentsize > len(data):
        raise ImageError("ELF program headers lie outside the file")
    end = 0
    loaded = 0
    for i in range(phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise ImageError(f"ELF segment {i} lies outside the file")
        if p_paddr < layout.HIMEM_START:
            raise ImageError(f"ELF segment {i} loads at {p_paddr:#x}, below 1 MiB")
        if not mem.contains(p_paddr, p_memsz):
            raise ImageError(
                f"ELF segment {i} ({p_paddr:#x}+{p_memsz:#x}) does not fit in guest memory"
            )
        mem.write(p_paddr, memoryview(data)[p_offset : p_offset + p_filesz])
        # Zero the bss part explicitly: guest RAM is fresh, but a loader must not assume.
        mem.fill(p_paddr + p_filesz, p_memsz - p_filesz, 0)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise ImageError("ELF kernel has no loadable segment")
    if not mem.contains(entry, 1) or entry < layout.HIMEM_START:
        raise ImageError(f"ELF entry point {entry:#x} is not inside the loaded kernel")
    return LoadedKernel(entry, end, b"", 0x7FFFFFFF, layout.CMDLINE_MAX_SIZE, "elf")


def load_bzimage(mem: GuestMemory, data: bytes) -> LoadedKernel:
    if len(data) < 0x268:
        raise ImageError("truncated bzImage header")
    version = struct.unpack_from("<H", data, VERSION)[0]
    if version < MIN_BOOT_PROTOCOL:
        raise ImageError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} is too old")
    if not data[LOADFLAGS] & LOADED_HIGH:
        raise ImageError("zImage (loaded low) kernels are not supported")
    if not struct.unpack_from("<H", data, XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise ImageError("bzImage has no 64-bit entry point")
    setup_sects = data[SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise ImageError("bzImage has no protected-mode kernel")
    header_end = HDRS_MAGIC + data[JUMP_END]
    header = data[SETUP_HEADER_START:header_end]
    init_size = struct.unpack_from("<I", data, INIT_SIZE)[0]
    payload = memoryview(data)[setup_size:]
    load_addr = layout.HIMEM_START
    try:
        mem.write(load_addr, payload)
    except GuestMemoryError:
        raise ImageError("bzImage does not fit in guest memory") from None
    end = load_addr + max(len(payload), init_size)
    if not mem.contains(load_addr, end - load_addr):
        raise ImageError(f"bzImage needs {end >> 20} MiB to decompress; give the guest more memory")
    initrd_max = struct.unpack_from("<I", data, INITRD_ADDR_MAX)[0]
    cmdline_size = struct.unpack_from("<I", data, CMDLINE_SIZE)[0]
    return LoadedKernel(
        load_addr + STARTUP_64_OFFSET, end, bytes(header), initrd_max, cmdline_size, "bzimage"
    )


def load_initrd(mem: GuestMemory, kernel: LoadedKernel, data: bytes) -> tuple[int, int]:
    """Place the initrd as high as allowed, page-aligned, above the kernel."""
    if not data:
        raise ImageError("initrd is empty")
    low_end = mem.regions[0].end
    limit = min(low_end, kernel.initrd_addr_max + 1)
    addr = (limit - len(data)) & ~0xFFF
    if addr < kernel.end:
        raise ImageError(
            f"initrd of {len(data) >> 20} MiB does not fit in guest memory above the kernel; "
            "give the guest more memory (--mem)"
        )
    mem.write(addr, data)
    return addr, len(data)
