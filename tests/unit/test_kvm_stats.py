"""KVM's binary statistics: the file layout parsed as untrusted bytes (no KVM needed here;
tests/integration/test_kvm_stats.py reads a real VM's)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import KvmError
from ember.kvm.stats import (
    DESCRIPTOR,
    HEADER,
    KVM_STATS_TYPE_CUMULATIVE,
    KVM_STATS_TYPE_LOG_HIST,
    KVM_STATS_TYPE_PEAK,
    StatsFile,
    parse_descriptors,
    parse_values,
    total,
)

NAME_SIZE = 48


def stats_blob(stats: list[tuple[str, int, list[int]]]) -> bytes:
    """A stats file as the kernel lays it out: header, id, descriptors, data."""
    ident = b"kvm-1234".ljust(NAME_SIZE, b"\0")
    desc_offset = HEADER.size + len(ident)
    descs = b""
    data = b""
    for name, kind, values in stats:
        descs += DESCRIPTOR.pack(kind, 0, len(values), len(data), 0)
        descs += name.encode().ljust(NAME_SIZE, b"\0")
        data += struct.pack(f"<{len(values)}Q", *values)
    data_offset = desc_offset + len(descs)
    header = HEADER.pack(0, NAME_SIZE, len(stats), HEADER.size, desc_offset, data_offset)
    return header + ident + descs + data


def a_file(blob: bytes) -> StatsFile:
    fd = os.memfd_create("stats")
    os.write(fd, blob)
    return StatsFile(fd)


def test_counters_and_histograms_are_read_from_their_offsets() -> None:
    stats = a_file(
        stats_blob(
            [
                ("exits", KVM_STATS_TYPE_CUMULATIVE, [1077]),
                ("halt_wait_hist", KVM_STATS_TYPE_LOG_HIST, [1, 2, 3, 4]),
                ("max_mmu_rmap_size", KVM_STATS_TYPE_PEAK, [9]),
            ]
        )
    )
    try:
        assert stats.read() == {"exits": 1077, "halt_wait_hist": 10, "max_mmu_rmap_size": 9}
        assert stats.kinds["max_mmu_rmap_size"] == KVM_STATS_TYPE_PEAK
    finally:
        stats.close()
    assert stats.fd == -1


def test_vcpus_are_summed_but_peaks_take_the_largest() -> None:
    kinds = {"exits": KVM_STATS_TYPE_CUMULATIVE, "max_mmu_rmap_size": KVM_STATS_TYPE_PEAK}
    merged = total(
        [{"exits": 5, "max_mmu_rmap_size": 3}, {"exits": 7, "max_mmu_rmap_size": 8}], kinds
    )
    assert merged == {"exits": 12, "max_mmu_rmap_size": 8}


def test_a_descriptor_pointing_past_the_data_is_an_error_not_an_index_error() -> None:
    descs = parse_descriptors(
        DESCRIPTOR.pack(0, 0, 2, 8, 0) + b"exits".ljust(NAME_SIZE, b"\0"), NAME_SIZE, 1
    )
    with pytest.raises(KvmError, match="past the data block"):
        parse_values(descs, bytes(16))  # offset 8 + 2 values needs 24 bytes


@pytest.mark.parametrize(
    ("name_size", "count", "why"),
    [(0, 1, "implausible"), (4096, 1, "implausible"), (NAME_SIZE, 1 << 20, "implausible")],
)
def test_an_implausible_header_is_refused(name_size: int, count: int, why: str) -> None:
    with pytest.raises(KvmError, match=why):
        parse_descriptors(b"", name_size, count)


def test_misaligned_or_empty_descriptors_are_refused() -> None:
    name = b"exits".ljust(NAME_SIZE, b"\0")
    with pytest.raises(KvmError, match="malformed"):
        parse_descriptors(DESCRIPTOR.pack(0, 0, 1, 4, 0) + name, NAME_SIZE, 1)  # offset 4
    with pytest.raises(KvmError, match="malformed"):
        parse_descriptors(DESCRIPTOR.pack(0, 0, 0, 0, 0) + name, NAME_SIZE, 1)  # no values
    with pytest.raises(KvmError, match="need"):
        parse_descriptors(DESCRIPTOR.pack(0, 0, 1, 0, 0), NAME_SIZE, 1)  # truncated


def test_a_short_file_is_an_error() -> None:
    stats = a_file(b"\0" * 10)
    with pytest.raises(KvmError, match="short header"):
        stats.read()
    stats.close()


@given(st.binary(max_size=600), st.integers(1, 64), st.integers(0, 12))
def test_garbage_descriptors_raise_kvm_errors_only(blob: bytes, name_size: int, count: int) -> None:
    try:
        descs = parse_descriptors(blob, name_size, count)
        parse_values(descs, blob)
    except KvmError:
        pass
