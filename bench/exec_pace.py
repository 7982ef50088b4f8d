"""Python programs at a caller's pace: does the interpreter pool keep up?

Usage: ``.venv/bin/python bench/exec_pace.py [--execs 8] [--paces 5,2] [--runs 1] [--json]``

A sandbox's pool holds four pre-started interpreters (two started, two forked and warmed in
the template); each program uses one up, and the pool refills, by forks of its mother, only
while the sandbox is idle. An agent calling ``exec(["python3", "-c", ...])`` every few
seconds therefore finds a member waiting only as long as a refill (the fork, the child's start
and its warm-up: seconds of emulated guest kernel here) fits between two calls. For each
pace (seconds between a reply and the next call) a fresh sandbox runs ``--execs`` programs;
printed per pace: the p50 over the first four (the template's members), over the rest (the
refills'), and the slowest. ``bench/run.py`` times the first five at 2 s.

Peer, in the same run: the same program as a ``python3`` subprocess on the host, the floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import fmt_num, fmt_ratio, format_table, ratio, to_json
from run import host_python  # the same host peer as bench/run.py's

from ember import Sandbox

CODE = "print(1)"
TEMPLATE_MEMBERS = 4  # the default template's pool


def series(pace: float, execs: int) -> list[float]:
    """Seconds per exec of ``execs`` programs, ``pace`` seconds apart, in one new sandbox."""
    took = []
    with Sandbox() as sb:
        for i in range(execs):
            if i:
                time.sleep(pace)
            start = time.monotonic()
            result = sb.exec(["python3", "-c", CODE], timeout=600)
            took.append(time.monotonic() - start)
            if result.stdout != b"1\n":
                raise SystemExit(f"exec {i + 1} at a {pace} s pace: {result}")
    return took


def host_floor(runs: int) -> float:
    """Median seconds of the same program as a host subprocess."""
    times = []
    for _ in range(max(3, runs)):
        start = time.monotonic()
        subprocess.run([host_python(), "-c", CODE], capture_output=True, check=True)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=8)
    parser.add_argument("--paces", default="5,2", help="seconds between calls, comma-separated")
    parser.add_argument("--runs", type=int, default=1, help="sandboxes per pace")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    paces = [float(p) for p in args.paces.split(",")]
    Sandbox().close()  # the zygote warm, the template built: not timed
    report: dict[str, Any] = {"paces": {}}
    for pace in paces:
        runs = [series(pace, args.execs) for _ in range(args.runs)]
        first = [t for run in runs for t in run[:TEMPLATE_MEMBERS]]
        rest = [t for run in runs for t in run[TEMPLATE_MEMBERS:]]
        report["paces"][str(pace)] = {
            "runs": runs,
            "first_p50": statistics.median(first),
            "rest_p50": statistics.median(rest) if rest else None,
            "max": max(max(run) for run in runs),
        }
    report["host"] = host_floor(args.runs)
    if args.json:
        print(to_json(report))
        return
    rows = []
    for pace, figures in report["paces"].items():
        rest = figures["rest_p50"]
        rows.append([f"{args.execs} execs {pace} s apart", fmt_num(figures["first_p50"], 3),
                     fmt_num(rest, 3), fmt_num(figures["max"], 3), fmt_num(report["host"], 3),
                     fmt_ratio(ratio(rest, report["host"]))])  # fmt: skip
    headers = ["seconds (p50)", "1st-4th", "5th on", "slowest", "host", "5th on/host"]
    print(format_table(headers, rows))
    for pace, figures in report["paces"].items():
        for run in figures["runs"]:
            print(f"  {pace} s apart: " + " ".join(f"{t:.2f}" for t in run), file=sys.stderr)


if __name__ == "__main__":
    main()
