"""Where the guest kernel saves no AVX register, the guest's user space keeps to SSE.

The CPU template ``pvm`` boots the guest kernel without XSAVE (kvm_pvm cannot execute
``xrstor``), so a process switch saves only the SSE part of the vector registers. User code
runs natively, and on a host whose CPUID it reads directly (AMD here) it sees AVX, AVX2 and
AVX-512: two processes using them corrupt each other's registers (seen: python3 killed by
SIGSEGV and SIGBUS while the template's interpreters started). ember-init then tells glibc,
numpy and OpenBLAS to use SSE only; on any other template nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ember import Sandbox
from ember.arch.x86_64.cpuid import resolve_template

from .conftest import Images

SSE_ONLY = resolve_template("auto").name == "pvm"
NAMES = ("GLIBC_TUNABLES", "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")

# What the process's own glibc, numpy and OpenBLAS chose, and the environment it started with.
PROBE = r"""
import ctypes, glob, json, os, subprocess
import numpy
from numpy._core._multiarray_umath import __cpu_features__ as features

def active(leaf, reg):
    out = subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--list-diagnostics"],
                         capture_output=True, text=True, check=True).stdout
    key = f"x86.cpu_features.features[{leaf:#x}].active[{reg:#x}]="
    return int(next(l for l in out.splitlines() if l.startswith(key))[len(key):], 16)

blas = glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*"))
core = ctypes.CDLL(blas[0]).scipy_openblas_get_corename64_
core.restype = ctypes.c_char_p
start = dict(e.split("=", 1) for e in open("/proc/self/environ").read().split("\0") if "=" in e)
print(json.dumps({
    "numpy": [n for n in ("AVX", "AVX2", "FMA3", "AVX512F", "AVX512_SKX") if features.get(n)],
    "openblas": core().decode(),
    "glibc_avx": bool(active(0, 2) >> 28 & 1),  # leaf 1 ECX.AVX
    "glibc_avx2": bool(active(1, 1) >> 5 & 1),  # leaf 7 EBX.AVX2
    "glibc_avx512f": bool(active(1, 1) >> 16 & 1),  # leaf 7 EBX.AVX512F
    "start_env": {k: start.get(k, "") for k in
                  ("GLIBC_TUNABLES", "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")},
}))
"""


@pytest.fixture(scope="module")
def sb(images: Images) -> Iterator[Sandbox]:
    with Sandbox() as box:
        yield box


def _check(report: dict[str, object]) -> None:
    start_env = report["start_env"]
    assert isinstance(start_env, dict)
    if not SSE_ONLY:
        assert report["numpy"] != [] or not report["glibc_avx"]  # the CPU's own answer stands
        assert start_env["OPENBLAS_CORETYPE"] == ""
        return
    assert report["numpy"] == [], report  # no AVX kernel will be dispatched
    assert report["openblas"] == "Nehalem", report
    assert not (report["glibc_avx"] or report["glibc_avx2"] or report["glibc_avx512f"]), report
    assert "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F" in start_env["GLIBC_TUNABLES"]
    assert "AVX2" in start_env["NPY_DISABLE_CPU_FEATURES"].split(",")


def test_a_pre_started_interpreter_keeps_to_sse(sb: Sandbox) -> None:
    served = sb.ping()["pool"]["served"]
    result = sb.exec(["python3", "-c", PROBE], timeout=300)
    assert result.exit_code == 0, result.stderr
    assert sb.ping()["pool"]["served"] == served + 1, "not a pre-started interpreter"
    _check(json.loads(result.stdout))


def test_run_code_keeps_to_sse(sb: Sandbox) -> None:
    result = sb.run_code(PROBE, timeout=300)
    assert result.error is None, result.error
    _check(json.loads(result.stdout))


def test_a_shell_and_what_it_starts_keep_to_sse(sb: Sandbox) -> None:
    result = sb.exec(["sh", "-c", "env"], timeout=120)
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    if SSE_ONLY:
        assert env["OPENBLAS_CORETYPE"] == "Nehalem"
        assert env["GLIBC_TUNABLES"].startswith("glibc.cpu.hwcaps=-AVX,")  # not the heap's
    else:
        assert not set(NAMES) & set(env)
