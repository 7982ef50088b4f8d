"""Where the VMM puts things in guest physical memory at boot.

Low memory follows the layout the small VMMs share (Firecracker, gokvm):
everything the kernel needs before it sets up its own tables sits below
640 KiB, the kernel itself at 16 MiB (its link address when
``CONFIG_RELOCATABLE`` is off), a bzImage's protected-mode part at 1 MiB.
"""

from __future__ import annotations

BOOT_GDT_START = 0x500
BOOT_IDT_START = 0x520
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # four page directories: 0xb000..0xefff identity-map 4 GiB
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 4096
# The MP floating pointer is found by scanning the last KiB of base memory.
EBDA_START = 0x9FC00
BASE_MEMORY_END = 0xA0000
HIMEM_START = 0x100000  # 1 MiB: a bzImage's protected-mode code goes here
KERNEL_DEFAULT_LOAD = 0x1000000  # 16 MiB

# Interrupt controllers (fixed by the architecture).
IOAPIC_ADDR = 0xFEC0_0000
APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000

# The port where a guest kernel booted with ember.host_clear=PORT hands the VMM pages to
# clear (ember.devices.legacy.page_clear; the pvm CPU template adds the word).
HOST_CLEAR_PORT = 0xEB0

# KVM needs three pages for the TSS just below the BIOS area at 4 GiB.
KVM_TSS_ADDRESS = 0xFFFB_D000

# The smallest guest that can hold the boot structures, a kernel and an initrd.
MIN_MEM_SIZE = 32 << 20
