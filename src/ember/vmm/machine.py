"""A running VM: owns KVM objects, memory, devices and vCPU threads.

Created only by :func:`ember.vmm.builder.build_machine`.  :meth:`Machine.run`
starts the vCPUs and blocks until the first stop reason arrives (guest
reset, triple fault, emulation failure, host request); everything is then
torn down in reverse order, whatever happened.
"""

from __future__ import annotations

import logging
import queue
import threading

from ember.devices.bus import Bus
from ember.kvm.system import Kvm, Vcpu, Vm
from ember.memory import GuestMemory
from ember.vmm.console import ConsoleSink
from ember.vmm.event_loop import EventLoop
from ember.vmm.state import StopKind, StopReason, VmState
from ember.vmm.vcpu import VcpuThread, install_kick_handler
from ember.vmm.virtio_slots import VirtioSlots

log = logging.getLogger(__name__)


class Machine:
    def __init__(
        self,
        kvm: Kvm,
        vm: Vm,
        memory: GuestMemory,
        vcpus: list[Vcpu],
        pio: Bus,
        mmio: Bus,
        console: ConsoleSink,
        events: EventLoop,
        slots: VirtioSlots,
    ) -> None:
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.console = console
        self.events = events
        self.slots = slots
        self.state = VmState.CREATED
        self._stops: queue.Queue[StopReason] = queue.Queue()
        self._lock = threading.Lock()
        self.vcpu_threads = [VcpuThread(v, pio, mmio, self.request_stop) for v in vcpus]

    def request_stop(self, reason: StopReason) -> None:
        """Thread-safe: the first reason wins; later ones are logged only."""
        self._stops.put(reason)

    def guest_reset(self) -> None:
        """The guest pulsed the reset line (i8042 0xFE)."""
        self.request_stop(StopReason(StopKind.REBOOT, "i8042 reset"))

    def run(self, timeout: float | None = None) -> StopReason:
        if self.state is not VmState.CREATED:
            raise RuntimeError(f"cannot run a machine that is {self.state.value}")
        install_kick_handler()
        self.state = VmState.RUNNING
        try:
            self.events.start()
            for thread in self.vcpu_threads:
                thread.start()
            try:
                reason = self._stops.get(timeout=timeout)
            except queue.Empty:
                reason = StopReason(StopKind.TIMEOUT, f"after {timeout} s")
            return self._classify(reason)
        except KeyboardInterrupt:
            return StopReason(StopKind.HOST_REQUEST, "interrupted")
        finally:
            self.state = VmState.STOPPING
            self._stop_vcpus()
            self.console.flush()
            self.close()

    def _classify(self, reason: StopReason) -> StopReason:
        """A reboot right after a panic message is the panic, not a clean reboot.

        ember-init passes the workload's exit status as the restart command
        (``ember-exit=N``), which the kernel prints on its way down.
        """
        if reason.kind is StopKind.REBOOT and self.console.panic_line is not None:
            return StopReason(StopKind.PANIC, self.console.panic_line.decode("utf-8", "replace"))
        if reason.kind is StopKind.REBOOT and self.console.exit_status is not None:
            return StopReason(reason.kind, reason.detail, reason.vcpu, self.console.exit_status)
        return reason

    def _stop_vcpus(self) -> None:
        for thread in self.vcpu_threads:
            thread.kick()
        for thread in self.vcpu_threads:
            while thread.thread.is_alive():
                thread.thread.join(0.05)
                if thread.thread.is_alive():
                    thread.kick()  # the signal may have landed before KVM_RUN was entered

    def close(self) -> None:
        """Release every fd and mapping; safe to call twice."""
        with self._lock:
            if self.state is VmState.STOPPED:
                return
            self.events.close()
            self.slots.close()
            for thread in self.vcpu_threads:
                thread.vcpu.close()
            self.vm.close()
            self.memory.close()
            self.kvm.close()
            self.state = VmState.STOPPED
