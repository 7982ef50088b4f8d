"""Does this host's guest lose vector registers at a process switch? A probe, guest against host.

Two copies of a small static program each keep their own pattern in ``ymm7`` and check it
after every 20 ``sched_yield`` calls, for ``--seconds``; the other copy runs in between. A
round whose upper 128 bits changed means the guest kernel did not save the AVX half of the
registers at a switch (the CPU template ``pvm`` boots it without XSAVE), while user code saw
AVX in CPUID; a changed lower half would mean SSE state is lost too. The peer is the same two
copies on the host (0 expected). Where the upper half changes, the guest's user space must keep
to SSE (README: "user space keeps to SSE"), and the report says whether it does: numpy's
dispatch and OpenBLAS's core in a pre-started interpreter.

Needs ``gcc`` on the host (the kernel build needs it too). Slow checks stay out of the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import format_table, to_json

from ember import Sandbox

PROBE_C = r"""
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	uint64_t pattern = strtoull(argv[1], 0, 0);
	time_t end = time(0) + atoi(argv[2]);
	uint64_t in[4] = {pattern, pattern, pattern, pattern}, out[4];
	long rounds = 0, upper = 0, lower = 0;
	__asm__ volatile("vmovdqu %0, %%ymm7" ::"m"(in) : "xmm7");
	while (time(0) < end) {
		for (int i = 0; i < 20; i++)
			sched_yield();
		__asm__ volatile("vmovdqu %%ymm7, %0" : "=m"(out));
		rounds++;
		lower += out[0] != pattern || out[1] != pattern;
		upper += out[2] != pattern || out[3] != pattern;
		__asm__ volatile("vmovdqu %0, %%ymm7" ::"m"(in) : "xmm7");
	}
	printf("%ld %ld %ld\n", rounds, upper, lower);
	return 0;
}
"""

PAIR = (
    "{exe} 0x1111111111111111 {s} > {d}/a & {exe} 0x2222222222222222 {s} > {d}/b; "
    "wait; cat {d}/a {d}/b"
)

STACK = r"""
import ctypes, glob, json, os, numpy
from numpy._core._multiarray_umath import __cpu_features__ as f
blas = glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*"))
core = ctypes.CDLL(blas[0]).scipy_openblas_get_corename64_
core.restype = ctypes.c_char_p
print(json.dumps({"numpy_avx": [n for n in ("AVX", "AVX2", "AVX512F") if f.get(n)],
                  "openblas": core().decode()}))
"""


def compile_probe(work: Path) -> Path:
    source, exe = work / "probe.c", work / "probe"
    source.write_text(PROBE_C)
    subprocess.run(["gcc", "-O1", "-mavx", "-static", "-o", str(exe), str(source)], check=True)
    return exe


def parse(output: str) -> dict[str, int]:
    totals = {"rounds": 0, "upper": 0, "lower": 0}
    for line in output.split("\n"):
        if line.strip():
            for key, value in zip(totals, line.split(), strict=True):
                totals[key] += int(value)
    return totals


def on_host(exe: Path, seconds: int, work: Path) -> dict[str, int]:
    script = PAIR.format(exe=exe, s=seconds, d=work)
    return parse(subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout)


def in_guest(exe: Path, seconds: int) -> tuple[dict[str, int], dict[str, Any]]:
    with Sandbox() as sb:
        sb.files.write("/tmp/probe", exe.read_bytes())
        sb.exec(["chmod", "+x", "/tmp/probe"])
        script = PAIR.format(exe="/tmp/probe", s=seconds, d="/tmp")
        result = sb.exec(["sh", "-c", script], timeout=seconds * 4 + 120)
        stack = sb.exec(["python3", "-c", STACK], timeout=300)
        return parse(result.stdout.decode()), json.loads(stack.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = compile_probe(work)
        host = on_host(exe, args.seconds, work)
        guest, stack = in_guest(exe, args.seconds)
    result = {"guest": guest, "host": host, "guest_stack": stack}
    if args.json:
        print(to_json(result))
        return 0
    rows = [
        [where, str(r["rounds"]), str(r["upper"]), str(r["lower"]),
         f"{100 * r['upper'] / r['rounds']:.0f}%" if r["rounds"] else "-"]
        for where, r in (("guest", guest), ("host (peer)", host))
    ]  # fmt: skip
    print(format_table(["two processes", "rounds", "ymm upper changed", "xmm changed", "upper %"],
                       rows))  # fmt: skip
    sse_only = not stack["numpy_avx"] and stack["openblas"] in ("Nehalem", "Core2", "Katmai")
    print(f"\nguest numpy AVX kernels: {stack['numpy_avx'] or 'none'}; "
          f"OpenBLAS core: {stack['openblas']}")  # fmt: skip
    if guest["upper"] and not sse_only:
        print("the guest loses AVX state at a switch and its libraries use AVX: UNSAFE")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
