"""Every virtio device against a hostile driver, through virtio-mmio (issue 14, "Keep it fixed").

Hypothesis writes programs (``fuzz_strategies.py``) that boot each device right or wrong,
offer chains that alias, loop, nest indirect tables, wrap and lie about lengths, put
garbage in ring indices, kick at any time, reset and snapshot with requests in flight,
while the host side talks back; ``fuzz_harness.py`` plays them and checks after every op
that nothing escaped but through ``fail()``, that the op's work (chains popped, guest bytes
touched, madvise calls) and host memory (tracemalloc) stayed bounded, and that no fd
leaked.  This is the short, derandomized run (the same examples every time); the long one
is ``bench/fuzz.py --minutes N``.  The last tests show that the checks bite.
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from ember.devices.virtio.balloon.device import INFLATE_QUEUE, Balloon
from ember.devices.virtio.block.device import Block
from ember.devices.virtio.chain import DescriptorChain
from ember.devices.virtio.net.device import Net
from ember.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_HDR,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RW,
)
from tests.unit.fuzz_harness import FuzzFailure, run_program
from tests.unit.fuzz_ops import (
    DATA_START,
    GUEST_CID,
    GUEST_PORTS,
    LISTEN_PORTS,
    Chain,
    Host,
    Program,
    Seg,
    good_boot,
)
from tests.unit.fuzz_strategies import programs

EXAMPLES = 100  # per device: ~30 s for the four on two busy cores
CI = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def fuzz(device: str) -> Counter[str]:
    """Run the CI budget of programs for ``device``; the devices' counters, summed."""
    totals: Counter[str] = Counter()

    @CI
    @given(programs(device))
    def case(program: Program) -> None:
        result = run_program(program)
        totals.update(result.device_stats)
        totals["cases"] += 1
        totals["chains"] += result.work.pops

    # run_program collects garbage before each program; with the rest of the session's
    # objects frozen out of the collector's sight that takes ~1 ms instead of ~50-200 ms
    gc.collect()
    gc.freeze()
    try:
        case()
    finally:
        gc.unfreeze()
    return totals


# Each test also checks that the programs still reach deep into the device, so that a
# change to a device or to the strategies cannot quietly turn the fuzz into a no-op.


def test_blk_survives_a_hostile_driver() -> None:
    seen = fuzz("blk")
    assert seen["cases"] == EXAMPLES
    assert seen["read_bytes"] and seen["write_bytes"] and seen["flushes"] and seen["errors"]


def test_net_survives_a_hostile_driver() -> None:
    seen = fuzz("net")
    assert seen["cases"] == EXAMPLES
    assert seen["tx_frames"] and seen["rx_frames"] and seen["tx_bad"] and seen["rx_bad_chains"]


def test_vsock_survives_a_hostile_driver() -> None:
    seen = fuzz("vsock")
    assert seen["cases"] == EXAMPLES
    assert seen["tx_bytes"] and seen["rx_bytes"] and seen["connections"] and seen["bad_packets"]
    assert seen["resets_received"]


def _vsock_packet(op: int, size: int = 0) -> Chain:
    header = VIRTIO_VSOCK_HDR.pack(
        GUEST_CID, 2, GUEST_PORTS[0], LISTEN_PORTS[0], size, 1, op, 0, 262144, 0
    )
    return Chain(1, (Seg(44 + size, False, header + bytes(size)),))


def test_vsock_resets_a_guest_that_overruns_its_credit_through_the_harness() -> None:
    """Whether random programs overrun the window depends on how much the host's socket
    buffers take (``net.core.wmem_default`` differs between machines); this one always does:
    the guest's only RX buffer carries the RESPONSE, so no credit update can reach it, and it
    sends 1 MiB against a 256 KiB window while the host never reads."""
    program = Program(
        "vsock",
        (
            good_boot("vsock"),
            Chain(0, (Seg(44, True), Seg(4096, True))),
            _vsock_packet(VIRTIO_VSOCK_OP_REQUEST),
            Host("accept"),
            *[_vsock_packet(VIRTIO_VSOCK_OP_RW, 65536)] * 16,
        ),
    )
    stats = run_program(program).device_stats
    assert stats["connections"] == 1
    assert stats["credit_violations"] == 1


def test_balloon_survives_a_hostile_driver() -> None:
    seen = fuzz("balloon")
    assert seen["cases"] == EXAMPLES
    assert seen["inflated_pages"] and seen["reported_bytes"] and seen["stats_updates"]
    assert seen["refused_requests"]


# -- the checks bite ----------------------------------------------------------------------------

ALIASED_PFNS = Chain(
    INFLATE_QUEUE, (Seg(4096, False, bytes(range(256)) * 16, DATA_START),), repeat=256
)


def test_work_in_proportion_to_a_claimed_length_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The balloon before issue 14 item 1: every PFN of a chain read, however long it claims
    to be; 256 descriptors aliasing one page are a 1 MiB request for 4 KiB of guest RAM."""
    program = Program("balloon", (good_boot("balloon"), ALIASED_PFNS))
    assert run_program(program).work.pops == 1  # refused whole, as it should be

    def read_everything(self: Balloon, chain: DescriptorChain) -> list[int]:
        memory = self.memory
        assert memory is not None
        data = b"".join(memory.read(addr, length) for addr, length in chain.readable)
        return list(memoryview(data).cast("I"))

    monkeypatch.setattr(Balloon, "_pfns", read_everything)
    with pytest.raises(FuzzFailure, match="bytes of guest memory for 1 chains"):
        run_program(program)


def test_an_exception_out_of_a_kick_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: Block, chain: DescriptorChain) -> int:
        raise IndexError("a bug")

    monkeypatch.setattr(Block, "_handle", crash)
    program = Program("blk", (good_boot("blk"), Chain(0, (Seg(16, False), Seg(1, True)))))
    with pytest.raises(FuzzFailure, match="IndexError"):
        run_program(program)


def test_memory_kept_by_a_device_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    hoard: list[bytes] = []

    def keep(self: Block, chain: DescriptorChain) -> int:
        hoard.append(bytes(1 << 20))  # 1 MiB kept per request
        return 0

    monkeypatch.setattr(Block, "_handle", keep)
    request = Chain(0, (Seg(16, False), Seg(1, True)))
    program = Program("blk", (good_boot("blk"), *[request] * 12))
    with pytest.raises(FuzzFailure, match="allocated and kept"):
        run_program(program)


def test_an_fd_the_device_never_drains_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """virtio-net watching its TAP with nowhere to put a frame and not stopping: the real
    event thread would spin on the readable fd."""
    monkeypatch.setattr(Net, "_on_readable", lambda self: None)
    program = Program("net", (good_boot("net"), Host("frame")))
    with pytest.raises(FuzzFailure, match="BusyLoop"):
        run_program(program)
