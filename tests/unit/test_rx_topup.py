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


@pytest.mark.parametrize("left", [129, 130, 150, 192])
def test_a_queue_near_the_mark_is_made_to_refill(left: int) -> None:
    guest = FakeGuest(left)
    sent = top_up(guest)
    assert sent == guest.pings == left - 127  # down to 127, where the driver refills
    assert guest.left == 256


@pytest.mark.parametrize("left", [193, 255, 256])
def test_a_full_enough_queue_gets_no_ping(left: int) -> None:
    guest = FakeGuest(left)
    assert top_up(guest) == 0
    assert guest.left == left


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
