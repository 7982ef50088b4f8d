"""What a ``run_code`` costs the host at a caller's pace: the call, and the worker's poll after it.

Usage: ``.venv/bin/python bench/pace.py [--calls 16] [--runs 2] [--json]``

After a call the ``run_code`` worker polls its request ring from user space, so that a next
call close behind is answered without a guest-kernel wake-up (~0.5 ms instead of ~5 ms). A
polling vCPU is a busy host core, so how long it polls is a trade of host CPU against the
latency of the next call. For each pace (the caller's gap between a reply and its next
call) a live sandbox, kept from parking by a held connection as a spare or an interactive
caller keeps it, answers ``--calls`` calls of ``run_code('6*7')``; printed per pace: the
call's p50 milliseconds, and per call the VMM process's CPU milliseconds and the guest
kernel's emulated instructions (KVM's ``insn_emulation``) over the whole series, poll
included. One more row: an agent request (``files.write``) 30 ms after a call, which shares
the guest's one vCPU with the worker's poll unless the host tells the worker to stop first
(``CODE_NOT_YET``).

Peer, in the same run and the same sandbox, alternating series: the same calls asking the
worker to poll a fixed 0.25 s after each (``linger=0.25``), which every call did before
``codering.SpinWindow`` learnt the caller's pace, and without ``CODE_NOT_YET`` after a
call (it was stored only after a restore).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from _common import format_table, process_cpu_seconds, side_by_side, summarize, to_json

from ember import Sandbox

PACES_S = (0.0, 0.01, 0.03, 0.1, 1.0)
FIXED_S = 0.25  # the window every call had before the worker learnt the caller's pace
SETTLE_S = 0.6  # after a series: the last poll has ended, the agent's answers are done
AGENT_AFTER_S = 0.03  # within a fixed 0.25 s poll; past a lone call's learnt one


def _insns(sb: Sandbox) -> int:
    return int(sb._vmm.control("kvm-stats")["vcpus"]["insn_emulation"])


def series(
    sb: Sandbox, pid: int, pace: float, calls: int, linger: float | None
) -> dict[str, float]:
    """``calls`` calls ``pace`` seconds apart: p50 ms, and CPU ms and insns per call."""
    sb._client.run_code("6*7", linger=linger)  # the pace starts from a reply, as a caller's does
    cpu, insns = process_cpu_seconds(pid), _insns(sb)
    times = []
    for _ in range(calls):
        time.sleep(pace)
        t = time.perf_counter()
        sb._client.run_code("6*7", linger=linger)
        times.append(1e3 * (time.perf_counter() - t))
    time.sleep(SETTLE_S)
    return {
        "ms": statistics.median(times),
        "cpu_ms": 1e3 * (process_cpu_seconds(pid) - cpu) / calls,
        "insns": (_insns(sb) - insns) / calls,
    }


def agent_after_call(sb: Sandbox, linger: float | None) -> float:
    """ms of a ``files.write`` made 30 ms after a ``run_code``, during a fixed poll. The
    peer's (``linger``) does not tell the worker to stop polling first, as none did before."""
    session = sb._client._session
    not_yet, session.not_yet = session.not_yet, (None if linger else session.not_yet)
    try:
        sb._client.run_code("6*7", linger=linger)
        time.sleep(AGENT_AFTER_S)
        t = time.perf_counter()
        sb.files.write("/tmp/pace", b"x")
        ms = 1e3 * (time.perf_counter() - t)
    finally:
        session.not_yet = not_yet
    time.sleep(SETTLE_S)
    return ms


def one(calls: int, flip: bool) -> dict[str, dict[str, float]]:
    """Every series once for each side, in one sandbox; ``flip`` runs the peer's first."""
    found: dict[str, dict[str, float]] = {}
    sides: list[tuple[str, float | None]] = [("ember", None), ("fixed", FIXED_S)]
    if flip:  # a series after another one is sometimes slower: alternate who goes first
        sides.reverse()
    with Sandbox() as sb:
        held = sb._vmm.connect()  # as a spare holds one: the VM is not parked between calls
        try:
            pid = sb._vmm.vmm_pid
            assert pid is not None
            sb.run_code("6*7")
            time.sleep(SETTLE_S)
            for pace in PACES_S:
                for who, linger in sides:
                    for key, value in series(sb, pid, pace, calls, linger).items():
                        found.setdefault(who, {})[f"{pace:g}/{key}"] = value
            for who, linger in sides:
                found[who]["agent_ms"] = statistics.median(
                    agent_after_call(sb, linger) for _ in range(5)
                )
        finally:
            held.close()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2, help="sandboxes, each runs every series")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [one(args.calls, flip=bool(run % 2)) for run in range(args.runs)]
    report: dict[str, dict[str, Any]] = {"ember": {}, "fixed": {}}
    for who in report:
        for key in runs[0][who]:
            summary = summarize([run[who][key] for run in runs])
            report[who][key] = None if summary is None else summary.as_dict()
    if args.json:
        print(to_json(report))
        return 0
    labels = (("ms", "run_code p50 (ms)", 2), ("cpu_ms", "VMM CPU per call (ms)", 1),
              ("insns", "emulated insns per call", 0))  # fmt: skip
    keys = [(f"{pace:g}/{key}", f"gap {1e3 * pace:g} ms: {label}", digits)
            for pace in PACES_S for key, label, digits in labels]  # fmt: skip
    keys.append(("agent_ms", f"files.write {1e3 * AGENT_AFTER_S:g} ms after a call (ms)", 1))
    rows = side_by_side(report["ember"], report["fixed"], [(lb, k, d) for k, lb, d in keys])
    print(f"p50 over {args.runs} sandboxes x {args.calls} calls per series")
    print(format_table(["what", "ember (learnt window)", "fixed 0.25 s", "ember/fixed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
