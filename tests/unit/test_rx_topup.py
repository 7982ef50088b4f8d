"""template_warm.top_up_rx: the guest's vsock receive queue is left nearly full in a template.

A fake VMM plays Linux's driver (refill to the ring's size once fewer than half are left,
``virtio_vsock_rx_fill``), a fake client's ping uses one buffer; the real thing is what a
template build runs (tests/integration: a restored sandbox starts with its queue topped up).
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from ember.client import AgentClient
from ember.launcher import VmmProcess
from ember.template_warm import rx_buffers, top_up_rx


class FakeGuest:
    def __init__(self, left: int, size: int = 256, *, refills: bool = True) -> None:
        self.left, self.size, self.refills = left, size, refills
        self.pings = 0

    def control(self, op: str) -> dict[str, Any]:
        assert op == "status"
        return {"devices": {"Vsock": {"rx_buffers": self.left, "rx_queue_size": self.size}}}

    def ping(self) -> dict[str, Any]:
        self.pings += 1
        self.left -= 1
        if self.refills and self.left < self.size // 2:
            self.left = self.size
        return {}


def top_up(guest: FakeGuest) -> int:
    return top_up_rx(cast(VmmProcess, guest), cast(AgentClient, guest))


@pytest.mark.parametrize("left", [128, 129, 150, 192, 230, 247])
def test_unless_nearly_full_the_queue_is_made_to_refill(left: int) -> None:
    """Every build leaves the same count, whatever its own requests left."""
    guest = FakeGuest(left)
    sent = top_up(guest)
    assert sent == guest.pings == left - 127  # down to 127, where the driver refills
    assert guest.left == 256


@pytest.mark.parametrize("left", [248, 255, 256])
def test_a_nearly_full_queue_gets_no_ping(left: int) -> None:
    guest = FakeGuest(left)
    assert top_up(guest) == 0
    assert guest.left == left


def test_a_refill_the_guest_makes_a_moment_later_is_waited_for() -> None:
    """The driver refills in a kworker after the packet that crossed the mark: the count
    read right after that ping may still be low, and one more ping finds it full."""
    guest = FakeGuest(130)
    late = {"due": False}

    def ping() -> dict[str, Any]:
        if late["due"]:
            guest.left = guest.size
        guest.pings += 1
        guest.left -= 1
        late["due"] = guest.left < guest.size // 2
        return {}

    guest.ping = ping  # type: ignore[method-assign]
    assert top_up(guest) == 4  # 129, 128, 127 (refill under way), then 255
    assert guest.left == 255


def test_a_driver_that_never_refills_is_not_pinged_forever() -> None:
    guest = FakeGuest(150, refills=False)
    assert top_up(guest) == 257
    assert guest.pings == 257


def test_a_vmm_that_does_not_count_gets_no_ping() -> None:
    guest = FakeGuest(129)
    guest.control = lambda op: {"devices": {"Vsock": {"rx_packets": 3}}}  # type: ignore[method-assign]
    assert rx_buffers(cast(VmmProcess, guest)) is None
    assert top_up(guest) == 0
    assert guest.pings == 0
