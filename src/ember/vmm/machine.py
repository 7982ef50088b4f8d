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
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ember.devices.bus import Bus
from ember.devices.legacy.page_clear import PageClear
from ember.devices.legacy.serial import Serial8250
from ember.errors import KvmError, SnapshotError
from ember.kvm import abi
from ember.kvm.stats import StatsFile
from ember.kvm.stats import total as stats_total
from ember.kvm.system import Kvm, Vcpu, Vm
from ember.memory import GuestMemory
from ember.vmm.config import VmConfig
from ember.vmm.console import ConsoleSink
from ember.vmm.event_loop import EventLoop
from ember.vmm.shm import SharedRegion
from ember.vmm.state import StopKind, StopReason, VmState
from ember.vmm.vcpu import VcpuThread, install_kick_handler
from ember.vmm.virtio_slots import VirtioSlots

log = logging.getLogger(__name__)
_D = TypeVar("_D")


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
        *,
        config: VmConfig,
        serial: Serial8250,
        cpuids: list[list[abi.kvm_cpuid_entry2]],
    ) -> None:
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.console = console
        self.events = events
        self.slots = slots
        self.config = config
        self.serial = serial
        self.cpuids = cpuids
        self.shm: SharedRegion | None = None  # memory channels' region (set by the builder)
        self.page_clear: PageClear | None = None  # the guest kernel's page clearing (builder)
        # What of a restore was made before its request (snapshot.premade, vmm.vm_shell):
        # "memory", "vm", "vcpus".
        self.made_ahead: list[str] = []
        # The pages the first execs write (ember.snapshot.prefault.EXEC_FILES), a list of
        # (first page, count) runs of the memory file for each, copied when asked.
        self.exec_prefault: list[list[tuple[int, int]]] = []
        self.state = VmState.CREATED
        self._stops: queue.Queue[StopReason] = queue.Queue()
        self._lock = threading.Lock()
        self.vcpu_threads = [VcpuThread(v, pio, mmio, self.request_stop) for v in vcpus]
        # Opened now: a vCPU ioctl waits for its KVM_RUN to return, which an idle guest's
        # never does; reading an open stats fd takes no lock.
        self._stats = _open_stats(vm, vcpus)

    def request_stop(self, reason: StopReason) -> None:
        """Thread-safe: the first reason wins; later ones are logged only."""
        self._stops.put(reason)

    def guest_reset(self) -> None:
        """The guest pulsed the reset line (i8042 0xFE)."""
        self.request_stop(StopReason(StopKind.REBOOT, "i8042 reset"))

    def run(
        self,
        timeout: float | None = None,
        confine: Callable[[str], None] | None = None,
    ) -> StopReason:
        """Run until the first stop reason.

        ``confine(role)`` is called first thing on each thread ("events",
        "vcpu", then "main"): it installs the seccomp filters. The events thread serves
        nothing before every thread is confined (the launcher's "ready" may come first).
        """
        if self.state is not VmState.CREATED:
            raise RuntimeError(f"cannot run a machine that is {self.state.value}")
        install_kick_handler()
        self.state = VmState.RUNNING
        # Requests (control, devices) are served once every thread is up and confined: the
        # launcher's ready may come before the threads start (ember.vmm.process), and a
        # snapshot or pause must find the vCPU threads running.
        everyone = threading.Event()
        try:
            confined: list[threading.Event] = []

            def hook(role: str) -> Callable[[], None] | None:
                if confine is None and role != "events":
                    return None
                done = threading.Event()
                confined.append(done)

                def setup() -> None:
                    if confine is not None:
                        confine(role)
                    done.set()
                    if role == "events":
                        everyone.wait()

                return setup

            self.events.start(on_start=hook("events"))
            for thread in self.vcpu_threads:
                thread.on_start = hook("vcpu")
                thread.start()
            for done in confined:
                done.wait()
            if confine is not None:
                confine("main")
            everyone.set()
            try:
                reason = self._stops.get(timeout=timeout)
            except queue.Empty:
                reason = StopReason(StopKind.TIMEOUT, f"after {timeout} s")
            return self._classify(reason)
        except KeyboardInterrupt:
            return StopReason(StopKind.HOST_REQUEST, "interrupted")
        finally:
            everyone.set()  # an events thread still waiting must not hold up the close
            self.state = VmState.STOPPING
            self._stop_vcpus()
            self.console.flush()
            self.close()

    def pause(self) -> None:
        """Hold every vCPU outside KVM_RUN (their state is then stable and readable)."""
        for thread in self.vcpu_threads:
            if not thread.pause():
                self.resume()
                raise SnapshotError(f"vCPU {thread.vcpu.index} did not pause")

    def resume(self) -> None:
        for thread in self.vcpu_threads:
            thread.resume()

    def host_connections(self) -> int:
        """Open host-side vsock connections (a snapshot taken with some makes every restore
        reset them, which costs the guest real time: templates wait for zero)."""
        return sum(t.device.host_connections for t in self.slots.transports)

    def device(self, kind: type[_D]) -> _D | None:
        """The first device of a type, if the VM has one."""
        for transport in self.slots.transports:
            if isinstance(transport.device, kind):
                return transport.device
        return None

    def device_stats(self) -> dict[str, dict[str, int]]:
        """Each device's counters (those that keep some), by device class name."""
        found: dict[str, dict[str, int]] = {}
        for transport in self.slots.transports:
            counters = transport.device.counters()
            if counters:
                found[transport.name] = counters
        if self.page_clear is not None:
            found["page_clear"] = self.page_clear.counters()
        return found

    def kvm_stats(self) -> dict[str, dict[str, int]]:
        """KVM's own counters: the VM's, and its vCPUs' summed (see :mod:`ember.kvm.stats`)."""
        if not self._stats:
            raise KvmError("this kernel has no KVM_GET_STATS_FD")
        vm, *vcpus = self._stats
        return {
            "vm": vm.read(),
            "vcpus": stats_total([v.read() for v in vcpus], vcpus[0].kinds if vcpus else {}),
        }

    def prefault_exec(self) -> tuple[int, int]:
        """Copy the pages the next exec writes (the first set left), while the guest runs: a
        page it wrote meanwhile is already its own and stays as it is. The pages copied, and
        how many sets are left (0: asking again copies nothing). Under the lock that
        :meth:`close` takes, so the memory is never unmapped under the copy."""
        from ember.snapshot.prefault import populate

        with self._lock:
            sets = self.exec_prefault
            if not sets or self.state is VmState.STOPPED:
                return 0, 0
            runs = sets.pop(0)
            while sets and not sets[-1]:
                sets.pop()  # nothing recorded for the last ones: not worth a request
            return populate(self.memory, runs), len(sets)

    @property
    def paused(self) -> bool:
        return all(thread.parked for thread in self.vcpu_threads)

    def snapshot(self, state_fd: int, memory_fd: int, *, durable: bool = False) -> dict[str, Any]:
        """Pause, save everything into the two open files, resume; returns timings in ms.

        Call from the event thread (the control socket does), so no device
        callback runs while device state is read.
        """
        from ember.vmm.machine_state import save_snapshot

        was_paused = self.paused
        started = time.monotonic()
        self.pause()
        try:
            timings = save_snapshot(self, state_fd, memory_fd, durable=durable)
        finally:
            if not was_paused:
                self.resume()
        timings["paused_ms"] = round((time.monotonic() - started) * 1000, 2)
        return timings

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
            for stats in self._stats:
                stats.close()
            for thread in self.vcpu_threads:
                thread.vcpu.close()
            self.vm.close()
            if self.shm is not None:
                self.shm.close()
            self.memory.close()
            self.kvm.close()
            self.state = VmState.STOPPED


def _open_stats(vm: Vm, vcpus: list[Vcpu]) -> list[StatsFile]:
    """The VM's and each vCPU's stats fd (parsed when first read); none on an older kernel."""
    opened: list[StatsFile] = []
    try:
        opened.append(StatsFile(vm.stats_fd()))
        opened += [StatsFile(vcpu.stats_fd()) for vcpu in vcpus]
    except KvmError:
        for item in opened:
            item.close()
        return []
    return opened
