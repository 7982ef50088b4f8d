"""Snapshot state without KVM: the file format, the memory file, and device state round trips.

A device restored from its saved state must carry on exactly where the
original stopped: the driver (a fake one writing real rings) submits more
requests to the restored transport and sees them completed in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.devices.legacy.serial import Serial8250
from ember.devices.virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET, Interrupt
from ember.devices.virtio.mmio import (
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_STATUS,
    MmioTransport,
)
from ember.devices.virtio.queue import Queue
from ember.errors import SnapshotError
from ember.kvm import abi
from ember.memory import GuestMemory, GuestMemoryError
from ember.snapshot import STATE_FILE
from ember.snapshot import format as fmt
from ember.snapshot.memory_file import memory_digest, write_memory
from ember.vmm.builder import restore_machine
from ember.vmm.config import DiskConfig, VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.machine_state import config_from_state, config_to_state, confine_disks
from tests.unit.test_virtio_mmio import (
    ACK,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    EchoDevice,
    Regs,
    linux_probe,
)
from tests.unit.virtio_driver import UsedElem, VirtioDriver

MIB = 1 << 20


# -- the state file -------------------------------------------------------------------------


def test_state_round_trips_with_kvm_structs() -> None:
    regs = abi.kvm_regs(rip=0xFFFFFFFF81000000, rsp=0x1234, rflags=2)
    data = fmt.encode({"regs": fmt.blob(regs), "n": 7})
    state = fmt.decode(data)
    back = fmt.unblob(abi.kvm_regs, state["regs"])
    assert (back.rip, back.rsp, back.rflags, state["n"]) == (regs.rip, 0x1234, 2, 7)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"NOTEMBER" + d[8:], "bad magic"),
        (lambda d: d[:8] + (2).to_bytes(4, "little") + d[12:], "format version 2"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b" ", "truncated or padded"),
        (lambda d: d[:-2] + bytes([d[-2] ^ 1]) + d[-1:], "checksum"),
        (lambda d: d[:20], "bad magic|truncated"),
    ],
)
def test_damaged_state_is_refused_with_the_reason(mutate: object, message: str) -> None:
    data = fmt.encode({"a": list(range(100))})
    assert callable(mutate)
    with pytest.raises(SnapshotError, match=message):
        fmt.decode(mutate(data))


def test_a_blob_of_the_wrong_size_is_refused() -> None:
    text = fmt.blob(abi.kvm_mp_state(0))
    with pytest.raises(SnapshotError, match="kvm_regs of 4 bytes"):
        fmt.unblob(abi.kvm_regs, text)
    with pytest.raises(SnapshotError, match="malformed"):
        fmt.unblob(abi.kvm_regs, "not base64!")


def test_write_state_replaces_a_longer_file_and_read_state_reports_missing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fmt.write_state(fd, {"v": list(range(1000))})
        fmt.write_state(fd, {"v": 2})  # shorter: no tail of the old one may stay behind
    finally:
        os.close(fd)
    assert fmt.read_state(path) == {"v": 2}
    with pytest.raises(SnapshotError, match="no snapshot state"):
        fmt.read_state(tmp_path / "missing")


# -- the memory file --------------------------------------------------------------------------


def test_memory_file_is_sparse_and_restores_copy_on_write(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(16 * MIB)
    try:
        memory.write(0x1000, b"kernel")
        memory.write(9 * MIB + 5, b"user data")
        path = tmp_path / "memory"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            digest = write_memory(memory, fd, digest=True)
        finally:
            os.close(fd)
    finally:
        memory.close()
    assert path.stat().st_size == 16 * MIB
    assert path.stat().st_blocks * 512 <= 256 * 1024  # two touched chunks, not 16 MiB
    assert digest == memory_digest(path)

    a = GuestMemory.from_file(str(path), 16 * MIB)
    b = GuestMemory.from_file(str(path), 16 * MIB)
    try:
        assert a.read(0x1000, 6) == b"kernel" and a.read(9 * MIB + 5, 9) == b"user data"
        a.write(0x1000, b"KERNEL")  # private to a: neither b nor the file sees it
        assert b.read(0x1000, 6) == b"kernel"
    finally:
        a.close()
        b.close()
    assert memory_digest(path) == digest


def test_a_memory_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    path.write_bytes(bytes(4096))
    with pytest.raises(GuestMemoryError, match="expected"):
        GuestMemory.from_file(str(path), 8192)


# -- disks named by the state file ------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An image cache with a built root file system in it."""
    root = tmp_path / "cache"
    (root / "rootfs" / "k3y").mkdir(parents=True)
    (root / "rootfs" / "k3y" / "rootfs.ext4").write_bytes(bytes(4096))
    monkeypatch.setenv("EMBER_CACHE_DIR", str(root))
    return root


def _crafted_snapshot(directory: Path, rootfs: Path, disks: tuple[Path, ...] = ()) -> Path:
    """A snapshot directory whose state names these disks (as a tampered one would)."""
    directory.mkdir(parents=True, exist_ok=True)
    kernel = directory.parent / "vmlinux"
    kernel.write_bytes(b"")
    config = VmConfig(
        kernel=kernel, mem_mib=16, rootfs=rootfs,
        disks=tuple(DiskConfig(d, read_only=True) for d in disks),
    )  # fmt: skip
    state = {"config": config_to_state(config), "memory": {"size": 16 * MIB}, "vcpus": [{}]}
    fd = os.open(directory / STATE_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fmt.write_state(fd, state)
    finally:
        os.close(fd)
    return directory


def _outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "host" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"host data")
    return secret


def test_a_restore_refuses_a_root_disk_outside_the_image_cache(cache: Path, tmp_path: Path) -> None:
    snapshot = _crafted_snapshot(tmp_path / "tpl", _outside_file(tmp_path))
    with pytest.raises(SnapshotError, match=r"names disk .*secret, which is outside the image"):
        restore_machine(snapshot, ConsoleSink())  # refused before KVM or any disk is opened


@pytest.mark.parametrize("how", ["symlink in the snapshot", "dot-dot", "another template"])
def test_a_restore_checks_disks_after_resolving_the_path(
    cache: Path, tmp_path: Path, how: str
) -> None:
    rootfs = cache / "rootfs" / "k3y" / "rootfs.ext4"
    directory = tmp_path / "tpl"
    directory.mkdir()
    if how == "symlink in the snapshot":
        disk = directory / "disk.img"
        disk.symlink_to(_outside_file(tmp_path))
    elif how == "dot-dot":
        disk = cache / "rootfs" / ".." / ".." / _outside_file(tmp_path).relative_to(tmp_path)
    else:  # the cache also holds other templates' RAM: not an image
        disk = cache / "templates" / "other" / "memory"
        disk.parent.mkdir(parents=True)
        disk.write_bytes(bytes(4096))
    snapshot = _crafted_snapshot(directory, rootfs, (disk,))
    with pytest.raises(SnapshotError, match=r"outside the image cache .* rebuild the snapshot"):
        restore_machine(snapshot, ConsoleSink())


def test_disks_in_the_image_cache_or_the_snapshot_are_accepted_as_their_real_paths(
    cache: Path, tmp_path: Path
) -> None:
    rootfs = cache / "rootfs" / "k3y" / "rootfs.ext4"
    directory = tmp_path / "tpl"
    directory.mkdir()
    own = directory / "data.img"
    own.write_bytes(bytes(4096))
    link = directory / "root-link"
    link.symlink_to(rootfs)
    snapshot = _crafted_snapshot(directory, link, (own,))
    state = fmt.read_state(snapshot / STATE_FILE)
    config = config_from_state(state["config"], vsock_uds=None, guest_cid=None)
    confined = confine_disks(config, snapshot)
    assert confined.rootfs == rootfs  # the checked path is the one opened
    assert [d.path for d in confined.disks] == [own]
    assert confined.disks[0].read_only


def test_a_symlinked_cache_root_still_holds_its_images(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alias = tmp_path / "cache-link"
    alias.symlink_to(cache)
    monkeypatch.setenv("EMBER_CACHE_DIR", str(alias))
    rootfs = alias / "rootfs" / "k3y" / "rootfs.ext4"
    config = VmConfig(kernel=tmp_path / "vmlinux", rootfs=rootfs)
    assert confine_disks(config, tmp_path / "tpl").rootfs == rootfs.resolve()


# -- device state -----------------------------------------------------------------------------


def test_queue_state_round_trip_and_bad_size() -> None:
    q = Queue(256)
    q.size, q.ready, q.desc_table, q.next_avail, q.next_used = 128, True, 0x4000, 65535, 3
    copy = Queue(256)
    copy.load_state(q.save_state())
    assert copy.save_state() == q.save_state()
    # Whatever a driver can leave in QueueNum comes back (it is checked where it is used)...
    for size in (512, 100, 0, 0xFFFF_FFFF):
        copy.load_state({**q.save_state(), "size": size})
        assert copy.size == size
    # ... what the 32-bit register cannot hold is a doctored file.
    for size in (1 << 32, -1):
        with pytest.raises(ValueError, match=f"queue size {size} .*32 bits"):
            Queue(256).load_state({**q.save_state(), "size": size})


@pytest.mark.parametrize("size", [12, 32, 0])  # not a power of 2, above QueueNumMax, zero
def test_a_snapshot_of_a_driver_that_wrote_a_bad_queue_size_restores(size: int) -> None:
    """Found by tests/unit/test_device_fuzz.py: QueueNum is any u32 the driver writes, kept
    until DRIVER_OK fails the device; restoring that VM's snapshot raised ValueError."""
    mem = GuestMemory.anonymous(2 * MIB)
    first_irq, second_irq = Interrupt(), Interrupt()
    try:
        drivers = [
            VirtioDriver(mem, size=16, desc_table=0x1000, data_end=0x80000),
            VirtioDriver(mem, size=8, desc_table=0x80000),
        ]
        regs = Regs(MmioTransport(EchoDevice(), mem, first_irq))
        regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER
        regs[VIRTIO_MMIO_DRIVER_FEATURES_SEL] = 1
        regs[VIRTIO_MMIO_DRIVER_FEATURES] = 1  # VIRTIO_F_VERSION_1
        regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER | FEATURES_OK
        regs[VIRTIO_MMIO_QUEUE_NUM] = size
        regs[VIRTIO_MMIO_QUEUE_READY] = 1
        regs[VIRTIO_MMIO_STATUS] = ACK | DRIVER | FEATURES_OK | DRIVER_OK
        assert regs[VIRTIO_MMIO_STATUS] & VIRTIO_CONFIG_S_NEEDS_RESET
        state = regs.t.save_state()

        echo = EchoDevice()
        restored = MmioTransport(echo, mem, second_irq)
        restored.load_state(state)
        assert not echo.active and echo.needs_reset  # as failed as it was
        linux_probe(Regs(restored), drivers)  # the driver resets it and starts over
        head = drivers[0].add_chain([b"again"], [5])
        Regs(restored)[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
        assert drivers[0].used_entries() == [UsedElem(head, 5)]
    finally:
        first_irq.close()
        second_irq.close()
        mem.close()


def test_a_restored_transport_carries_on_where_the_original_stopped() -> None:
    mem = GuestMemory.anonymous(2 * MIB)
    first_irq, second_irq = Interrupt(), Interrupt()
    try:
        echo = EchoDevice()
        original = MmioTransport(echo, mem, first_irq)
        drivers = [
            VirtioDriver(mem, size=16, desc_table=0x1000, data_end=0x80000),
            VirtioDriver(mem, size=8, desc_table=0x80000),
        ]
        linux_probe(Regs(original), drivers)
        h0 = drivers[0].add_chain([b"before"], [6])
        Regs(original)[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
        assert drivers[0].used_entries() == [UsedElem(h0, 6)]
        pending = drivers[0].add_chain([b"kicked, never served"], [32])  # kick lost
        state = original.save_state()

        restored_echo = EchoDevice()
        restored = MmioTransport(restored_echo, mem, second_irq)
        restored.load_state(state)
        assert restored_echo.active and restored_echo.acked_features == echo.acked_features
        # load_state looked at every ring once: the request made before the snapshot is done.
        assert restored_echo.served == [(0, b"kicked, never served")]
        assert drivers[0].used_entries() == [UsedElem(pending, 20)]
        h2 = drivers[0].add_chain([b"after"], [5])
        Regs(restored)[VIRTIO_MMIO_QUEUE_NOTIFY] = 0
        assert drivers[0].used_entries() == [UsedElem(h2, 5)]
        assert drivers[0].written(h2) == b"retfa"
        assert restored.save_state()["queues"][0]["next_used"] == 3
    finally:
        first_irq.close()
        second_irq.close()
        mem.close()


def test_restore_into_a_different_device_is_refused() -> None:
    mem = GuestMemory.anonymous(2 * MIB)
    irq = Interrupt()
    try:
        state = MmioTransport(EchoDevice(), mem, irq).save_state()
        state["device_id"] = 2
        with pytest.raises(ValueError, match="does not match"):
            MmioTransport(EchoDevice(), mem, irq).load_state(state)
    finally:
        irq.close()
        mem.close()


def test_serial_registers_round_trip() -> None:
    lines: list[bool] = []
    uart = Serial8250(lambda data: None, lines.append)
    uart.write(3, bytes([0x80]))  # DLAB
    uart.write(0, bytes([0x01]))  # divisor 1: 115200 baud
    uart.write(3, bytes([0x03]))
    uart.write(1, bytes([0x02]))  # THRE interrupt on
    copy = Serial8250(lambda data: None, lines.append)
    copy.load_state(uart.save_state())
    assert copy.save_state() == uart.save_state()
    assert (copy.dll, copy.ier, copy.lcr) == (0x01, 0x02, 0x03)
