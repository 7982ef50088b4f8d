"""KVM's user-space ABI, verbatim from ``linux/kvm.h`` and ``asm/kvm.h`` (x86).

Struct and constant names follow the kernel headers so that a reader can grep
them there; ``tests/unit/test_kvm_abi.py`` compiles the real headers with gcc
and checks every size and ioctl number.

The structs live in :mod:`ember.kvm.abi.structs`, the ioctl numbers,
capabilities and ``kvm_run`` offsets in :mod:`ember.kvm.abi.numbers`; both are
re-exported here, so the VMM reads every name of the ABI as ``abi.NAME``.
"""

from __future__ import annotations

from ember.kvm.abi.numbers import *  # noqa: F403 - re-exported: one namespace, as in the headers
from ember.kvm.abi.structs import *  # noqa: F403
