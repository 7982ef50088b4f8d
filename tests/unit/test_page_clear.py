"""The page-clearing port, driven through the PIO bus as the guest kernel's patch drives it.

A hostile guest can write anything to the port: every refusal here must leave guest RAM (and
the host) untouched and the VMM running.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember import memory as memory_module
from ember.arch.x86_64 import layout
from ember.arch.x86_64.cpuid import TEMPLATES
from ember.devices.bus import Bus
from ember.devices.legacy.page_clear import PAGE_CLEAR_LEN, PageClear
from ember.memory import (
    HUGE_PAGE_SIZE,
    MIB,
    MMIO_GAP_START,
    PAGE_SIZE,
    GuestMemory,
    GuestMemoryError,
    Region,
    c_address,
)

PORT = layout.HOST_CLEAR_PORT
SMALL, HUGE = PORT, PORT + 4


@pytest.fixture
def machine() -> tuple[GuestMemory, PageClear, Bus]:
    memory = GuestMemory.anonymous(16 * MIB)
    memory.fill(0, 16 * MIB, 0xA5)
    device = PageClear(memory)
    bus = Bus("pio")
    bus.insert(device, PORT, PAGE_CLEAR_LEN)
    return memory, device, bus


def out32(bus: Bus, port: int, value: int) -> None:
    bus.write(port, struct.pack("<I", value))


def test_a_4k_clear_zeroes_that_page_and_nothing_beside_it(
    machine: tuple[GuestMemory, PageClear, Bus],
) -> None:
    memory, device, bus = machine
    out32(bus, SMALL, 0x123)
    assert memory.read(0x123 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert memory.read(0x122 * PAGE_SIZE, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
    assert memory.read(0x124 * PAGE_SIZE, PAGE_SIZE) == b"\xa5" * PAGE_SIZE
    assert device.counters() == {"pages": 1, "huge_pages": 0, "refused": 0}


def test_a_2m_clear_zeroes_the_aligned_huge_page_and_nothing_beside_it(
    machine: tuple[GuestMemory, PageClear, Bus],
) -> None:
    memory, device, bus = machine
    out32(bus, HUGE, (4 * MIB) // PAGE_SIZE)
    assert memory.read(4 * MIB, HUGE_PAGE_SIZE) == bytes(HUGE_PAGE_SIZE)
    assert memory.read(4 * MIB - 1, 1) == b"\xa5"
    assert memory.read(6 * MIB, 1) == b"\xa5"
    assert device.counters() == {"pages": 0, "huge_pages": 1, "refused": 0}


@pytest.mark.parametrize(
    ("port", "data"),
    [
        (HUGE, struct.pack("<I", (4 * MIB + PAGE_SIZE) // PAGE_SIZE)),  # 2 MiB, misaligned
        (SMALL, struct.pack("<I", (16 * MIB) // PAGE_SIZE)),  # just past guest RAM
        (HUGE, struct.pack("<I", (15 * MIB) // PAGE_SIZE)),  # straddles the end (misaligned)
        (HUGE, struct.pack("<I", (16 * MIB) // PAGE_SIZE)),  # past the end, aligned
        (SMALL, struct.pack("<I", 0xFFFF_FFFF)),  # far outside
        (SMALL, b"\x01"),  # a byte write
        (SMALL, struct.pack("<H", 1)),  # a word write
        (PORT + 1, struct.pack("<I", 1)),  # between the ports
        (PORT + 6, struct.pack("<H", 1)),
    ],
)
def test_a_write_the_abi_does_not_name_changes_nothing(
    machine: tuple[GuestMemory, PageClear, Bus], port: int, data: bytes
) -> None:
    memory, device, bus = machine
    bus.write(port, data)
    assert memory.read(0, 16 * MIB) == b"\xa5" * (16 * MIB)
    assert device.counters() == {"pages": 0, "huge_pages": 0, "refused": 1}


def test_a_read_of_the_port_is_refused_and_answers_ones(
    machine: tuple[GuestMemory, PageClear, Bus],
) -> None:
    _, device, bus = machine
    assert bus.read(SMALL, 4) == b"\xff" * 4
    assert device.refused == 1


def test_ram_above_the_32_bit_gap_is_cleared_at_its_guest_address() -> None:
    memory = GuestMemory.anonymous(MMIO_GAP_START + 4 * MIB)  # MAP_NORESERVE: cheap
    device = PageClear(memory)
    high = 1 << 32
    memory.fill(high, 4 * MIB, 0x5A)
    device.write(4, struct.pack("<I", high // PAGE_SIZE))
    assert memory.read(high, HUGE_PAGE_SIZE) == bytes(HUGE_PAGE_SIZE)
    assert memory.read(high + HUGE_PAGE_SIZE, 1) == b"\x5a"
    device.write(0, struct.pack("<I", MMIO_GAP_START // PAGE_SIZE))  # the gap: not RAM
    assert device.counters() == {"pages": 0, "huge_pages": 1, "refused": 1}


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, PAGE_CLEAR_LEN - 1), data=st.binary(max_size=8))
def test_any_write_clears_exactly_what_it_names_or_nothing(offset: int, data: bytes) -> None:
    memory = GuestMemory.anonymous(8 * MIB)
    memory.fill(0, 8 * MIB, 0xA5)
    device = PageClear(memory)
    device.write(offset, data)
    image = memory.read(0, 8 * MIB)
    cleared = [
        i for i in range(0, 8 * MIB, PAGE_SIZE) if image[i : i + PAGE_SIZE] == bytes(PAGE_SIZE)
    ]
    if device.refused:
        assert not cleared and image == b"\xa5" * (8 * MIB)
        return
    frame = int.from_bytes(data, "little")
    size = PAGE_SIZE if offset == 0 else HUGE_PAGE_SIZE
    assert len(data) == 4 and offset in (0, 4)
    assert cleared == list(range(frame * PAGE_SIZE, frame * PAGE_SIZE + size, PAGE_SIZE))
    assert image.count(0xA5) == 8 * MIB - size


def test_only_the_emulated_guests_template_asks_for_it() -> None:
    """On hardware KVM an exit per page costs more than the guest's own clearing."""
    for word in (f"ember.host_clear={PORT:#x}", "ember.thp_align"):
        assert word in TEMPLATES["pvm"].cmdline
        assert not any(w.startswith(word.split("=")[0]) for w in TEMPLATES["host"].cmdline)


def test_a_huge_clear_of_aligned_file_backed_ram_maps_fresh_huge_memory(tmp_path: Path) -> None:
    """Restored RAM is a memory file mapped private: a 2 MiB clear replaces it with anonymous
    memory asking for host huge pages, and the file keeps its bytes."""
    path = tmp_path / "memory"
    path.write_bytes(b"\xa5" * (8 * MIB))
    with path.open("rb") as f:  # guest addresses with the host's 2 MiB alignment, as a VMM's
        mem = mmap.mmap(f.fileno(), 8 * MIB, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    base = c_address(mem) % HUGE_PAGE_SIZE
    memory = GuestMemory([Region(base, 8 * MIB, mem)])
    try:
        first = base + (HUGE_PAGE_SIZE - base) % HUGE_PAGE_SIZE
        host = c_address(mem) - base
        device = PageClear(memory)
        device.write(4, struct.pack("<I", first // PAGE_SIZE))
        assert memory.read(first, HUGE_PAGE_SIZE) == bytes(HUGE_PAGE_SIZE)
        assert memory.read(first + HUGE_PAGE_SIZE, 1) == b"\xa5"
        assert device.counters() == {"pages": 0, "huge_pages": 1, "refused": 0}
        vma = _vma_at(host + first)
        assert vma["inode"] == "0" and "hg" in vma["VmFlags"], vma  # anonymous, MADV_HUGEPAGE
        assert path.read_bytes() == b"\xa5" * (8 * MIB)
    finally:
        memory.close()


def _vma_at(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry holding ``address``: its inode and VmFlags."""
    found: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            inside = start <= address < end
            if inside:
                found["inode"] = head[4]
        elif inside and line.startswith("VmFlags:"):
            found["VmFlags"] = line
    return found


def test_a_failing_mmap_is_the_hosts_error_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of host memory, a 2 MiB clear raises (the vCPU thread stops the VM with it): the
    range may already be unmapped, and guest RAM with a hole must not run on."""
    path = tmp_path / "memory"
    path.write_bytes(bytes(8 * MIB))
    with path.open("rb") as f:
        mem = mmap.mmap(f.fileno(), 8 * MIB, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    base = c_address(mem) % HUGE_PAGE_SIZE
    memory = GuestMemory([Region(base, 8 * MIB, mem)])
    monkeypatch.setattr(memory_module, "_mmap", lambda *args: memory_module._MAP_FAILED)
    try:
        first = base + (HUGE_PAGE_SIZE - base) % HUGE_PAGE_SIZE
        with pytest.raises(GuestMemoryError, match="mmap of fresh memory"):
            PageClear(memory).write(4, struct.pack("<I", first // PAGE_SIZE))
    finally:
        memory.close()
