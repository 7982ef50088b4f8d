"""Every virtio device satisfies the declared transport contract (``TransportDevice``).

mypy checks the contract statically where the builder attaches each device; this checks
it at run time for every device class there is (a new device is found by subclass walk),
including the signatures of its methods, and that the transport and the VMM use the
declared members rather than probing.
"""

from __future__ import annotations

import inspect
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.devices.virtio.balloon.device import Balloon
from ember.devices.virtio.block.device import Block
from ember.devices.virtio.device import Interrupt, TransportDevice, VirtioDevice
from ember.devices.virtio.mmio import MmioTransport
from ember.devices.virtio.net.device import Net
from ember.devices.virtio.vsock.device import Vsock
from ember.memory import GuestMemory
from ember.vmm.event_loop import EventLoop

DEVICE_CLASSES = (Balloon, Block, Net, Vsock)


def _all_device_classes() -> set[type[VirtioDevice]]:
    found: set[type[VirtioDevice]] = set()
    todo = list(VirtioDevice.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("ember."):
            found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_device_class_is_listed() -> None:
    assert _all_device_classes() == set(DEVICE_CLASSES)


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[VirtioDevice]]:
    loop = EventLoop()
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4096))
    ours, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    made: list[VirtioDevice] = [
        Balloon(),
        Block(disk, read_only=True),
        Net(tap.detach(), loop, b"\x02\0\0\0\0\x01"),
        Vsock(3, tmp_path / "v.sock", loop),
    ]
    try:
        yield made
    finally:
        for device in made:
            device.close()
        ours.close()
        loop.close()


def test_every_device_satisfies_the_contract(devices: list[VirtioDevice]) -> None:
    assert {type(d) for d in devices} == set(DEVICE_CLASSES)
    for device in devices:
        assert isinstance(device, TransportDevice), type(device).__name__
        assert isinstance(device.lock, type(threading.RLock()))
        assert isinstance(device.device_id, int)
        assert all(isinstance(n, int) for n in device.queue_max_sizes)
        assert isinstance(device.host_connections, int)
        assert all(isinstance(v, int) for v in device.counters().values())


def test_method_signatures_match_the_contract() -> None:
    members = {
        name: value
        for name, value in vars(TransportDevice).items()
        if callable(value) and not name.startswith("_")
    }
    assert {"close", "counters", "read_config", "process_queue", "fail"} <= set(members)
    for cls in DEVICE_CLASSES:
        for name, declared in members.items():
            expected = list(inspect.signature(declared).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got == expected, f"{cls.__name__}.{name}{got} != contract {expected}"


def test_something_else_is_not_a_device() -> None:
    class Partial:
        device_id = 1
        queue_max_sizes = (8,)

        def read_config(self, offset: int, size: int) -> bytes:
            return b""

    assert not isinstance(Partial(), TransportDevice)


def test_the_transport_shares_the_devices_lock(devices: list[VirtioDevice]) -> None:
    memory = GuestMemory.anonymous(1 << 20)
    interrupt = Interrupt()
    try:
        for device in devices:
            assert MmioTransport(device, memory, interrupt).lock is device.lock
        assert len({id(d.lock) for d in devices}) == len(devices)  # one lock per device
    finally:
        interrupt.close()
        memory.close()


def test_counters_and_host_connections(devices: list[VirtioDevice]) -> None:
    counters = {type(d).__name__: d.counters() for d in devices}
    assert counters["Block"]["reads"] == 0
    assert counters["Vsock"]["connections"] == 0
    assert counters["Balloon"]["inflated_pages"] == 0
    assert counters["Net"]["rx_frames"] == 0
    assert [d.host_connections for d in devices] == [0, 0, 0, 0]
