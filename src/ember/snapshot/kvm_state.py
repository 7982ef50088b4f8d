"""What KVM holds for a VM, captured from a paused VM and put back into a new one.

Per vCPU: registers, segment registers, FPU (and XSAVE area and XCRs where
KVM has them), debug registers, LAPIC, MSRs, pending events and MP state.
Per VM: the two PICs, the I/O APIC, the PIT and the kvmclock.  The restore
order follows what KVM needs: CPUID before MSRs (which it validates against
CPUID), LAPIC before MSRs (TSC_DEADLINE lives in the LAPIC), events last.

A restored VM gets a PIT only if its guest can still hear one (:func:`needs_pit`). Linux
uses the PIT while it boots, then ticks from the LAPIC timer and masks the PIT's line in
both PICs and the I/O APIC. An in-kernel PIT costs a host kernel thread per VM and, under
kvm_pvm, ~15 ms of the VM's teardown (``KVM_CREATE_PIT2`` then close: 15 ms; without it
0.4 ms); nothing the guest does afterwards can tell it is gone: its ports then exit to the
VMM, which ignores them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ember.errors import SnapshotError
from ember.kvm import abi
from ember.kvm.system import Kvm, Vcpu, Vm
from ember.snapshot.format import blob, unblob

log = logging.getLogger(__name__)

_IRQCHIPS = (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)


def capture_vcpu(kvm: Kvm, vcpu: Vcpu, cpuid: list[abi.kvm_cpuid_entry2]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "cpuid": [blob(entry) for entry in cpuid],
        "mp_state": blob(vcpu.get_mp_state()),
        "regs": blob(vcpu.get_regs()),
        "sregs": blob(vcpu.get_sregs()),
        "fpu": blob(vcpu.get_fpu()),
        "lapic": blob(vcpu.get_lapic()),
        "msrs": {str(k): v for k, v in vcpu.get_msrs(kvm.msr_index_list()).items()},
        "vcpu_events": blob(vcpu.get_vcpu_events()),
    }
    if kvm.check_extension(abi.KVM_CAP_XSAVE):
        state["xsave"] = blob(vcpu.get_xsave())
    if kvm.check_extension(abi.KVM_CAP_XCRS):
        state["xcrs"] = blob(vcpu.get_xcrs())
    if kvm.check_extension(abi.KVM_CAP_DEBUGREGS):
        state["debugregs"] = blob(vcpu.get_debugregs())
    try:
        state["tsc_khz"] = vcpu.get_tsc_khz()
    except Exception:  # not every KVM reports it; the guest then keeps the host's rate
        state["tsc_khz"] = None
    return state


def restore_vcpu(vcpu: Vcpu, state: dict[str, Any]) -> None:
    try:
        cpuid = [unblob(abi.kvm_cpuid_entry2, e) for e in state["cpuid"]]
        vcpu.set_cpuid2(cpuid)
        tsc_khz = state.get("tsc_khz")
        if tsc_khz:
            try:
                if vcpu.get_tsc_khz() != tsc_khz:
                    vcpu.set_tsc_khz(tsc_khz)
            except Exception:
                log.warning("cannot set the guest TSC to %d kHz; its clock may drift", tsc_khz)
        vcpu.set_mp_state(unblob(abi.kvm_mp_state, state["mp_state"]))
        vcpu.set_regs(unblob(abi.kvm_regs, state["regs"]))
        vcpu.set_sregs(unblob(abi.kvm_sregs, state["sregs"]))
        vcpu.set_fpu(unblob(abi.kvm_fpu, state["fpu"]))
        if "xsave" in state:
            vcpu.set_xsave(unblob(abi.kvm_xsave, state["xsave"]))
        if "xcrs" in state:
            vcpu.set_xcrs(unblob(abi.kvm_xcrs, state["xcrs"]))
        if "debugregs" in state:
            vcpu.set_debugregs(unblob(abi.kvm_debugregs, state["debugregs"]))
        vcpu.set_lapic(unblob(abi.kvm_lapic_state, state["lapic"]))
        msrs = {int(k): int(v) for k, v in state["msrs"].items()}
        if vcpu.set_msrs(msrs) != len(msrs):
            for index, value in msrs.items():
                if vcpu.set_msrs({index: value}) != 1:
                    log.debug("restore: KVM refused MSR %#x", index)
        vcpu.set_vcpu_events(unblob(abi.kvm_vcpu_events, state["vcpu_events"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"snapshot vCPU {vcpu.index} state is incomplete: {exc!r}") from None


# Where the PIT's output (GSI 0) arrives: IRQ 0 of the master PIC, pin 2 of the I/O APIC
# (KVM's default routing; pin 0 too, for a guest that wired it as a PC does not).
_PIT_PIC_IRQ = 0
_PIT_IOAPIC_PINS = (0, 2)


def needs_pit(state: Any) -> bool:
    """Whether a restore of this saved VM state needs an in-kernel PIT: it had one, and its
    guest has not masked the PIT's interrupt everywhere it could arrive.

    State that cannot be read says yes: :func:`restore_vm` then reports what is wrong.
    """
    if not isinstance(state, dict):
        return True
    if state.get("pit2") is None:
        return False
    try:
        for text in state["irqchips"]:
            chip = unblob(abi.kvm_irqchip, text)
            raw = bytes(chip.chip)
            if chip.chip_id == abi.KVM_IRQCHIP_PIC_MASTER:
                pic = abi.kvm_pic_state.from_buffer_copy(raw)
                if not pic.imr & 1 << _PIT_PIC_IRQ:
                    return True
            elif chip.chip_id == abi.KVM_IRQCHIP_IOAPIC:
                ioapic = abi.kvm_ioapic_state.from_buffer_copy(raw)
                for pin in _PIT_IOAPIC_PINS:
                    if not ioapic.redirtbl[pin] & abi.IOAPIC_REDIR_MASKED:
                        return True
    except (KeyError, TypeError, ValueError, SnapshotError):
        return True
    return False


def capture_vm(vm: Vm) -> dict[str, Any]:
    clock = vm.get_clock()
    return {
        "irqchips": [blob(vm.get_irqchip(chip)) for chip in _IRQCHIPS],
        "pit2": blob(vm.get_pit2()) if vm.has_pit else None,  # None: restored without one
        "clock": blob(clock),
        "clock_realtime_ns": time.clock_gettime_ns(time.CLOCK_REALTIME),
    }


def restore_vm(vm: Vm, state: dict[str, Any]) -> None:
    """Irqchip and PIT (if ``vm`` has one) as saved; kvmclock moved on by the wall time
    since the snapshot.

    A guest restored an hour after its template was made should not believe
    it is an hour earlier: its monotonic clock jumps forward instead, which
    Linux handles like a long pause.
    """
    try:
        for text in state["irqchips"]:
            vm.set_irqchip(unblob(abi.kvm_irqchip, text))
        if vm.has_pit:
            vm.set_pit2(unblob(abi.kvm_pit_state2, state["pit2"]))
        clock = unblob(abi.kvm_clock_data, state["clock"])
        elapsed = time.clock_gettime_ns(time.CLOCK_REALTIME) - int(state["clock_realtime_ns"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot VM state is incomplete: {exc!r}") from None
    vm.set_clock(abi.kvm_clock_data(clock=clock.clock + max(0, elapsed), flags=0))
