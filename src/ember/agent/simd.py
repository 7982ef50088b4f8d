"""The environment that keeps a guest's user space on SSE, where the guest kernel saves no more.

The CPU template ``pvm`` boots the guest kernel with ``noxsave`` (kvm_pvm cannot execute
``xrstor``), so a process switch saves only the x87/SSE registers. User code runs natively and,
on a host without CPUID faulting (AMD), sees the host's AVX, AVX2 and AVX-512: two guest
processes using them would corrupt each other's registers. So ember-init, given
``ember.simd=sse``, starts the agent with the variables below (src/ember/images/initramfs/init.c).

Two places depend on the list: every command inherits these variables from the agent
(:func:`ember.agent.execute.default_env`), and a pre-started interpreter, whose glibc, numpy
and OpenBLAS read them once at start-up, serves only programs that ask for the same values
(:func:`ember.agent.pyargs.plan`).
"""

from __future__ import annotations

__all__ = ["SIMD_ENV"]

#: glibc's hwcaps tunable, numpy's dispatch mask and OpenBLAS's core type.
SIMD_ENV = ("GLIBC_TUNABLES", "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")
