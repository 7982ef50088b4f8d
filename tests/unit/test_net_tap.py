"""virtio-net over a real TAP in a real (test-made) network namespace, no KVM: the host
kernel answers the fake driver's ARP request; plus TAP and net configuration errors."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.devices.virtio.device import Interrupt
from ember.devices.virtio.net.device import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VNET_HDR_SIZE,
    Net,
    tun_offload_flags,
)
from ember.devices.virtio.net.tap import open_tap, set_offload
from ember.devices.virtio.queue import Queue
from ember.errors import ConfigError, SnapshotError
from ember.memory import GuestMemory
from ember.network.host import GATEWAY_IP, GUEST_IP, TAP_MAC, TAP_NAME, SandboxNetwork
from ember.network.if_tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from ember.network.policy import NetworkPolicy
from ember.vmm.config import DEFAULT_MAC, NetConfig, VmConfig
from ember.vmm.event_loop import EventLoop
from ember.vmm.machine_state import config_from_state, config_to_state
from tests.unit.virtio_driver import VirtioDriver

MIB = 1 << 20
GUEST_MAC = bytes.fromhex(DEFAULT_MAC.replace(":", ""))


@pytest.fixture(scope="module")
def network() -> Iterator[SandboxNetwork]:
    net = SandboxNetwork.create(NetworkPolicy())
    yield net
    net.close()
    assert not Path(net.netns_path).exists()


def arp_request() -> bytes:
    ether = b"\xff" * 6 + GUEST_MAC + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + socket.inet_aton(GUEST_IP)
    arp += bytes(6) + socket.inet_aton(GATEWAY_IP)
    return bytes(VNET_HDR_SIZE) + ether + arp


def test_the_host_kernel_answers_an_arp_request_through_the_device(
    network: SandboxNetwork,
) -> None:
    mem = GuestMemory.anonymous(16 * MIB)
    rx = VirtioDriver(mem, 64, desc_table=0x10000, data_start=MIB, data_end=6 * MIB)
    tx = VirtioDriver(mem, 64, desc_table=0x20000, data_start=6 * MIB, data_end=12 * MIB)
    queues = [Queue(256), Queue(256)]
    rx.configure(queues[RX_QUEUE])
    tx.configure(queues[TX_QUEUE])
    events = EventLoop()
    events.start()
    interrupt = Interrupt()
    offloads: list[int] = []

    def record(fd: int, flags: int) -> None:
        offloads.append(flags)
        set_offload(fd, flags)

    dev = Net(open_tap(TAP_NAME, network.netns_path), events, GUEST_MAC, set_offload=record)
    try:
        dev.acked_features = dev.device_features()
        dev.activate(mem, queues, interrupt)
        assert offloads == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
        with dev.lock:
            head = rx.add_chain([], [2048])
            dev.process_queue(RX_QUEUE)
        # Like a guest, ask again until answered: right after the TAP gets its carrier the
        # kernel may still drop its reply (the TAP's qdisc is switched on asynchronously).
        reply = b""
        deadline = time.monotonic() + 20
        while not reply and time.monotonic() < deadline:
            with dev.lock:
                tx.add_chain([arp_request()], [])
                dev.process_queue(TX_QUEUE)
            asked = time.monotonic()
            while not reply and time.monotonic() - asked < 0.5:
                with dev.lock:
                    used = list(rx.used_entries())
                if used:
                    assert used[0].id == head
                    reply = rx.written(head, used[0].len)
                time.sleep(0.01)
        assert dev.stats.tx_frames >= 1 and dev.stats.tx_dropped == 0
        frame = reply[VNET_HDR_SIZE:]
        assert frame[:6] == GUEST_MAC  # to the guest
        assert frame[12:14] == b"\x08\x06"
        oper, sender_mac, sender_ip = struct.unpack_from("!6x H 6s 4s", frame, 14)
        assert oper == 2  # reply
        assert sender_mac == bytes.fromhex(TAP_MAC.replace(":", ""))
        assert socket.inet_ntoa(sender_ip) == GATEWAY_IP
    finally:
        dev.close()
        events.close()
        interrupt.close()
        mem.close()


def test_offload_flags_follow_the_drivers_features() -> None:
    assert tun_offload_flags(0) == 0
    csum = 1 << VIRTIO_NET_F_GUEST_CSUM
    assert tun_offload_flags(csum) == TUN_F_CSUM
    tso4 = 1 << VIRTIO_NET_F_GUEST_TSO4
    assert tun_offload_flags(tso4) == 0  # segmentation needs checksum offload too
    assert tun_offload_flags(csum | tso4) == TUN_F_CSUM | TUN_F_TSO4
    assert tun_offload_flags(csum | 1 << VIRTIO_NET_F_GUEST_TSO6) == TUN_F_CSUM | TUN_F_TSO6


def test_tap_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid interface name"):
        open_tap("x" * 16)
    with pytest.raises(ConfigError, match="network namespace"):
        open_tap("tap0", str(tmp_path / "no-such-ns"))
    with pytest.raises(ConfigError, match="cannot enter"):
        open_tap("tap0", str(tmp_path))  # a directory is no namespace


def test_opening_a_tap_leaves_the_callers_namespace_alone(network: SandboxNetwork) -> None:
    before = os.readlink("/proc/self/ns/net")
    fd = open_tap(TAP_NAME, network.netns_path)
    os.close(fd)
    assert os.readlink("/proc/self/ns/net") == before


def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (NetConfig(tap=""), "1 to 15 bytes"),
        (NetConfig(tap="a" * 16), "1 to 15 bytes"),
        (NetConfig(tap="tap0", netns="/nonexistent/ns"), "does not exist"),
        (NetConfig(tap="tap0", mac="02:00:00:00:00"), "six hex pairs"),
        (NetConfig(tap="tap0", mac="03:00:00:00:00:01"), "multicast"),
        (NetConfig(tap="tap0", guest_ip="172.16.0.2"), None),
        (NetConfig(tap="tap0", guest_ip="172.16.0.300/30"), "ADDR/PREFIX"),
        (NetConfig(tap="tap0", guest_ip="172.16.0.2/30", gateway="10.0.0.1"), "not another host"),
        (NetConfig(tap="tap0", guest_ip="172.16.0.2/30", gateway="172.16.0.2"), "not another"),
        (NetConfig(tap="tap0", gateway="172.16.0.1"), "needs a guest address"),
    ],
)
def test_net_config_is_validated(tmp_path: Path, net: NetConfig, message: str | None) -> None:
    config = VmConfig(kernel=kernel(tmp_path), net=net)
    if message is None:
        config.validate()
    else:
        with pytest.raises(ConfigError, match=message):
            config.validate()


def test_the_guest_address_reaches_ember_init_on_the_command_line(tmp_path: Path) -> None:
    net = NetConfig(tap="tap0", guest_ip="172.16.0.2/30", gateway="172.16.0.1")
    config = VmConfig(kernel=kernel(tmp_path), net=net)
    assert "ember.net=172.16.0.2/30,172.16.0.1" in config.full_cmdline().split()
    no_gateway = VmConfig(kernel=kernel(tmp_path), net=NetConfig("tap0", guest_ip="10.0.0.2/8"))
    assert "ember.net=10.0.0.2/8" in no_gateway.full_cmdline().split()
    assert "ember.net" not in VmConfig(kernel=kernel(tmp_path)).full_cmdline()


def test_a_snapshot_keeps_the_guest_side_and_takes_a_new_tap(tmp_path: Path) -> None:
    net = NetConfig(tap="old", netns="/run/netns/old", mac="02:00:00:00:00:09",
                    guest_ip="172.16.0.2/30", gateway="172.16.0.1")  # fmt: skip
    state = config_to_state(VmConfig(kernel=kernel(tmp_path), net=net))
    restored = config_from_state(state, vsock_uds=None, guest_cid=None, tap="tap0", netns="/x")
    assert restored.net == NetConfig("tap0", "/x", net.mac, net.guest_ip, net.gateway)
    with pytest.raises(SnapshotError, match="give it a TAP"):
        config_from_state(state, vsock_uds=None, guest_cid=None)
    plain = config_to_state(VmConfig(kernel=kernel(tmp_path)))
    with pytest.raises(SnapshotError, match="no network device"):
        config_from_state(plain, vsock_uds=None, guest_cid=None, tap="tap0")
