"""Kernel loaders on synthetic ELF and bzImage files (no KVM, no built kernel)."""

from __future__ import annotations

import struct

import pytest

from ember.arch.x86_64 import layout, loader
from ember.errors import ImageError
from ember.memory import GuestMemory

MIB = 1 << 20


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, machine: int = 62) -> bytes:
    """An ELF64 executable with PT_LOAD segments (paddr, file bytes, memsz)."""
    ehdr_size, phdr_size = 64, 56
    phoff = ehdr_size
    data_off = phoff + phdr_size * len(segments)
    phdrs = b""
    blobs = b""
    for paddr, blob, memsz in segments:
        offset = data_off + len(blobs)
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 5, offset, paddr | 0xFFFFFFFF80000000, paddr, len(blob), memsz, 4096
        )
        blobs += blob
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        2,
        machine,
        1,
        entry,
        phoff,
        0,
        0,
        ehdr_size,
        phdr_size,
        len(segments),
        64,
        0,
        0,
    )
    return ehdr + phdrs + blobs


def make_bzimage(
    payload: bytes,
    *,
    setup_sects: int = 4,
    version: int = 0x020F,
    xloadflags: int = 1,
    init_size: int = 4 * MIB,
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # header runs to 0x202 + 0x6a = 0x26c
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2048)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.anonymous(64 * MIB)
    yield m
    m.close()


def test_elf_segments_land_at_paddr_with_bss_zeroed(mem: GuestMemory) -> None:
    mem.write(0x1000000 + 4, b"\xaa" * 16)  # stale bytes where the bss goes
    elf = make_elf([(0x1000000, b"TEXT", 20), (0x1200000, b"DATA", 4)], entry=0x1000000)
    k = loader.load_kernel(mem, elf)
    assert k.kind == "elf" and k.entry == 0x1000000 and k.end == 0x1200004
    assert mem.read(0x1000000, 20) == b"TEXT" + bytes(16)
    assert mem.read(0x1200000, 4) == b"DATA"
    assert k.setup_header == b""


@pytest.mark.parametrize(
    ("elf", "message"),
    [
        (make_elf([(0x1000000, b"x", 1)], 0x1000000, machine=183), "not x86_64"),
        (make_elf([(0x1000000, b"x", 1)], 0x5000000), "entry point"),
        (make_elf([(0x80000, b"x", 1)], 0x80000), "below 1 MiB"),
        (make_elf([(0x3FFFFFF, b"xx", 2)], 0x1000000), "does not fit"),
        (make_elf([(0x1000000, b"x", 1 << 40)], 0x1000000), "does not fit"),
        (make_elf([], 0x1000000), "program headers"),
        (b"\x7fELF" + bytes(10), "truncated"),
    ],
)
def test_bad_elf_is_refused_with_a_reason(mem: GuestMemory, elf: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        loader.load_kernel(mem, elf)


def test_elf_segment_pointing_past_the_file_is_refused(mem: GuestMemory) -> None:
    elf = bytearray(make_elf([(0x1000000, b"abcd", 4)], 0x1000000))
    struct.pack_into("<Q", elf, 64 + 32, 1 << 20)  # p_filesz of segment 0
    struct.pack_into("<Q", elf, 64 + 40, 1 << 20)  # p_memsz
    with pytest.raises(ImageError, match="outside the file"):
        loader.load_kernel(mem, bytes(elf))


def test_not_a_kernel() -> None:
    with pytest.raises(ImageError, match="not a Linux kernel"):
        loader.detect_kind(b"myhostname\n")


def test_bzimage_protected_mode_part_loads_at_1mib(mem: GuestMemory) -> None:
    image = make_bzimage(b"PAYLOAD!" * 100, setup_sects=4)
    k = loader.load_kernel(mem, image)
    assert k.kind == "bzimage"
    assert mem.read(layout.HIMEM_START, 8) == b"PAYLOAD!"
    assert k.entry == layout.HIMEM_START + 0x200
    assert k.end == layout.HIMEM_START + 4 * MIB  # init_size beyond the payload
    assert k.setup_header == image[0x1F1:0x26C]
    assert k.cmdline_size == 2048


def test_bzimage_setup_sects_zero_means_four(mem: GuestMemory) -> None:
    image = bytearray(make_bzimage(b"Z" * 64, setup_sects=4))
    image[0x1F1] = 0
    loader.load_kernel(mem, bytes(image))
    assert mem.read(layout.HIMEM_START, 1) == b"Z"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 0x0204}, "too old"),
        ({"xloadflags": 0}, "no 64-bit entry"),
        ({"init_size": 128 * MIB}, "more memory"),
    ],
)
def test_bad_bzimage(mem: GuestMemory, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        loader.load_kernel(mem, make_bzimage(b"P" * 64, **kwargs))


def test_initrd_goes_high_page_aligned_above_kernel(mem: GuestMemory) -> None:
    k = loader.load_kernel(mem, make_elf([(0x1000000, b"K", 1)], 0x1000000))
    addr, size = loader.load_initrd(mem, k, b"I" * 5000)
    assert size == 5000 and addr % 4096 == 0
    assert addr + size <= 64 * MIB < addr + size + 4096
    assert mem.read(addr, 5000) == b"I" * 5000


def test_initrd_too_big(mem: GuestMemory) -> None:
    k = loader.load_kernel(mem, make_elf([(0x1000000, b"K", 1)], 0x1000000))
    with pytest.raises(ImageError, match="does not fit"):
        loader.load_initrd(mem, k, bytes(60 * MIB))
