"""Emulated devices and the bus that dispatches guest port and MMIO accesses to them."""
