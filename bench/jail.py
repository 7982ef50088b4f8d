"""What the jail costs: sandbox creation and first answer with and without it.

Usage: ``.venv/bin/python bench/jail.py [--runs 20] [--json]`` (as root: the jail needs it)

Both arms restore the same default template through the same warm zygote;
the jailed arm adds the PID-namespace relay, the other namespaces, the
chroot, rlimits, the uid drop and per-thread seccomp filters.  Runs
alternate between the arms so drift on a shared host hits both alike.
Medians, p90s and the jailed/unjailed ratio are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from _common import fmt_num, format_table, to_json
from restore import quantiles

from ember import Sandbox


def one(jail: bool) -> tuple[float, float, float]:
    started = time.perf_counter()
    sb = Sandbox(jail=jail)
    ready = (time.perf_counter() - started) * 1000
    try:
        sb.ping()
        ping = (time.perf_counter() - started) * 1000
        assert sb.exec(["true"]).exit_code == 0
        exec_true = (time.perf_counter() - started) * 1000
    finally:
        sb.close()
    return ready, ping, exec_true


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the cost of the VMM jail")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/jail.py: the jail needs root", file=sys.stderr)
        return 2
    Sandbox(jail=True).close()  # warm the zygote and the template
    samples: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for i in range(args.runs):
        for jail in (True, False) if i % 2 == 0 else (False, True):
            samples[jail].append(one(jail))
    report: dict[str, Any] = {}
    for jail, rows in samples.items():
        name = "jailed" if jail else "unjailed"
        report[name] = {
            key: quantiles([row[i] for row in rows])
            for i, key in enumerate(("ready_ms", "ping_ms", "exec_true_ms"))
        }
    if args.json:
        print(to_json(report))
        return 0
    table = []
    for key in ("ready_ms", "ping_ms", "exec_true_ms"):
        jailed, free = report["jailed"][key], report["unjailed"][key]
        ratio = jailed["p50"] / free["p50"] if jailed["p50"] and free["p50"] else None
        table.append(
            [key, fmt_num(free["p50"], 1), fmt_num(free["p90"], 1), fmt_num(jailed["p50"], 1),
             fmt_num(jailed["p90"], 1), fmt_num(ratio, 2) + "x" if ratio else "-"]
        )  # fmt: skip
    print(format_table(["from Sandbox() to", "unjailed p50", "p90", "jailed p50", "p90", "ratio"],
                       table))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
