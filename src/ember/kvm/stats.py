"""KVM's binary statistics (``KVM_GET_STATS_FD``): what the hypervisor did for a VM.

Why a VMM reads them: under kvm_pvm most of what a request costs is spent by the hypervisor
on the guest's behalf (shadow page faults, emulated instructions, shadow pages zapped and
rebuilt), none of which the guest or the VMM's own CPU time shows. Counter deltas around a
request tell a cold request from a warm one by cause, not only by time.

The file (``Documentation/virt/kvm/api.rst``, "KVM_GET_STATS_FD"), read with ``pread``:

* a header, six ``u32``: ``flags, name_size, num_desc, id_offset, desc_offset, data_offset``;
* ``num_desc`` descriptors at ``desc_offset``, each ``u32 flags, s16 exponent, u16 size,
  u32 offset, u32 bucket_size`` followed by a NUL-padded name of ``name_size`` bytes;
* the data block at ``data_offset``: each statistic is ``size`` ``u64`` at its ``offset``
  (one for counters, one per bucket for histograms).

The descriptors never change for an fd, so they are parsed once; each read is one ``pread``
of the data block. The kernel writes this file, but it is parsed as untrusted bytes all the
same: a malformed layout is a :class:`KvmError`, never an index error.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ember.errors import KvmError

__all__ = [
    "DESCRIPTOR",
    "HEADER",
    "StatDescriptor",
    "StatsFile",
    "parse_descriptors",
    "parse_values",
    "total",
]

HEADER = struct.Struct("<6I")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESCRIPTOR = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0
KVM_STATS_TYPE_INSTANT = 1
KVM_STATS_TYPE_PEAK = 2
KVM_STATS_TYPE_LINEAR_HIST = 3
KVM_STATS_TYPE_LOG_HIST = 4

MAX_DESCRIPTORS = 4096  # a few hundred exist; more means the header is garbage
MAX_NAME_SIZE = 256  # KVM_STATS_NAME_SIZE is 48
MAX_VALUES = 1 << 16  # u64 slots in the data block


@dataclass(frozen=True)
class StatDescriptor:
    name: str
    kind: int  # KVM_STATS_TYPE_*
    offset: int  # bytes into the data block
    size: int  # u64 values: 1, or the histogram's buckets


def parse_descriptors(blob: bytes, name_size: int, count: int) -> list[StatDescriptor]:
    """The ``count`` descriptors in ``blob``; a layout that does not fit is a KvmError."""
    if not 0 < name_size <= MAX_NAME_SIZE or not 0 <= count <= MAX_DESCRIPTORS:
        raise KvmError(f"KVM stats: implausible layout (name_size {name_size}, {count} stats)")
    step = DESCRIPTOR.size + name_size
    if len(blob) < step * count:
        raise KvmError(f"KVM stats: {count} descriptors need {step * count} bytes, got {len(blob)}")
    found = []
    for index in range(count):
        start = index * step
        flags, _exponent, size, offset, _bucket = DESCRIPTOR.unpack_from(blob, start)
        raw = blob[start + DESCRIPTOR.size : start + step]
        name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if not name or size == 0 or offset % 8 or offset // 8 + size > MAX_VALUES:
            raise KvmError(f"KVM stats: descriptor {index} ({name!r}) is malformed")
        found.append(StatDescriptor(name, flags & KVM_STATS_TYPE_MASK, offset, size))
    return found


def parse_values(descriptors: list[StatDescriptor], data: bytes) -> dict[str, int]:
    """Each statistic's value: a counter as is, a histogram as the sum of its buckets."""
    values: dict[str, int] = {}
    for desc in descriptors:
        end = desc.offset + 8 * desc.size
        if end > len(data):
            raise KvmError(f"KVM stats: {desc.name!r} lies past the data block")
        values[desc.name] = sum(struct.unpack_from(f"<{desc.size}Q", data, desc.offset))
    return values


def total(readings: list[dict[str, int]], kinds: dict[str, int]) -> dict[str, int]:
    """Several vCPUs' readings as one: peaks by their maximum, everything else summed."""
    merged: dict[str, int] = {}
    for reading in readings:
        for name, value in reading.items():
            if kinds.get(name) == KVM_STATS_TYPE_PEAK:
                merged[name] = max(merged.get(name, 0), value)
            else:
                merged[name] = merged.get(name, 0) + value
    return merged


class StatsFile:
    """One stats fd (a VM's or a vCPU's); owns the fd. Its layout is parsed on the first read:
    opening costs a VMM one ioctl, and most VMMs are never asked."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.descriptors: list[StatDescriptor] = []
        self.kinds: dict[str, int] = {}
        self._data_offset = -1
        self._data_size = 0

    def _parse(self) -> None:
        header = os.pread(self.fd, HEADER.size, 0)
        if len(header) < HEADER.size:
            raise KvmError("KVM stats: short header")
        _flags, name_size, count, _id, desc_offset, data_offset = HEADER.unpack(header)
        step = DESCRIPTOR.size + name_size
        blob = os.pread(self.fd, step * min(count, MAX_DESCRIPTORS), desc_offset)
        self.descriptors = parse_descriptors(blob, name_size, count)
        self.kinds = {d.name: d.kind for d in self.descriptors}
        self._data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)
        self._data_offset = data_offset

    def read(self) -> dict[str, int]:
        if self._data_offset < 0:
            self._parse()
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return parse_values(self.descriptors, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
