"""Restore stress: many restores and forks, each checking that its memory is what it should be.

Usage: ``.venv/bin/python bench/stress.py [--runs 30] [--json]``

Issue 12 saw a guest ``python3`` die once in ~30 restores with a NULL type pointer: guest memory
or register state was wrong. Guest user code runs natively, so the suspects are what the host
does to guest memory and vCPU state: restores (``MAP_PRIVATE`` of the template's memory file),
free page reporting and the balloon (``MADV_DONTNEED``), vsock writes into guest buffers, FPU
state. This bench keeps all of them busy while guest code checks itself:

- a template is made whose warm interpreter holds a few MiB of seeded pseudo-random data and its
  SHA-256 (so every restore and fork must bring those bytes back exactly);
- each run restores that template (or forks a sandbox restored from it), then, in the same warm
  interpreter: re-hashes the template's data, fills fresh memory and hashes it twice around
  allocator- and ``gc``-heavy work, frees it (free page reporting returns it to the host), reads
  ``/proc/uptime`` and the clocksource (the cell that crashed), while the host moves the balloon
  and streams files through vsock;
- a run fails on any checksum mismatch, any error from the interpreter, and any of
  ``segfault``, ``general protection``, ``BUG``, ``Oops``, ``panic`` or ``traps:`` on the guest
  console.

Prints the clean runs out of all and each failure; nothing is asserted (the integration test
``tests/integration/test_restore_stress.py`` runs a few of the same runs and asserts them).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

from ember import Sandbox
from ember.spec import DEFAULT_MEM_MIB

TEMPLATE = "ember-stress"

#: Console words that mean the guest saw something it should never see.
CONSOLE_ALARM = re.compile(rb"segfault|general protection|BUG|Oops|Kernel panic|traps:")

#: Kept in the template's warm interpreter: seeded data and its hash, checked after every restore.
SEED_CELL = """
import gc, hashlib, random
_stress_rng = random.Random(1234)
_stress_kept = _stress_rng.randbytes({kept_mib} << 20)
_stress_kept_sha = hashlib.sha256(_stress_kept).hexdigest()
len(_stress_kept)
"""

#: One run's guest work; its value is a dict the host checks.
WORK_CELL = """
def _stress_run(seed, fresh_mib):
    import gc, hashlib, random
    out = {{"kept_ok": hashlib.sha256(_stress_kept).hexdigest() == _stress_kept_sha}}
    rng = random.Random(seed)
    fresh = bytearray(rng.randbytes(fresh_mib << 20))
    first = hashlib.sha256(fresh).digest()
    # allocator and gc churn between the two hashes
    objs = [{{i: str(i) * (i % 13), "l": [i] * (i % 5)}} for i in range(20000)]
    for _ in range(4):
        junk = [bytes(rng.randrange(1, 8192)) for _ in range(400)]
        del junk
        gc.collect()
    total = sum(len(d[k]) for d in objs for k in d if k != "l")
    out["objs_ok"] = total == sum(len(str(i)) * (i % 13) for i in range(20000))
    out["fresh_ok"] = hashlib.sha256(fresh).digest() == first
    del fresh, objs
    gc.collect()
    with open("/proc/uptime") as f:
        out["uptime"] = f.read().split()[0]
    with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
        out["clocksource"] = f.read().strip()
    return out
_stress_run({seed}, {fresh_mib})
"""


@dataclass
class RunResult:
    kind: str
    seconds: float
    problems: list[str] = field(default_factory=list)


def build_template(kept_mib: int = 4) -> None:
    """The stress template: the default one plus seeded data in the warm interpreter."""
    with Sandbox() as sb:
        result = sb.run_code(SEED_CELL.format(kept_mib=kept_mib), timeout=600)
        if result.error is not None or result.value != str(kept_mib << 20):
            raise RuntimeError(f"seeding the stress template failed: {result}")
        sb.snapshot(TEMPLATE)


def _check(sb: Sandbox, seed: int, fresh_mib: int, balloon: bool) -> list[str]:
    problems: list[str] = []
    console_before = sb.console.encode()
    if balloon:
        # inflate by 64 MiB: the guest hands pages to the host
        sb.set_memory(DEFAULT_MEM_MIB - 64, timeout=120)
    payload = os.urandom(256 << 10)
    sb.files.write("/tmp/stress.bin", payload)  # vsock traffic into guest buffers
    result = sb.run_code(WORK_CELL.format(seed=seed, fresh_mib=fresh_mib), timeout=600)
    if balloon:
        sb.set_memory(DEFAULT_MEM_MIB, timeout=120)  # deflate again
    if sb.files.read("/tmp/stress.bin") != payload:
        problems.append("a file written through vsock read back different")
    if result.error is not None:
        problems.append(f"run_code failed: {result.error.type}: {result.error.message}")
    else:
        try:
            value = ast.literal_eval(result.value or "None")  # a dict of bools and strings
        except (SyntaxError, ValueError):
            value = None
        if not isinstance(value, dict):
            problems.append(f"run_code returned no result: {result.value!r}")
        else:
            checks = ("kept_ok", "objs_ok", "fresh_ok")
            problems += [f"{k} is False" for k in checks if not value.get(k)]
    console = sb.console.encode()
    new = console[len(console_before) :] if console.startswith(console_before) else console
    problems += [
        "console: " + line.decode(errors="replace")
        for line in new.splitlines()
        if CONSOLE_ALARM.search(line)
    ]
    return problems


def stress(runs: int, fresh_mib: int = 2) -> list[RunResult]:
    """Alternate restores and forks of the stress template; every other run moves the balloon."""
    results: list[RunResult] = []
    for i in range(runs):
        started = time.perf_counter()
        fork = i % 2 == 1
        with Sandbox(template=TEMPLATE) as parent:
            if fork:
                with parent.fork() as child:
                    problems = _check(child, i, fresh_mib, balloon=i % 4 == 1)
            else:
                problems = _check(parent, i, fresh_mib, balloon=i % 4 == 2)
        results.append(
            RunResult("fork" if fork else "restore", time.perf_counter() - started, problems)
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--fresh-mib", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    build_template()
    results = stress(args.runs, args.fresh_mib)
    clean = sum(1 for r in results if not r.problems)
    if args.json:
        print(
            json.dumps(
                {
                    "runs": len(results),
                    "clean": clean,
                    "failures": [r.problems for r in results if r.problems],
                }
            )
        )
    else:
        for i, r in enumerate(results):
            status = "clean" if not r.problems else "; ".join(r.problems)
            print(f"run {i:3d} {r.kind:8s} {r.seconds:6.1f} s  {status}")
        median = statistics.median(r.seconds for r in results) if results else 0.0
        print(f"{clean}/{len(results)} clean (median run {median:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
