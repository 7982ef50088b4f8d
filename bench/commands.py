"""Common shell commands in a sandbox: a fresh sandbox's first run of each, and its second.

Usage: ``.venv/bin/python bench/commands.py [--runs 3] [--json]``

A Python ``exec`` goes to a pre-started interpreter; every other command is a new guest
process, and on a kvm_pvm host its exec, page faults and exit run in the emulated guest
kernel. What a template can do for them: have their binaries and libraries in its page cache
(``ember.agent.pagecache``), and C.UTF-8 in the locale archive (``ember.images.rootfs``), so
that ``setlocale`` maps one file instead of opening and mapping twelve.

Each run restores a fresh sandbox, runs every command of :data:`COMMANDS` once (its first run
in that sandbox), then each again; the host runs the same command lines as plain
subprocesses (``LANG=C.UTF-8``), the floor. Medians over ``--runs``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_num, fmt_ratio, format_table, ratio, to_json

from ember import Sandbox

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("true",),
    ("env",),
    ("ls", "-la", "/"),
    ("cat", "/etc/os-release"),
    ("grep", "-c", "root", "/etc/passwd"),
    ("sed", "-n", "1p", "/etc/passwd"),
    ("sort", "/etc/passwd"),
    ("find", "/etc", "-name", "passwd"),
    ("bash", "-c", "true"),
    ("sh", "-c", "echo hi | cat"),
)


def bench_sandbox(runs: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {"first": {}, "second": {}}
    for _ in range(runs):
        with Sandbox() as sb:
            sb.ping()  # the restore's own first request is not a command's
            for key in ("first", "second"):
                for argv in COMMANDS:
                    t = time.monotonic()
                    result = sb.exec(list(argv), timeout=300)
                    elapsed = time.monotonic() - t
                    if result.exit_code != 0:
                        raise SystemExit(f"{' '.join(argv)}: exit {result.exit_code}: {result}")
                    out[key].setdefault(" ".join(argv), []).append(elapsed)
    return out


def bench_host(runs: int) -> dict[str, list[float]]:
    env = {**os.environ, "LANG": "C.UTF-8"}
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        for argv in COMMANDS:
            t = time.monotonic()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            out.setdefault(" ".join(argv), []).append(time.monotonic() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sandbox = bench_sandbox(args.runs)
    host = bench_host(max(args.runs, 5))
    rows: dict[str, dict[str, float]] = {}
    for argv in COMMANDS:
        name = " ".join(argv)
        rows[name] = {
            "first": statistics.median(sandbox["first"][name]),
            "second": statistics.median(sandbox["second"][name]),
            "host": statistics.median(host[name]),
        }
    rows["all of them"] = {
        key: sum(r[key] for r in rows.values()) for key in ("first", "second", "host")
    }
    if args.json:
        print(to_json({"runs": args.runs, "rows": rows}))
        return
    table = [
        [name, fmt_num(r["first"], 3), fmt_num(r["second"], 3), fmt_num(r["host"], 4),
         fmt_ratio(ratio(r["second"], r["host"]))]
        for name, r in rows.items()
    ]  # fmt: skip
    headers = ["seconds (p50)", "1st in a fresh sandbox", "2nd", "host", "2nd/host"]
    print(format_table(headers, table))


if __name__ == "__main__":
    main()
