"""Each device behind its virtio-mmio transport, with what stands in for its host side, and
instruments that count the work the device does (for :mod:`tests.unit.fuzz_harness`).

The host sides are deterministic: the event loop is not a thread but :class:`ManualLoop`,
run until idle after each host-side op; vsock's timers are either far away or already due.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.devices.virtio.balloon.device import STAT_TAGS, Balloon
from ember.devices.virtio.block.device import SECTOR_SIZE, Block
from ember.devices.virtio.chain import DescriptorChain
from ember.devices.virtio.device import Interrupt, VirtioDevice
from ember.devices.virtio.mmio import MmioTransport
from ember.devices.virtio.net.device import Net
from ember.devices.virtio.queue import Queue, QueueError
from ember.devices.virtio.vsock import Vsock
from ember.memory import GuestMemory, Region
from ember.vmm.event_loop import EventLoop
from tests.unit.fuzz_ops import (
    DISK_SECTORS,
    GUEST_CID,
    LISTEN_PORTS,
    LOW_SIZE,
    MAX_ALLOC,
    U32,
    Program,
)

VSOCK_MAX_CONNECTIONS = 8
VSOCK_TX_BUDGET = 1 << 20
MAC = bytes.fromhex("02ee00000001")
_PATTERN = bytes(range(251)) * (MAX_ALLOC // 251 + 1)


def pattern(n: int) -> bytes:
    """Recognisable payload bytes (a prime period), at most MAX_ALLOC of them."""
    return _PATTERN[: max(0, min(n, MAX_ALLOC))]


# -- instruments --------------------------------------------------------------------------------


@dataclass
class Work:
    """Operations counted on the device's side of guest memory and the rings."""

    pops: int = 0  # chains taken off a ring (returned, or refused as malformed)
    bytes: int = 0  # guest memory read, written or mapped into a view
    accesses: int = 0
    discards: int = 0  # madvise(MADV_DONTNEED) calls

    def since(self, before: Work) -> Work:
        return Work(
            self.pops - before.pops,
            self.bytes - before.bytes,
            self.accesses - before.accesses,
            self.discards - before.discards,
        )

    def copy(self) -> Work:
        return self.since(Work())


class CountingMemory(GuestMemory):
    """The guest memory the device sees: every access it makes is counted in ``work``."""

    def __init__(self, regions: list[Region], work: Work) -> None:
        super().__init__(regions)
        self.work = work

    def read(self, addr: int, length: int) -> bytes:
        data = super().read(addr, length)
        self.work.accesses += 1
        self.work.bytes += len(data)
        return data

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        super().write(addr, data)
        self.work.accesses += 1
        self.work.bytes += len(data)

    def fill(self, addr: int, length: int, byte: int) -> None:
        super().fill(addr, length, byte)
        self.work.accesses += 1
        self.work.bytes += length

    def view(self, addr: int, length: int) -> memoryview:
        view = super().view(addr, length)
        self.work.accesses += 1
        self.work.bytes += length
        return view

    def discard(self, addr: int, length: int) -> None:
        self.work.discards += 1
        super().discard(addr, length)


class CountingQueue(Queue):
    """A virtqueue that counts the chains popped off it (good ones and malformed ones)."""

    def __init__(self, max_size: int, work: Work) -> None:
        self.work = work
        super().__init__(max_size)

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        try:
            chain = super().pop(mem)
        except QueueError:
            self.work.pops += 1
            raise
        if chain is not None:
            self.work.pops += 1
        return chain


class BusyLoop(AssertionError):
    """An fd stays ready however often its callback runs: the event thread would spin."""


SPIN_ROUNDS = 64  # rounds of callbacks after which an fd still ready counts as a spin


class ManualLoop(EventLoop):
    """The event loop without its thread: readers run when the program says so."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def run_ready(self, wait_ms: int = 0) -> None:
        """Call the readers of ready fds until none is ready (the event thread going idle).

        The fds are level-triggered, as in :class:`EventLoop`: one that is still ready
        after :data:`SPIN_ROUNDS` rounds is one the device cannot act on and does not stop
        watching, which would keep the real event thread busy: :class:`BusyLoop`.
        """
        for i in range(SPIN_ROUNDS):
            poller = select.poll()
            for fd in self.readers:
                poller.register(fd, select.POLLIN)
            ready = poller.poll(wait_ms if i == 0 else 0)
            if not ready:
                return
            for fd, _ in ready:
                callback = self.readers.get(fd)
                if callback is not None:
                    callback()
        raise BusyLoop(f"fds {[fd for fd, _ in ready]} still ready after {SPIN_ROUNDS} rounds")


# -- the rigs -----------------------------------------------------------------------------------


class Rig:
    """One device behind its transport; ``host(action, arg)`` plays its host side."""

    kind = ""

    def __init__(self, program: Program, tmp: Path, mem: CountingMemory) -> None:
        self.program = program
        self.tmp = tmp
        self.mem = mem
        self.loop = ManualLoop()
        self.retired_stats: dict[str, int] = {}  # counters of the devices a restore replaced
        self.setup()
        self.device = self.make_device()
        self.interrupt = Interrupt()
        self.transport = self.attach(self.device, self.interrupt)

    # -- what each kind provides
    def setup(self) -> None:
        """Host resources that outlive a device (a disk, listening services)."""

    def make_device(self) -> VirtioDevice:
        raise NotImplementedError

    def close_device(self) -> None:
        """Close the device and the host side that belongs to it alone."""

    def host(self, action: str, arg: int) -> None:
        """A host-side event; then whatever became ready is served."""
        self.pump()

    def pump(self) -> None:
        self.loop.run_ready()

    def check(self) -> str | None:
        """A device-specific bound that does not hold, or None."""
        return None

    def teardown(self) -> None:
        """Close what :meth:`setup` opened."""

    # -- shared
    def attach(self, device: VirtioDevice, interrupt: Interrupt) -> MmioTransport:
        transport = MmioTransport(device, self.mem, interrupt)
        transport.queues = [CountingQueue(size, self.mem.work) for size in device.queue_max_sizes]
        return transport

    def restore(self, shift: int) -> dict[int, int]:
        """Snapshot the device (through JSON, as the state file does) and restore it into a
        fresh one with a fresh host side, as ``ember boot --restore`` would.

        ``shift`` moves every queue's free-running indices, as in a VM that ran for long;
        returns each queue's restored ``next_used`` so that the driver can follow.
        """
        state: dict[str, Any] = json.loads(json.dumps(self.transport.save_state()))
        used: dict[int, int] = {}
        for index, queue in enumerate(state["queues"]):
            for name in ("next_avail", "next_used", "signalled_used"):
                queue[name] = (int(queue[name]) + shift) & 0xFFFF
            used[index] = queue["next_used"]
        self.retired_stats = self.device_stats()
        self.close_device()
        self.interrupt.close()
        self.device = self.make_device()
        self.interrupt = Interrupt()
        self.transport = self.attach(self.device, self.interrupt)
        self.transport.load_state(state)
        return used

    def device_stats(self) -> dict[str, int]:
        """The device's own counters (``stats``), summed over the devices restores replaced."""
        total = dict(self.retired_stats)
        stats = getattr(self.device, "stats", None)
        for name, value in (vars(stats) if stats is not None else {}).items():
            total[name] = total.get(name, 0) + int(value)
        return total

    def close(self) -> None:
        self.close_device()
        self.interrupt.close()
        self.teardown()
        self.loop.close()


class BlkRig(Rig):
    kind = "blk"

    def setup(self) -> None:
        self.disk = self.tmp / "disk"
        self.disk.write_bytes(pattern(DISK_SECTORS * SECTOR_SIZE))

    def make_device(self) -> VirtioDevice:
        self.blk = Block(self.disk, read_only=self.program.read_only, serial="fuzz")
        return self.blk

    def close_device(self) -> None:
        self.blk.close()


NET_FRAME_SIZES = (60, 1514, 4000, 65535, 0, 1, 65550, 70000)


class NetRig(Rig):
    """virtio-net over a SOCK_SEQPACKET pair standing in for the TAP (one frame a message)."""

    kind = "net"

    def make_device(self) -> VirtioDevice:
        self.backend, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.backend.setblocking(False)
        self.net = Net(tap.detach(), self.loop, MAC)
        return self.net

    def close_device(self) -> None:
        self.net.close()
        self.backend.close()

    def host(self, action: str, arg: int) -> None:
        try:
            if action == "frame":  # the network sends the guest a frame (vnet header first)
                self.backend.send(bytes(12) + pattern(NET_FRAME_SIZES[arg % 8]))
            elif action == "drain":  # the network takes what the guest sent
                while self.backend.recv(1 << 17):
                    pass
        except OSError:
            pass  # the backend is full or empty: as on a real TAP
        self.pump()


VSOCK_LINES = (
    b"CONNECT 1000\n", b"CONNECT 1001\n", b"CONNECT 1000\n", b"CONNECT 1001\n",
    b"RESUME 1000\n", b"CONNECT 52\n", b"HELLO\n", b"CONNECT 1000", b"\xff" * 40,
)  # fmt: skip
VSOCK_SEND_SIZES = (100, 4096, 65536, 1, 300_000)


class VsockRig(Rig):
    """vsock with host Unix sockets in a temp dir: services listening at ``<uds>_P`` (whose
    accepted connections become peers), and host clients that CONNECT to guest ports."""

    kind = "vsock"

    def setup(self) -> None:
        self.uds = self.tmp / "v.sock"
        self.peers: list[socket.socket] = []
        self.listeners: dict[int, socket.socket] = {}
        for port in LISTEN_PORTS:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listeners[port] = listener
            listener.bind(f"{self.uds}_{port}")
            listener.listen(2)  # a short backlog: the guest's connects can be refused
            listener.setblocking(False)

    def make_device(self) -> VirtioDevice:
        timeout = self.program.timeouts
        self.vsock = Vsock(
            GUEST_CID,
            self.uds,
            self.loop,
            max_connections=VSOCK_MAX_CONNECTIONS,
            connect_timeout=timeout,
            close_timeout=timeout,
            linger_timeout=timeout,
            tx_budget=VSOCK_TX_BUDGET,
        )
        return self.vsock

    def close_device(self) -> None:
        self.vsock.close()

    def teardown(self) -> None:
        for sock in [*self.peers, *self.listeners.values()]:
            sock.close()

    def host(self, action: str, arg: int) -> None:
        try:
            self._host(action, arg)
        except OSError:
            pass  # the host's own sockets: refused, full, reset by the device
        self.pump()

    def _host(self, action: str, arg: int) -> None:
        if action == "accept":
            for listener in self.listeners.values():
                while len(self.peers) < 32:
                    sock, _ = listener.accept()  # BlockingIOError once none is waiting
                    sock.setblocking(False)
                    self.peers.append(sock)
        elif action == "connect" and len(self.peers) < 32:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            self.peers.append(client)
            client.connect(str(self.uds))
            client.send(VSOCK_LINES[arg % len(VSOCK_LINES)])
        elif action == "unlisten":
            gone = self.listeners.pop(LISTEN_PORTS[arg % len(LISTEN_PORTS)], None)
            if gone is not None:
                gone.close()
        elif self.peers:
            peer = self.peers[arg % len(self.peers)]
            if action == "send":
                peer.send(pattern(VSOCK_SEND_SIZES[arg % len(VSOCK_SEND_SIZES)]))
            elif action == "recv":
                while peer.recv(1 << 17):
                    pass
            elif action == "shutdown":
                peer.shutdown(socket.SHUT_WR)
            elif action == "close":
                self.peers.remove(peer)
                peer.close()

    def pump(self) -> None:
        due = self.vsock.muxer.timer.armed_at
        # A timeout of 0 is due at once: wait (briefly) for the timerfd to say so.
        wait = 100 if due is not None and due <= time.monotonic() else 0
        self.loop.run_ready(wait_ms=wait)

    def check(self) -> str | None:
        muxer = self.vsock.muxer
        budget = muxer.budget
        if not 0 <= budget.held <= budget.total:
            return f"vsock budget holds {budget.held} of {budget.total}"
        if muxer.buffered_bytes() > budget.held:
            return f"vsock buffers {muxer.buffered_bytes()} bytes, its windows {budget.held}"
        if muxer.open_connections() > VSOCK_MAX_CONNECTIONS:
            return f"vsock has {muxer.open_connections()} connections"
        return None


BALLOON_TARGETS = (0, 256, LOW_SIZE // 4096, 1, 1 << 20, U32)


class BalloonRig(Rig):
    kind = "balloon"

    def make_device(self) -> VirtioDevice:
        self.balloon = Balloon()
        return self.balloon

    def host(self, action: str, arg: int) -> None:
        if action == "target":
            self.balloon.set_target(BALLOON_TARGETS[arg % len(BALLOON_TARGETS)])
        elif action == "stats":
            self.balloon.request_stats()

    def check(self) -> str | None:
        unknown = set(self.balloon.guest_stats) - set(STAT_TAGS.values())
        return f"balloon keeps unknown stats {sorted(unknown)}" if unknown else None


RIGS: dict[str, type[Rig]] = {
    "blk": BlkRig,
    "net": NetRig,
    "vsock": VsockRig,
    "balloon": BalloonRig,
}
VSOCK_ACTIONS = (
    "connect", "connect", "send", "send", "recv", "accept", "accept", "pump", "pump",
    "shutdown", "close", "unlisten",
)  # fmt: skip
#: What a program's Host ops may do, per device (repeated: more often).
HOST_ACTIONS = {
    "blk": ("pump",),
    "net": ("frame", "frame", "frame", "drain", "pump"),
    "vsock": VSOCK_ACTIONS,
    "balloon": ("target", "stats", "stats"),
}
