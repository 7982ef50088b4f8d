"""The VMM's side of memory channels: a shared region above guest RAM, and its doorbells.

The region is a host memfd registered as a KVM memory slot at a guest-physical
range just above RAM, which the e820 map marks *reserved*: the guest kernel never
allocates it, and ``/dev/mem`` (``STRICT_DEVMEM`` refuses only RAM) lets the guest
agent map it into user processes, page tables filled at ``mmap`` time. The memfd
is fresh on every VMM start, restore and fork, so siblings restored from one
template never share a byte of it; the guest's mapping, made in the template,
points at the same guest-physical range and so at the new memfd after a restore.
The layout (header, slots, rings) is :mod:`ember.ring`; the header is written here
before any vCPU runs, with a new random generation, so the agent can tell a
region it has not yet seen from a stale one.

Doorbells: one u32 per slot in a page right after the region, backed by no memory
slot, each an ioeventfd. A guest user-mode write there costs ~2.5 µs here and no
exit to this process; the SDK, which consumes the rings, gets the eventfds (and
the memfd) over the control socket (``{"op": "shm"}``, SCM_RIGHTS). The VMM
itself never reads the region after writing its header: it only hosts it.

The guest bell goes the other way (kernel patch ``0007-misc-ember-doorbell``): an interrupt
line of its own, announced as ``ember_doorbell.irq=N``, that wakes a guest process blocked
on ``/dev/ember-doorbell`` (the run_code worker, asleep). The SDK writes ``host_bell``, an
eventfd this process watches on its event thread (:meth:`SharedRegion.serve_bell`), which
wakes a parked VM first and then pulses the line through an irqfd. A vsock "wake me" costs
the emulated guest kernel ~15,000 instructions (a packet in, the agent, a packet out); the
interrupt a few thousand. A guest kernel without the driver never arms it, and the host
keeps asking over vsock.

The header also carries a clock pair (:meth:`SharedRegion.publish_clock`): the guest's TSC
and this host's ``CLOCK_REALTIME`` read at one instant, and the TSC's rate. A guest process
that reads its TSC (``rdtsc``, user mode, no exit) then knows the host's wall clock to a few
microseconds at any later moment, however long a request took to reach it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from typing import TYPE_CHECKING

from ember import ring

if TYPE_CHECKING:  # the VMM's side; the SDK imports this module for CODE_HOST_WAITING only
    from collections.abc import Callable

    from ember.arch.x86_64.bootparams import E820Entry
    from ember.kvm.system import Vcpu, Vm
    from ember.memory import GuestMemory
    from ember.vmm.event_loop import EventLoop

# A word of the code request slot's control page that the host sets while a run_code call
# waits on the rings, with no vsock connection open: the idle parker must not park a guest
# that is working on it (a cell in time.sleep looks idle). Host-written and VMM-read only;
# a guest that sets it can keep itself unparked, which it can do by spinning anyway.
CODE_HOST_WAITING = 40

ALIGN = 2 << 20  # a 2 MiB boundary: large pages stay possible on both sides
PAIR_TRIES = 5  # reads of the pair; the tightest bracket is kept
PAIR_MAX_NS = 1_000_000  # a bracket wider than this (the host descheduled us) is no pair


def region_base(memory: GuestMemory) -> int:
    """Where the region goes for this RAM: above 4 GiB and above all RAM, so it depends only
    on the RAM size (a restore finds it where the template's guest mapped it)."""
    from ember.memory import MMIO_GAP_END

    top = max(MMIO_GAP_END, max(r.end for r in memory.regions))
    return (top + ALIGN - 1) & ~(ALIGN - 1)


class SharedRegion:
    """The memfd, its mapping in the VMM, and the doorbells' eventfds."""

    def __init__(self, vm: Vm, memory: GuestMemory, slot: int) -> None:
        from ember.memory import c_address

        self.base = region_base(memory)
        self.size = ring.region_size()
        self.doorbell_gpa = self.base + self.size
        self.generation = secrets.randbits(63) | 1
        request, _ = ring.code_slots(ring.SLOT_COUNT)  # read on every idle-parker tick
        self._waiting_offset = ring.SLOT_BASE + request * ring.SLOT_SIZE + CODE_HOST_WAITING * 8
        self.memfd = os.memfd_create("ember-shm", os.MFD_CLOEXEC)
        self.eventfds: list[int] = []
        self.bell_irq: int | None = None
        self.host_bell = -1  # the SDK writes it: ring the guest (see attach_guest_bell)
        self._irqfd = -1
        try:
            os.ftruncate(self.memfd, self.size)
            self.mem = mmap.mmap(self.memfd, self.size, mmap.MAP_SHARED)
            vm.set_user_memory_region(slot, self.base, self.size, c_address(self.mem))
            for index in range(ring.SLOT_COUNT):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.eventfds.append(fd)
                vm.ioeventfd(fd, self.doorbell_gpa + ring.DOORBELL_STRIDE * index, 4)
        except BaseException:
            self.close()
            raise
        self.write_header()

    def attach_guest_bell(self, vm: Vm, irq: int) -> None:
        """Wire interrupt line ``irq`` to an irqfd, and make the eventfd the SDK rings."""
        self._irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.irqfd(self._irqfd, irq)
        self.host_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.bell_irq = irq

    def serve_bell(self, events: EventLoop, wake: Callable[[], None] | None) -> None:
        """Watch ``host_bell`` on the event thread: each ring wakes a parked VM (``wake``,
        the idle parker's) and pulses the guest's line. Rings that come together are one
        (the eventfd's count is drained), as the guest's reader wants."""
        if self.host_bell < 0:
            return

        def ring_guest() -> None:
            if wake is not None:
                wake()
            try:
                os.eventfd_write(self._irqfd, 1)
            except BlockingIOError:  # the count is saturated: a pulse is pending anyway
                pass

        events.add_eventfd(self.host_bell, ring_guest)

    def write_header(self) -> None:
        """The header the agent validates; everything after it is zero (empty rings)."""
        words = memoryview(self.mem)[: ring.PAGE].cast("Q")
        words[ring.H_VERSION] = ring.VERSION
        words[ring.H_GENERATION] = self.generation
        words[ring.H_SLOT_COUNT] = ring.SLOT_COUNT
        words[ring.H_SLOT_SIZE] = ring.SLOT_SIZE
        words[ring.H_DOORBELL] = self.doorbell_gpa
        words[ring.H_MAGIC] = ring.MAGIC  # last: a reader that sees it sees the rest
        words.release()

    def publish_clock(self, vcpu: Vcpu) -> bool:
        """Write the clock pair into the header, before any vCPU runs (restore, fork, boot).

        The guest's TSC is read through KVM (``KVM_GET_MSRS``), not with our own ``rdtsc``:
        on hardware KVM a restored guest's TSC carries an offset (the snapshot's value was
        put back), under kvm_pvm it is the host's; KVM answers the guest's value in both.
        The realtime half is the middle of the two host readings around that ioctl. Without
        a pair (no TSC, KVM refused) the words stay zero and the guest steps its clock to
        the host's stamp in the first request instead (less precise by that request's
        transit time).
        """
        from ember.arch.x86_64.regs import MSR_IA32_TSC
        from ember.errors import KvmError

        best: tuple[int, int, int] | None = None  # (bracket ns, tsc, realtime ns)
        try:
            khz = vcpu.get_tsc_khz()
            for _ in range(PAIR_TRIES):
                before = time.clock_gettime_ns(time.CLOCK_REALTIME)
                tsc = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC, 0)
                after = time.clock_gettime_ns(time.CLOCK_REALTIME)
                width = after - before
                if tsc and 0 <= width <= PAIR_MAX_NS and (best is None or width < best[0]):
                    best = (width, tsc, before + width // 2)
        except (KvmError, OSError):
            return False
        if best is None or khz <= 0:
            return False
        words = memoryview(self.mem)[: ring.PAGE].cast("Q")
        words[ring.H_TSC] = best[1]
        words[ring.H_TSC_REALTIME] = best[2]
        words[ring.H_TSC_KHZ] = khz
        words.release()
        return True

    def host_waiting(self) -> bool:
        """A host waits for a run_code reply on the rings (see :data:`CODE_HOST_WAITING`)."""
        offset = self._waiting_offset
        return self.mem[offset : offset + 8] != bytes(8)

    def e820_entry(self) -> E820Entry:
        """The region and its doorbell page, reserved so the guest kernel leaves them be."""
        from ember.arch.x86_64.bootparams import E820_RESERVED, E820Entry

        return E820Entry(self.base, self.size + ring.PAGE, E820_RESERVED)

    def cmdline(self) -> str:
        """Where the agent finds it: ``ember.shm=SIZE@BASE`` (bytes, hex); the guest bell's
        line for the kernel's driver."""
        words = f"ember.shm={self.size:#x}@{self.base:#x}"
        if self.bell_irq is not None:
            words += f" ember_doorbell.irq={self.bell_irq}"
        return words

    def describe(self) -> dict[str, int | bool]:
        return {
            "base": self.base,
            "size": self.size,
            "generation": self.generation,
            "slot_count": ring.SLOT_COUNT,
            "slot_size": ring.SLOT_SIZE,
            "guest_bell": self.host_bell >= 0,
        }

    def fds(self) -> list[int]:
        """The memfd, one doorbell eventfd per slot, then the guest bell's if there is one
        (for SCM_RIGHTS; still ours)."""
        return [self.memfd, *self.eventfds, *([self.host_bell] if self.host_bell >= 0 else [])]

    def close(self) -> None:
        """Safe to call twice; after the VM's fd is closed (KVM maps the memory until then)."""
        if self.memfd < 0:
            return
        mem = getattr(self, "mem", None)
        if mem is not None:
            try:
                mem.close()
            except BufferError:  # a view still open: the mapping goes with the process
                pass
        for fd in [self.memfd, *self.eventfds, self.host_bell, self._irqfd]:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.eventfds = []
        self.memfd = self.host_bell = self._irqfd = -1
