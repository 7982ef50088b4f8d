"""Whether a restore needs an in-kernel PIT, from the saved irqchips alone (no KVM).

The states are built the way KVM reports them: ``kvm_irqchip`` blobs whose ``chip`` is a
``kvm_pic_state`` or a ``kvm_ioapic_state``, as ``capture_vm`` saves them.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from ember.kvm import abi
from ember.snapshot.format import blob
from ember.snapshot.kvm_state import needs_pit

MASKED = abi.IOAPIC_REDIR_MASKED


def _chip(chip_id: int, state: ctypes.Structure) -> str:
    chip = abi.kvm_irqchip(chip_id=chip_id)
    raw = bytes(state)
    ctypes.memmove(chip.chip, raw, len(raw))
    return blob(chip)


def vm_state(
    *, pic_imr: int = 0xFB, pins: dict[int, int] | None = None, pit: bool = True
) -> dict[str, Any]:
    """A saved VM as Linux leaves it after boot: the PIT's lines masked, virtio pins live."""
    ioapic = abi.kvm_ioapic_state()
    for pin in range(abi.KVM_IOAPIC_NUM_PINS):
        ioapic.redirtbl[pin] = MASKED
    for pin, entry in (pins or {}).items():
        ioapic.redirtbl[pin] = entry
    return {
        "irqchips": [
            _chip(abi.KVM_IRQCHIP_PIC_MASTER, abi.kvm_pic_state(imr=pic_imr)),
            _chip(abi.KVM_IRQCHIP_PIC_SLAVE, abi.kvm_pic_state(imr=0xFF)),
            _chip(abi.KVM_IRQCHIP_IOAPIC, ioapic),
        ],
        "pit2": blob(abi.kvm_pit_state2()) if pit else None,
        "clock": "",
    }


def test_a_guest_that_masked_the_pit_everywhere_goes_without_one() -> None:
    # IRQ 0 masked in the PIC (imr 0xfb: only the cascade open), pins 0 and 2 masked,
    # the virtio devices' pins 5-8 live: the default template's state.
    live = {pin: 0x0100_0000_0000_0822 for pin in (4, 5, 6, 7, 8)}
    assert needs_pit(vm_state(pins=live)) is False


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(vm_state(pic_imr=0xFA), id="IRQ 0 open in the master PIC"),
        pytest.param(vm_state(pins={2: 0x30}), id="I/O APIC pin 2 (GSI 0) unmasked"),
        pytest.param(vm_state(pins={0: 0x30}), id="I/O APIC pin 0 unmasked"),
    ],
)
def test_a_guest_that_can_still_hear_the_pit_keeps_it(state: dict[str, Any]) -> None:
    assert needs_pit(state) is True


def test_a_vm_saved_without_a_pit_is_restored_without_one() -> None:
    # A sandbox restored without a PIT and snapshotted again (fork, sb.snapshot).
    assert needs_pit(vm_state(pic_imr=0x00, pins={2: 0x30}, pit=False)) is False


@pytest.mark.parametrize(
    "state",
    [
        None,
        [],
        {"pit2": "x"},
        {"pit2": "x", "irqchips": ["not base64 of a chip"]},
        {"pit2": "x", "irqchips": 7},
    ],
)
def test_state_it_cannot_read_keeps_the_pit(state: Any) -> None:
    # restore_vm then names what is wrong; needs_pit never raises for it.
    assert needs_pit(state) is True
