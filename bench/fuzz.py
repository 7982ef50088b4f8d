"""Fuzz every virtio device for N minutes: the long run of ``tests/unit/test_device_fuzz.py``.

Usage: ``.venv/bin/python bench/fuzz.py --minutes N [--device blk|net|vsock|balloon|all]
[--batch 50] [--seed S] [--json]``

The same hypothesis strategies and checks as the unit test (``tests/unit/fuzz_*.py``), with
fresh randomness: the time is split evenly between the devices, and each device runs
batches of ``--batch`` programs, batch *k* with the hypothesis seed ``S + k`` (``S`` is
``--seed``, else taken from the clock and printed).  A batch that finds a failure shrinks
it to a minimal program; the report names the device, the seed and the failure, and
``--device D --seed SEED --minutes 0`` replays that one batch (same seed, same programs).

Reported per device: cases (programs played, each a fresh device), ops and chains served
in them, how many ended with the device failed (allowed: that is the guest's doing), and
failures (a check that did not hold).  Exits 1 if any failure was found.  Nothing here is
timed for its own sake: the minutes are a budget, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.unit.*

from hypothesis import HealthCheck, Phase, given, seed, settings
from tests.unit.fuzz_harness import run_program
from tests.unit.fuzz_ops import DEVICES, Program
from tests.unit.fuzz_strategies import programs


@dataclass
class Failure:
    device: str
    seed: int
    error: str
    example: str


@dataclass
class Tally:
    device: str
    cases: int = 0
    ops: int = 0
    chains: int = 0
    failed_devices: int = 0
    batches: int = 0
    failures: list[Failure] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)


def run_batch(device: str, batch_seed: int, size: int, tally: Tally) -> None:
    """``size`` programs for ``device`` from hypothesis seed ``batch_seed``; a failure is
    shrunk and recorded, not raised."""

    @seed(batch_seed)
    @settings(
        max_examples=size,
        deadline=None,
        database=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(programs(device))
    def case(program: Program) -> None:
        tally.cases += 1
        result = run_program(program)
        tally.ops += result.ops
        tally.chains += result.work.pops
        tally.failed_devices += result.failed_device
        tally.stats.update(result.device_stats)

    tally.batches += 1
    try:
        case()
    except Exception as exc:  # a check failed: hypothesis has shrunk it already
        notes = "\n".join(getattr(exc, "__notes__", []))
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        tally.failures.append(Failure(device, batch_seed, error, notes))


def fuzz(devices: list[str], minutes: float, first_seed: int, size: int) -> list[Tally]:
    tallies = [Tally(device) for device in devices]
    share = minutes * 60 / len(devices)
    for index, tally in enumerate(tallies):
        deadline = time.monotonic() + share
        batch_seed = first_seed
        while True:
            run_batch(tally.device, batch_seed, size, tally)
            batch_seed += 1
            if time.monotonic() >= deadline:
                break
        print(f"{tally.device}: {tally.cases} cases, {len(tally.failures)} failures "
              f"({index + 1}/{len(devices)})", file=sys.stderr, flush=True)  # fmt: skip
    return tallies


def report(tallies: list[Tally], first_seed: int) -> str:
    lines = [
        f"seed {first_seed}",
        f"{'device':<8} {'cases':>8} {'ops':>9} {'chains':>9} {'failed':>7} {'failures':>8}",
    ]
    for t in tallies:
        lines.append(
            f"{t.device:<8} {t.cases:>8} {t.ops:>9} {t.chains:>9} {t.failed_devices:>7} "
            f"{len(t.failures):>8}"
        )
    total = sum(t.cases for t in tallies)
    found = [f for t in tallies for f in t.failures]
    lines.append(f"{total} cases, " + ("all clean" if not found else f"{len(found)} failures"))
    for f in found:
        lines += [
            "",
            f"FAILURE {f.device} seed {f.seed}: {f.error}",
            f"  replay: bench/fuzz.py --device {f.device} --seed {f.seed} --minutes 0",
            f.example,
        ]
    return "\n".join(lines)


def as_json(tallies: list[Tally], first_seed: int) -> dict[str, Any]:
    return {
        "seed": first_seed,
        "devices": {
            t.device: {
                "cases": t.cases,
                "ops": t.ops,
                "chains": t.chains,
                "failed_devices": t.failed_devices,
                "batches": t.batches,
                "device_stats": dict(t.stats),
                "failures": [vars(f) for f in t.failures],
            }
            for t in tallies
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, required=True, help="0: one batch per device")
    parser.add_argument("--device", choices=(*DEVICES, "all"), default="all")
    parser.add_argument("--batch", type=int, default=50, help="programs per hypothesis seed")
    parser.add_argument("--seed", type=int, help="the first batch's seed (default: the clock)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.minutes < 0 or args.batch < 1:
        parser.error("--minutes must be >= 0 and --batch >= 1")
    devices = list(DEVICES) if args.device == "all" else [args.device]
    first_seed = args.seed if args.seed is not None else int(time.time())
    tallies = fuzz(devices, args.minutes, first_seed, args.batch)
    print(json.dumps(as_json(tallies, first_seed), indent=2) if args.json else report(
        tallies, first_seed))  # fmt: skip
    return 1 if any(t.failures for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
