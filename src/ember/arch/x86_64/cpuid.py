"""CPUID for the guest: KVM's supported set, normalised per vCPU, masked by a template.

A *CPU template* names the features a guest must not see.  ``pvm`` hides
everything the kvm_pvm CPL0 emulator cannot execute (``cmpxchg16b``,
``xrstor``, ...; see shared/HOST.md); ``host`` passes KVM's set through.
``auto`` picks ``pvm`` when the kvm_pvm module is loaded, so the same VMM is
right on hardware KVM and on this host.

kvm_pvm does not honour ``KVM_SET_CPUID2`` for the features it lacks: the
vCPU reports the host's leaf 1 whatever we set (seen here: XSAVE stayed
visible and the guest died on ``xrstor``).  A template therefore also carries
kernel command-line options that make the guest itself ignore those
features; on hardware KVM the CPUID mask alone already does it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

from ember.arch.x86_64.layout import HOST_CLEAR_PORT
from ember.errors import ConfigError
from ember.kvm.abi import kvm_cpuid_entry2

KVM_PVM_SYSFS = "/sys/module/kvm_pvm"

# Leaf 1
LEAF1_EBX_CLFLUSH_SHIFT = 8
LEAF1_EBX_LOGICAL_COUNT_SHIFT = 16
LEAF1_EBX_APIC_ID_SHIFT = 24
LEAF1_ECX_PCID = 1 << 17
LEAF1_ECX_CX16 = 1 << 13
LEAF1_ECX_POPCNT = 1 << 23
LEAF1_ECX_XSAVE = 1 << 26
LEAF1_ECX_OSXSAVE = 1 << 27
LEAF1_ECX_AVX = 1 << 28
LEAF1_ECX_RDRAND = 1 << 30
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
# Leaf 7, subleaf 0
LEAF7_EBX_FSGSBASE = 1 << 0
LEAF7_EBX_AVX2 = 1 << 5
LEAF7_EBX_SMEP = 1 << 7
LEAF7_EBX_INVPCID = 1 << 10
LEAF7_EBX_RDSEED = 1 << 18
LEAF7_EBX_SMAP = 1 << 20
LEAF7_EBX_AVX512F = 1 << 16
LEAF7_ECX_RDPID = 1 << 22
LEAF7_EBX_ERMS = 1 << 9
# KVM's paravirtual features (leaf 0x40000001 EAX, Documentation/virt/kvm/x86/cpuid.rst)
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_ASYNC_PF = 1 << 4
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9
KVM_FEATURE_ASYNC_PF_VMEXIT = 1 << 10
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURE_ASYNC_PF_INT = 1 << 14
LEAF7_EDX_FSRM = 1 << 4
# Leaves that describe XSAVE state components.
LEAF_XSAVE = 0xD
LEAVES_X2APIC_TOPOLOGY = (0xB, 0x1F)


@dataclass(frozen=True)
class CpuTemplate:
    """Feature bits to clear, as {(leaf, subleaf, register): mask}, and leaves to drop."""

    name: str
    description: str
    clear: dict[tuple[int, int, str], int] = field(default_factory=dict)
    drop_leaves: frozenset[int] = frozenset()
    cmdline: tuple[str, ...] = ()

    def signature(self) -> str:
        """Everything the guest sees of this template, as text: a template snapshot's cache key
        includes it, since a guest booted with other CPUID bits is another guest."""
        clear = sorted((leaf, sub, reg, mask) for (leaf, sub, reg), mask in self.clear.items())
        return f"{self.name} {clear} {sorted(self.drop_leaves)} {list(self.cmdline)}"


TEMPLATES: dict[str, CpuTemplate] = {
    "host": CpuTemplate("host", "everything KVM supports"),
    "pvm": CpuTemplate(
        "pvm",
        "hides what the kvm_pvm CPL0 emulator cannot execute",
        clear={
            (1, 0, "ecx"): LEAF1_ECX_CX16
            | LEAF1_ECX_POPCNT
            | LEAF1_ECX_XSAVE
            | LEAF1_ECX_OSXSAVE
            | LEAF1_ECX_AVX
            | LEAF1_ECX_RDRAND
            | LEAF1_ECX_PCID,
            (7, 0, "ebx"): LEAF7_EBX_FSGSBASE
            | LEAF7_EBX_SMEP
            | LEAF7_EBX_INVPCID
            | LEAF7_EBX_RDSEED
            | LEAF7_EBX_SMAP
            | LEAF7_EBX_AVX2
            | LEAF7_EBX_AVX512F
            | LEAF7_EBX_ERMS,
            (7, 0, "ecx"): LEAF7_ECX_RDPID,
            (7, 0, "edx"): LEAF7_EDX_FSRM,
            # IPIs by hypercall hang a second vCPU's bring-up under kvm_pvm (seen here):
            # use the LAPIC's ordinary IPIs instead
            # Async page faults: KVM tells a guest that enabled them to wake all their
            # waiters when their MSR is set, which a restore does, so every restored guest
            # walked the 256 buckets of apf_task_wake_all under spinlocks in emulated code
            # before its first request (~5% of a first run_code's samples, bench/profile.py);
            # nothing here waits on a host page long enough to gain from them
            (KVM_CPUID_FEATURES, 0, "eax"): KVM_FEATURE_PV_SEND_IPI
            | KVM_FEATURE_PV_TLB_FLUSH
            | KVM_FEATURE_PV_SCHED_YIELD
            | KVM_FEATURE_ASYNC_PF
            | KVM_FEATURE_ASYNC_PF_VMEXIT
            | KVM_FEATURE_ASYNC_PF_INT,
        },
        drop_leaves=frozenset({LEAF_XSAVE}),
        cmdline=(
            "noxsave",
            # without XSAVE the guest kernel saves no AVX register at a process switch, yet
            # user code runs natively and may see AVX in CPUID (AMD hosts: no CPUID faulting):
            # ember-init tells glibc, numpy and OpenBLAS to use SSE only (initramfs/init.c)
            "ember.simd=sse",
            # erms/fsrm: the emulator runs `rep movsb` a byte per step; without them the
            # kernel copies and clears with `rep movsq`, 3-4x faster here (measured)
            "clearcpuid=cx16,popcnt,rdrand,rdseed,smap,smep,fsgsbase,pcid,invpcid,rdpid,erms,fsrm",
            # even `rep stosq` is a step per quadword: the kernel hands page clearing to the
            # VMM (kernel patch 0017, ember.devices.legacy.page_clear), ~0.2 s -> microseconds
            # per 2 MiB; on hardware KVM an exit per page would cost more than it saves
            f"ember.host_clear={HOST_CLEAR_PORT:#x}",
            # a fault costs the emulated kernel ~2 ms: private anonymous mappings of 2 MiB or
            # more start on a 2 MiB boundary (kernel patch 0018, as Linux 6.7 does), so
            # transparent huge pages back all of them, not just what follows the first boundary
            "ember.thp_align",
        ),
    ),
}


def host_is_pvm() -> bool:
    return os.path.isdir(KVM_PVM_SYSFS)


def resolve_template(name: str, *, pvm: bool | None = None) -> CpuTemplate:
    """Turn a user's ``--cpu-template`` into a template; ``auto`` looks at the host."""
    if name == "auto":
        return TEMPLATES["pvm" if (host_is_pvm() if pvm is None else pvm) else "host"]
    try:
        return TEMPLATES[name]
    except KeyError:
        choices = ", ".join(["auto", *sorted(TEMPLATES)])
        raise ConfigError(f"unknown CPU template {name!r}: choose one of {choices}") from None


def _copy(entry: kvm_cpuid_entry2) -> kvm_cpuid_entry2:
    clone = kvm_cpuid_entry2()
    ctypes.pointer(clone)[0] = entry
    return clone


def guest_cpuid(
    supported: list[kvm_cpuid_entry2], template: CpuTemplate, vcpu_index: int, vcpu_count: int
) -> list[kvm_cpuid_entry2]:
    """The CPUID table for one vCPU: the template applied, then topology filled in."""
    result = []
    for original in supported:
        if original.function in template.drop_leaves:
            continue
        entry = _copy(original)
        for (leaf, subleaf, reg), mask in template.clear.items():
            if entry.function == leaf and entry.index == subleaf:
                setattr(entry, reg, getattr(entry, reg) & ~mask)
        if entry.function == 1:
            ebx = (entry.ebx & 0xFF) | (8 << LEAF1_EBX_CLFLUSH_SHIFT)  # brand index, 64 B lines
            ebx |= (vcpu_count & 0xFF) << LEAF1_EBX_LOGICAL_COUNT_SHIFT
            ebx |= (vcpu_index & 0xFF) << LEAF1_EBX_APIC_ID_SHIFT
            entry.ebx = ebx
            entry.ecx |= LEAF1_ECX_HYPERVISOR
            if vcpu_count > 1:
                entry.edx |= LEAF1_EDX_HTT
            else:
                entry.edx &= ~LEAF1_EDX_HTT
        elif entry.function in LEAVES_X2APIC_TOPOLOGY:
            entry.edx = vcpu_index
        result.append(entry)
    return result
