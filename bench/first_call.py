"""Where a restored sandbox's first ``run_code`` goes: before or after the worker first runs.

Usage: ``.venv/bin/python bench/first_call.py [--runs 8] [--template NAME] [--wait S]``

A template is snapshotted while its ``run_code`` worker polls its code ring from user space,
so a restored sandbox could answer its first ``run_code`` without entering the guest kernel.
It does not: on kvm_pvm the restored guest's kernel runs first, and every guest-kernel
instruction is emulated (~1 us each). This bench splits ``Sandbox()`` → first reply into

- ``ready``: ``Sandbox()`` returns;
- ``announce``: ready → the worker has laid out its rings in the new region (its first
  user-mode instructions after the restore, seen by the host in shared memory);
- ``request``: announce → the reply (the ``resume``: clock step, host entropy into the
  guest kernel's pool and a CRNG reseed; ``random`` reseeded; the cell);

with KVM's ``insn_emulation`` counter for each guest phase (the guest kernel's work), and
the same ``run_code`` once more as the peer: the steady-state cost of a call in the same
sandbox. ``--wait S`` sleeps S seconds after ``ready`` before the request: a cost paid
whether or not the host waits is the restored kernel's own catch-up, not the request's.
Medians over the runs; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import ember.client.code_ring as code_ring
from ember import Sandbox

PHASES = ("ready_ms", "announce_ms", "request_ms", "total_ms", "second_ms")
COUNTS = ("announce_insn", "request_insn", "second_insn")


def emulated(sb: Sandbox) -> int:
    """KVM's count of emulated guest instructions for this VM so far (ember.kvm.stats)."""
    stats = sb._vmm.control("kvm-stats")
    return sum(int(stats[section].get("insn_emulation", 0)) for section in ("vcpus", "vm"))


class Announcement:
    """Notes when the host first sees the restored worker's rings (the SDK waits for them
    once per restore, in ``code_ring._await_announcement``), and the count at that moment."""

    def __init__(self) -> None:
        self.sandbox: Sandbox | None = None
        self.at: float | None = None
        self.insn: int | None = None
        self._original = code_ring._await_announcement
        code_ring._await_announcement = self._seen

    def _seen(self, req_ctl: memoryview, generation: int) -> None:
        self._original(req_ctl, generation)
        self.at = time.perf_counter()
        if self.sandbox is not None:
            self.insn = emulated(self.sandbox)


def one_run(template: str | None, wait: float, seen: Announcement) -> dict[str, float]:
    seen.sandbox, seen.at, seen.insn = None, None, None
    started = time.perf_counter()
    sb = Sandbox(template=template)
    try:
        ready = time.perf_counter()
        seen.sandbox = sb
        before = emulated(sb)
        if wait:
            time.sleep(wait)
        sent = time.perf_counter()
        assert sb.run_code("6*7").value == "42"
        replied = time.perf_counter()
        after = emulated(sb)
        assert sb.run_code("6*7").value == "42"
        second = time.perf_counter()
        last = emulated(sb)
    finally:
        sb.close()
    if seen.at is None or seen.insn is None:
        raise SystemExit("the first run_code did not wait for the worker's rings (no code ring?)")
    return {
        "ready_ms": (ready - started) * 1e3,
        "announce_ms": (seen.at - sent) * 1e3,
        "request_ms": (replied - seen.at) * 1e3,
        "total_ms": (replied - started) * 1e3,
        "second_ms": (second - replied) * 1e3,
        "announce_insn": seen.insn - before,
        "request_insn": after - seen.insn,
        "second_insn": last - after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--template", default=None)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds after ready")
    args = parser.parse_args()
    seen = Announcement()
    Sandbox(template=args.template).close()  # the zygote warm, the template built
    rows: list[dict[str, Any]] = [one_run(args.template, args.wait, seen) for _ in range(args.runs)]
    print(f"first run_code after a restore: {args.runs} runs, --wait {args.wait:g} s (p50)")
    for key in PHASES + COUNTS:
        p50 = statistics.median(row[key] for row in rows)
        unit = "" if key.endswith("insn") else " ms"
        print(f"  {key:14} {p50:10.1f}{unit}")
    first = statistics.median(row["announce_insn"] + row["request_insn"] for row in rows)
    peer = statistics.median(row["second_insn"] for row in rows) or 1
    print(f"  emulated instructions, first call / second call: {first / peer:.1f}x")


if __name__ == "__main__":
    main()
