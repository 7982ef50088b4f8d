"""``/dev/kvm``, a VM and its vCPUs: the only objects that own KVM fds.

Each wrapper does one ioctl per method and nothing clever; policy (what to
put in the registers, which CPUID bits to hide) lives in ``ember.arch``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from typing import TypeVar

from ember.errors import KvmError
from ember.kvm import abi
from ember.kvm.ioctl import ioctl_buf, ioctl_int, ioctl_run

KVM_DEVICE = "/dev/kvm"
_SUPPORTED_CPUID_NENT = 256


def open_kvm(path: str = KVM_DEVICE) -> int:
    """Open /dev/kvm with an error message that says how to fix it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmError(
            f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
            "or run on a machine with virtualisation enabled"
        ) from None
    except PermissionError:
        raise KvmError(
            f"{path} is not readable and writable by you: add yourself to group kvm "
            f"(usermod -aG kvm $USER) or run as root"
        ) from None
    except OSError as exc:
        raise KvmError(f"cannot open {path}: {exc.strerror}") from None


class Kvm:
    """The KVM system fd: capabilities and host-supported features."""

    def __init__(self, path: str | None = None) -> None:
        # EMBER_KVM_DEVICE exists for tests of the error path and for unusual device nodes.
        self.fd = open_kvm(path or os.environ.get("EMBER_KVM_DEVICE", KVM_DEVICE))
        try:
            version = ioctl_int(self.fd, abi.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
            if version != abi.KVM_API_VERSION:
                raise KvmError(f"KVM API version {version} is not the supported 12")
            self.vcpu_mmap_size = ioctl_int(
                self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE"
            )
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, abi.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID; kvm_pvm needs nent >= 128 (64 gives E2BIG)."""
        buf = abi.cpuid2_buffer(_SUPPORTED_CPUID_NENT)()
        buf.nent = _SUPPORTED_CPUID_NENT
        ioctl_buf(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf, what="KVM_GET_SUPPORTED_CPUID")
        return [buf.entries[i] for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        buf = abi.msr_list_buffer(1024)()
        buf.nmsrs = 1024
        ioctl_buf(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf, what="KVM_GET_MSR_INDEX_LIST")
        return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self) -> Vm:
        return Vm(self, ioctl_int(self.fd, abi.KVM_CREATE_VM, 0, what="KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM fd: memory slots, the in-kernel irqchip and PIT, interrupt lines."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.has_pit = False

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, userspace_addr)
        ioctl_buf(
            self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION"
        )

    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, abi.KVM_SET_TSS_ADDR, addr, what="KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        ioctl_int(self.fd, abi.KVM_CREATE_IRQCHIP, what="KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """PIT with a dummy speaker, so port 0x61 never exits to the VMM."""
        config = abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY)
        ioctl_buf(self.fd, abi.KVM_CREATE_PIT2, config, what="KVM_CREATE_PIT2")
        self.has_pit = True

    def irq_line(self, irq: int, level: int) -> None:
        ioctl_buf(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level), what="KVM_IRQ_LINE")

    def irqfd(self, fd: int, gsi: int) -> None:
        ioctl_buf(self.fd, abi.KVM_IRQFD, abi.kvm_irqfd(fd=fd, gsi=gsi), what="KVM_IRQFD")

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl_buf(self.fd, abi.KVM_IOEVENTFD, req, what="KVM_IOEVENTFD")

    # --- state for snapshots
    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        ioctl_buf(self.fd, abi.KVM_GET_IRQCHIP, chip, what="KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_IRQCHIP, chip, what="KVM_SET_IRQCHIP")

    def get_pit2(self) -> abi.kvm_pit_state2:
        return _get(self.fd, abi.KVM_GET_PIT2, abi.kvm_pit_state2(), "KVM_GET_PIT2")

    def set_pit2(self, pit: abi.kvm_pit_state2) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_PIT2, pit, what="KVM_SET_PIT2")

    def get_clock(self) -> abi.kvm_clock_data:
        return _get(self.fd, abi.KVM_GET_CLOCK, abi.kvm_clock_data(), "KVM_GET_CLOCK")

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_CLOCK, clock, what="KVM_SET_CLOCK")

    def stats_fd(self) -> int:
        """A new fd of this VM's binary statistics (:mod:`ember.kvm.stats`)."""
        return ioctl_int(self.fd, abi.KVM_GET_STATS_FD, what="KVM_GET_STATS_FD")

    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl_int(self.fd, abi.KVM_CREATE_VCPU, index, what="KVM_CREATE_VCPU")
        return Vcpu(fd, index, self.kvm.vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class EmulationFailure:
    """What ``KVM_EXIT_INTERNAL_ERROR`` carries: enough to name the instruction."""

    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes


class Vcpu:
    """A vCPU fd plus its shared ``kvm_run`` page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # --- register state
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl_buf(self.fd, abi.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_REGS, regs, what="KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl_buf(self.fd, abi.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_SREGS, sregs, what="KVM_SET_SREGS")

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        ioctl_buf(self.fd, abi.KVM_GET_FPU, fpu, what="KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_FPU, fpu, what="KVM_SET_FPU")

    def set_cpuid2(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf = abi.cpuid2_buffer(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl_buf(self.fd, abi.KVM_SET_CPUID2, buf, what="KVM_SET_CPUID2")

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Returns how many MSRs KVM accepted (it stops at the first refusal)."""
        buf = abi.msrs_buffer(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        return ioctl_buf(self.fd, abi.KVM_SET_MSRS, buf, what="KVM_SET_MSRS")

    def get_lapic(self) -> abi.kvm_lapic_state:
        lapic = abi.kvm_lapic_state()
        ioctl_buf(self.fd, abi.KVM_GET_LAPIC, lapic, what="KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_LAPIC, lapic, what="KVM_SET_LAPIC")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """The MSRs KVM can read, by index; one it refuses is left out (KVM stops at it)."""
        result: dict[int, int] = {}
        todo = list(indices)
        while todo:
            buf = abi.msrs_buffer(len(todo))()
            buf.nmsrs = len(todo)
            for i, index in enumerate(todo):
                buf.entries[i].index = index
            done = ioctl_buf(self.fd, abi.KVM_GET_MSRS, buf, what="KVM_GET_MSRS")
            for i in range(done):
                result[todo[i]] = int(buf.entries[i].data)
            todo = todo[done + 1 :]  # skip the one refused
        return result

    def get_mp_state(self) -> abi.kvm_mp_state:
        return _get(self.fd, abi.KVM_GET_MP_STATE, abi.kvm_mp_state(), "KVM_GET_MP_STATE")

    def set_mp_state(self, state: abi.kvm_mp_state) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_MP_STATE, state, what="KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return _get(self.fd, abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_VCPU_EVENTS, events, what="KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> abi.kvm_debugregs:
        return _get(self.fd, abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs(), "KVM_GET_DEBUGREGS")

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_DEBUGREGS, regs, what="KVM_SET_DEBUGREGS")

    def get_xsave(self) -> abi.kvm_xsave:
        return _get(self.fd, abi.KVM_GET_XSAVE, abi.kvm_xsave(), "KVM_GET_XSAVE")

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_XSAVE, xsave, what="KVM_SET_XSAVE")

    def get_xcrs(self) -> abi.kvm_xcrs:
        return _get(self.fd, abi.KVM_GET_XCRS, abi.kvm_xcrs(), "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        ioctl_buf(self.fd, abi.KVM_SET_XCRS, xcrs, what="KVM_SET_XCRS")

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, abi.KVM_GET_TSC_KHZ, what="KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, abi.KVM_SET_TSC_KHZ, khz, what="KVM_SET_TSC_KHZ")

    def stats_fd(self) -> int:
        """A new fd of this vCPU's binary statistics (:mod:`ember.kvm.stats`)."""
        return ioctl_int(self.fd, abi.KVM_GET_STATS_FD, what="KVM_GET_STATS_FD")

    # --- running
    def run(self) -> int:
        """One ``KVM_RUN``: 0 on an exit to handle, else the errno (EINTR, EAGAIN)."""
        return ioctl_run(self.fd, abi.KVM_RUN)

    @property
    def exit_reason(self) -> int:
        return int(struct.unpack_from("<I", self.run_page, abi.KVM_RUN_EXIT_REASON)[0])

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page[abi.KVM_RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def io_exit(self) -> tuple[int, int, int, int, int]:
        """(direction, size, port, count, data_offset) of a ``KVM_EXIT_IO``."""
        direction, size, port, count, offset = struct.unpack_from(
            "<BBHIQ", self.run_page, abi.KVM_RUN_UNION
        )
        return direction, size, port, count, offset

    def mmio_exit(self) -> tuple[int, int, bool]:
        """(phys_addr, len, is_write) of a ``KVM_EXIT_MMIO``; data at KVM_RUN_MMIO_DATA."""
        (addr,) = struct.unpack_from("<Q", self.run_page, abi.KVM_RUN_UNION)
        (length,) = struct.unpack_from("<I", self.run_page, abi.KVM_RUN_MMIO_LEN)
        is_write = self.run_page[abi.KVM_RUN_MMIO_IS_WRITE] != 0
        return addr, length, is_write

    def internal_error(self) -> EmulationFailure:
        suberror, ndata = struct.unpack_from("<II", self.run_page, abi.KVM_RUN_UNION)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", self.run_page, abi.KVM_RUN_INTERNAL_DATA)
        insn = b""
        if (
            suberror == abi.KVM_INTERNAL_ERROR_EMULATION
            and ndata >= 3
            and data[0] & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            size = min(self.run_page[abi.KVM_RUN_EMULATION_INSN_SIZE], 15)
            start = abi.KVM_RUN_EMULATION_INSN_BYTES
            insn = bytes(self.run_page[start : start + size])
        return EmulationFailure(suberror, tuple(int(d) for d in data), insn)

    def system_event_type(self) -> int:
        return int(struct.unpack_from("<I", self.run_page, abi.KVM_RUN_UNION)[0])

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1


_S = TypeVar("_S", bound=ctypes.Structure)


def _get(fd: int, request: int, buf: _S, what: str) -> _S:
    ioctl_buf(fd, request, buf, what=what)
    return buf
