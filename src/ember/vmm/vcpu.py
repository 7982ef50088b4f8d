"""The vCPU thread: ``KVM_RUN`` in a loop, exits dispatched to the buses.

A vCPU is stopped the way KVM intends: set ``kvm_run.immediate_exit`` and
send the thread a signal, so that a vCPU sleeping in guest ``hlt`` (which,
with the in-kernel irqchip, never exits to us) returns with ``EINTR``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import struct
import threading
import time
from collections.abc import Callable

from ember.devices.bus import Bus
from ember.kvm import abi
from ember.kvm.system import Vcpu
from ember.vmm.state import StopKind, StopReason
from ember.vmm.threads import name_this_thread

log = logging.getLogger(__name__)

SIG_KICK = signal.SIGRTMIN + 1
_libc = ctypes.CDLL(None, use_errno=True)


def install_kick_handler() -> None:
    """Make ``SIG_KICK`` interrupt a blocking ioctl without killing the process.

    Python can install handlers only from the main thread; elsewhere we point
    the signal at libc's ``getpid``, an async-signal-safe function with no
    effect, which is all the interruption needs.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(SIG_KICK, lambda _signum, _frame: None)
        return
    handler = ctypes.cast(_libc.getpid, ctypes.c_void_p).value
    _libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.signal.restype = ctypes.c_void_p
    _libc.signal(int(SIG_KICK), handler)


class VcpuThread:
    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_stop: Callable[[StopReason], None],
    ) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self._on_stop = on_stop
        self._stopping = threading.Event()
        # Parking (pause/resume): requested by another thread, acknowledged by this one.
        self._park_cond = threading.Condition()
        self._want_park = False
        self._is_parked = False
        self.exits = 0
        # RIP sampling (ember.vmm.profiler): asked for by the profiler's thread, taken by this
        # one the next time it is out of KVM_RUN.
        self._want_sample = False
        self.samples: dict[int, int] | None = None
        self.on_start: Callable[[], None] | None = None  # first thing on the thread (seccomp)
        name = f"ember-vcpu{vcpu.index}"  # the kernel's too (ember.vmm.threads)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Ask the loop to return from ``KVM_RUN`` and end."""
        self._stopping.set()
        with self._park_cond:
            self._park_cond.notify_all()
        self._interrupt()

    def pause(self, timeout: float = 5.0) -> bool:
        """Take the vCPU out of ``KVM_RUN`` and hold it; True once it is parked.

        ``immediate_exit`` makes KVM finish a pending MMIO/PIO completion
        before returning, so the vCPU's state is consistent for a snapshot.
        """
        deadline = time.monotonic() + timeout
        with self._park_cond:
            self._want_park = True
            while not self._is_parked:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    return False
                self._interrupt()  # again: the signal may land before KVM_RUN is entered
                self._park_cond.wait(0.02)
        return True

    def resume(self) -> None:
        with self._park_cond:
            self._want_park = False
            self._park_cond.notify_all()

    @property
    def parked(self) -> bool:
        return self._is_parked

    def cpu_seconds(self) -> float:
        """CPU time this vCPU's thread has used (guest time included)."""
        ident = self.thread.ident
        if ident is None or not self.thread.is_alive():
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:
            return 0.0

    def sample(self) -> None:
        """Ask for one sample of the guest's RIP, counted in ``samples`` while that is a dict."""
        if self.samples is not None:  # kicked again if the last kick was lost: no stall
            self._want_sample = True
            self._interrupt()

    def _take_sample(self) -> None:
        self._want_sample = False
        samples = self.samples
        if samples is None:
            return
        try:
            rip = self.vcpu.get_regs().rip
        except OSError:
            return
        samples[rip] = samples.get(rip, 0) + 1

    def _interrupt(self) -> None:
        self.vcpu.set_immediate_exit(True)
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            try:
                signal.pthread_kill(ident, SIG_KICK)
            except ProcessLookupError:
                pass

    def _run(self) -> None:
        name_this_thread()
        try:
            if self.on_start is not None:
                self.on_start()
            self._loop()
        except Exception as exc:  # a VMM bug must stop this VM, not hang it
            log.exception("vCPU %d failed", self.vcpu.index)
            self._on_stop(StopReason(StopKind.VMM_ERROR, repr(exc), self.vcpu.index))

    def _loop(self) -> None:
        vcpu = self.vcpu
        run_page = vcpu.run_page
        index = vcpu.index
        while not self._stopping.is_set():
            err = vcpu.run()
            if err in (errno.EINTR, errno.EAGAIN):
                if self._want_sample:
                    self._take_sample()
                self._park_here()
                continue
            if err:
                self._on_stop(StopReason(StopKind.VMM_ERROR, f"KVM_RUN: errno {err}", index))
                return
            self.exits += 1
            reason = vcpu.exit_reason
            if reason == abi.KVM_EXIT_IO:
                direction, size, port, count, offset = vcpu.io_exit()
                for i in range(count):
                    at = offset + i * size
                    if direction == abi.KVM_EXIT_IO_OUT:
                        self.pio.write(port, bytes(run_page[at : at + size]))
                    else:
                        run_page[at : at + size] = self.pio.read(port, size)
            elif reason == abi.KVM_EXIT_MMIO:
                addr, length, is_write = vcpu.mmio_exit()
                length = min(length, 8)
                data_at = abi.KVM_RUN_MMIO_DATA
                if is_write:
                    self.mmio.write(addr, bytes(run_page[data_at : data_at + length]))
                else:
                    run_page[data_at : data_at + length] = self.mmio.read(addr, length)
            elif reason == abi.KVM_EXIT_SHUTDOWN:
                self._on_stop(StopReason(StopKind.TRIPLE_FAULT, self._where(), index))
                return
            elif reason == abi.KVM_EXIT_HLT:
                self._on_stop(StopReason(StopKind.POWER_OFF, "guest halted", index))
                return
            elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
                self._on_stop(StopReason(StopKind.INTERNAL_ERROR, self._internal_error(), index))
                return
            elif reason == abi.KVM_EXIT_FAIL_ENTRY:
                (hw_reason,) = struct.unpack_from("<Q", run_page, abi.KVM_RUN_UNION)
                detail = f"hardware entry failure reason {hw_reason:#x}"
                self._on_stop(StopReason(StopKind.FAIL_ENTRY, detail, index))
                return
            elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
                event = vcpu.system_event_type()
                if event == abi.KVM_SYSTEM_EVENT_RESET:
                    self._on_stop(StopReason(StopKind.REBOOT, "system reset", index))
                elif event == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self._on_stop(StopReason(StopKind.POWER_OFF, "system shutdown", index))
                else:
                    self._on_stop(StopReason(StopKind.PANIC, f"system event {event}", index))
                return
            elif reason == abi.KVM_EXIT_INTR:
                continue
            else:
                detail = f"unexpected KVM exit reason {reason}"
                self._on_stop(StopReason(StopKind.VMM_ERROR, detail, index))
                return

    def _park_here(self) -> None:
        """Out of KVM_RUN: hold here while a pause is wanted, then clear immediate_exit."""
        with self._park_cond:
            while self._want_park and not self._stopping.is_set():
                self._is_parked = True
                self._park_cond.notify_all()
                self._park_cond.wait()
            self._is_parked = False
            if not self._stopping.is_set():
                self.vcpu.set_immediate_exit(False)

    def _where(self) -> str:
        try:
            regs = self.vcpu.get_regs()
        except Exception:
            return "registers unavailable"
        return f"rip={regs.rip:#x} rsp={regs.rsp:#x}"

    def _internal_error(self) -> str:
        failure = self.vcpu.internal_error()
        names = {
            abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
            abi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception during exception delivery",
            abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
            abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
        }
        text = names.get(failure.suberror, f"suberror {failure.suberror}")
        parts = [text, self._where()]
        if failure.insn_bytes:
            parts.append("instruction bytes " + failure.insn_bytes.hex(" "))
        elif failure.data:
            parts.append("data " + " ".join(f"{d:#x}" for d in failure.data))
        return ", ".join(parts)
