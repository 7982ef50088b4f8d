"""What an idle sandbox costs while it is not parked, and what its next call pays for it.

Usage: ``.venv/bin/python bench/idle.py [--runs 6] [--seconds 10] [--json]``

A sandbox is parked (its vCPUs stopped) only when no host connection is open; one that
holds a connection (a spare, an interactive caller between calls) stays running, and every
wake-up of its guest kernel is emulated here. Each run restores a sandbox, makes a call,
holds a connection open, waits for the ``run_code`` worker to stop polling, then measures
for ``--seconds``: the VMM process's CPU (share of one core), KVM's emulated instructions
and halt exits per second, and a ``run_code('6*7')`` made 3 s after the last one (its time
and emulated instructions); then, the connections closed, the same call made to the VM 3 s
after it was parked (the guest's deferred work runs when it is woken).

Peer, measured in the same run on alternate sandboxes: the same guest with the kernel's
default housekeeping restored through ``/proc/sys`` (proactive compaction at 20, vmstat's
fold every second), which is what the guest ran before ``vmm.config.QUIET_SYSCTLS``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from _common import format_table, process_cpu_seconds, side_by_side, summarize, to_json

from ember import Sandbox

DEFAULTS = "echo 20 > /proc/sys/vm/compaction_proactiveness; echo 1 > /proc/sys/vm/stat_interval"
POLL_END_S = 0.6  # the worker's poll after a call has ended; the agent's answers settle too
GAP_S = 3.0
PARK_WAIT_S = 20.0  # an idle VM with no host connection is parked within seconds


def _kvm(sb: Sandbox) -> tuple[int, int]:
    vcpus = sb._vmm.control("kvm-stats")["vcpus"]
    return int(vcpus["insn_emulation"]), int(vcpus["halt_exits"])


def one(seconds: float, defaults: bool) -> dict[str, float]:
    with Sandbox() as sb:
        if defaults:
            assert sb.exec(["sh", "-c", DEFAULTS], timeout=120).exit_code == 0
        sb.run_code("6*7")
        held = sb._vmm.connect()  # as a spare holds one: the VM is not parked
        try:
            pid = sb._vmm.vmm_pid
            assert pid is not None
            time.sleep(POLL_END_S)
            cpu, (insns, halts), t = process_cpu_seconds(pid), _kvm(sb), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t
            cpu, (insns2, halts2) = process_cpu_seconds(pid) - cpu, _kvm(sb)
            sb.run_code("6*7")
            time.sleep(GAP_S)
            call_ms, call_insns = _call(sb)
        finally:
            held.close()
        sb._client.close()  # the SDK's kept connection too: now the VM may park
        deadline = time.monotonic() + PARK_WAIT_S
        while not sb._vmm.control("status")["paused"] and time.monotonic() < deadline:
            time.sleep(0.1)
        parked = bool(sb._vmm.control("status")["paused"])
        time.sleep(GAP_S)
        parked_ms, parked_insns = _call(sb)
    return {
        "vmm_cpu_pct": 100 * cpu / elapsed,
        "insns_per_s": (insns2 - insns) / elapsed,
        "halts_per_s": (halts2 - halts) / elapsed,
        "call_after_3s_ms": call_ms,
        "call_after_3s_insns": float(call_insns),
        "parked_call_ms": parked_ms if parked else float("nan"),
        "parked_call_insns": float(parked_insns) if parked else float("nan"),
    }


def _call(sb: Sandbox) -> tuple[float, int]:
    """A ``run_code('6*7')``: its milliseconds and the guest kernel's emulated instructions."""
    before = _kvm(sb)[0]
    t = time.perf_counter()
    sb.run_code("6*7")
    return 1e3 * (time.perf_counter() - t), _kvm(sb)[0] - before


ROWS = (
    ("VMM process CPU while idle (% of a core)", "vmm_cpu_pct", 2),
    ("emulated guest instructions per second while idle", "insns_per_s", 0),
    ("halt exits per second while idle", "halts_per_s", 1),
    ("run_code 3 s after the last call (ms)", "call_after_3s_ms", 1),
    ("its emulated guest instructions", "call_after_3s_insns", 0),
    ("run_code after 3 s parked (ms)", "parked_call_ms", 1),
    ("its emulated guest instructions", "parked_call_insns", 0),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found: dict[str, list[dict[str, float]]] = {"ember": [], "defaults": []}
    for _ in range(args.runs):  # alternate, so both see the same hour of a noisy host
        found["ember"].append(one(args.seconds, defaults=False))
        found["defaults"].append(one(args.seconds, defaults=True))
    report: dict[str, dict[str, Any]] = {who: {} for who in found}
    for who, runs in found.items():
        for _, key, _ in ROWS:
            summary = summarize([run[key] for run in runs if not math.isnan(run[key])])
            report[who][key] = None if summary is None else summary.as_dict()
    if args.json:
        print(to_json(report))
        return 0
    rows = side_by_side(report["ember"], report["defaults"], ROWS)
    print(f"p50 of {args.runs} sandboxes each, {args.seconds:g} s idle with a connection held")
    print(format_table(["what", "ember", "kernel defaults", "ember/defaults"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
