"""How many sandboxes one host holds, each answering a ping, and what stops it (issue 17, item 3).

Usage: ``.venv/bin/python bench/density.py [--max 2000] [--floor-gib 3] [--json]``

Creates default sandboxes one after another, each pinged once it is made, until ``--max`` live
sandboxes, or the host's ``MemAvailable`` falls to ``--floor-gib`` (the bench's own guard: a
shared host must keep working), or a creation fails (its ``EmberError`` is the limit found).
Then every live sandbox is pinged again after an idle pause (parked sandboxes are woken), and
the report gives the live count, host free memory, per-sandbox host memory (USS of the VMM
processes, and the kernel side: page tables, slab, kernel stacks, all from /proc/meminfo
deltas), ping p50/p99 over all of them, what stopped the run and what would lift it.

Peer, measured in the same run: the USS of an idle ``python3`` process (a VMM is a forked
Python, so this is the floor it starts from).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember import Sandbox
from ember.errors import EmberError

MEMINFO_KEYS = ("MemAvailable", "MemFree", "AnonPages", "PageTables", "KernelStack",
                "SUnreclaim", "Slab", "Shmem", "Cached")  # fmt: skip
USS_SAMPLE = 100  # VMMs whose smaps_rollup is read (reading all 2,000 takes long)


def meminfo() -> dict[str, int]:
    """KiB per key of /proc/meminfo."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_KEYS:
            values[key] = int(rest.split()[0])
    return values


def uss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_"))


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ping_ms(sb: Sandbox) -> float | None:
    started = time.perf_counter()
    try:
        if not sb.ping().get("pong"):
            return None
    except EmberError:
        return None
    return (time.perf_counter() - started) * 1000


def host_limits() -> dict[str, int]:
    def read_int(path: str) -> int:
        try:
            return int(Path(path).read_text().split()[0])
        except (OSError, ValueError):
            return -1

    return {
        "pid_max": read_int("/proc/sys/kernel/pid_max"),
        "threads_max": read_int("/proc/sys/kernel/threads-max"),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "threads_now": sum(1 for _ in Path("/proc").glob("[0-9]*/task/[0-9]*")),
    }


def python_peer_uss_kib() -> int | None:
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        return uss_kib(peer.pid)
    finally:
        peer.kill()
        peer.wait()


def lift_hint(stopped_by: str) -> str:
    if stopped_by.startswith("memory"):
        return ("host memory: fewer private pages per VMM (USS) and per guest (balloon or "
                "free page reporting), or more RAM")  # fmt: skip
    if stopped_by.startswith("max"):
        return "none reached: raise --max"
    if any(m in stopped_by for m in ("Too many open files", "EMFILE", "RLIMIT_NOFILE")):
        return "file descriptors of the host process: raise RLIMIT_NOFILE (ulimit -n)"
    if "fork" in stopped_by or "EAGAIN" in stopped_by:
        return "processes/threads: kernel.pid_max, kernel.threads-max or a pids cgroup"
    return "see the error"


def raise_nofile(wanted: int) -> tuple[int, int]:
    """This process holds ~13 descriptors per live sandbox: take ``wanted`` if allowed (root
    may raise the hard limit up to fs.nr_open), else the hard limit. Returns the old limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        target = min(wanted, nr_open)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def run(
    maximum: int, floor_gib: float, idle_s: float, template: str | None, nofile: int = 65536
) -> dict[str, Any]:
    soft, hard = raise_nofile(nofile)
    Sandbox(template=template).close()  # the zygote warm, the template cached
    peer = python_peer_uss_kib()
    before = meminfo()
    live: list[Sandbox] = []
    create_ms: list[float] = []
    first_ping: list[float] = []
    stopped_by = f"max ({maximum})"
    failures_after_limit = 0
    started_all = time.monotonic()
    try:
        while len(live) < maximum:
            if meminfo()["MemAvailable"] < floor_gib * (1 << 20):
                stopped_by = f"memory (MemAvailable below the bench's floor, {floor_gib} GiB)"
                break
            started = time.perf_counter()
            try:
                sb = Sandbox(template=template)
            except EmberError as exc:
                stopped_by = f"creation failed: {type(exc).__name__}: {exc}"[:300]
                break
            create_ms.append((time.perf_counter() - started) * 1000)
            live.append(sb)
            answer = ping_ms(sb)
            if answer is None:
                stopped_by = f"sandbox {len(live)} did not answer its first ping"
                break
            first_ping.append(answer)
            if len(live) % 100 == 0:
                free = meminfo()["MemAvailable"] / (1 << 20)
                print(f"  {len(live)} live, {free:.1f} GiB available, "
                      f"{time.monotonic() - started_all:.0f} s", file=sys.stderr)  # fmt: skip
        elapsed = time.monotonic() - started_all
        if not stopped_by.startswith(("max", "memory")):
            # At the limit: one more creation must fail cleanly, not break the others.
            try:
                Sandbox(template=template).close()
            except EmberError:
                failures_after_limit += 1
        at_limit = meminfo()
        limits = host_limits()
        time.sleep(idle_s)  # let them settle and park
        pings = [ping_ms(sb) for sb in live]
        answered = [p for p in pings if p is not None]
        step = max(1, len(live) // USS_SAMPLE)
        uss = [u for u in (uss_kib(sb._vmm.vmm_pid or 0) for sb in live[::step]) if u]
    finally:
        closers = [threading.Thread(target=close_all, args=(live[i::4],)) for i in range(4)]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    n = max(1, len(live))
    per_sandbox = {k: (before[k] - at_limit[k] if k in ("MemAvailable", "MemFree")
                       else at_limit[k] - before[k]) / n / 1024 for k in MEMINFO_KEYS}  # fmt: skip
    return {
        "live": len(live),
        "answered": len(answered),
        "stopped_by": stopped_by,
        "lift": lift_hint(stopped_by),
        "extra_creation_failed_cleanly": failures_after_limit,
        "elapsed_s": elapsed,
        "available_gib_before": before["MemAvailable"] / (1 << 20),
        "available_gib_at_limit": at_limit["MemAvailable"] / (1 << 20),
        "per_sandbox_mib": per_sandbox,
        "vmm_uss_mib_p50": (statistics.median(uss) / 1024) if uss else None,
        "peer_python_uss_mib": peer / 1024 if peer else None,
        "create_ms": {"p50": percentile(create_ms, 0.5), "p99": percentile(create_ms, 0.99)},
        "first_ping_ms": {"p50": percentile(first_ping, 0.5), "p99": percentile(first_ping, 0.99)},
        "ping_all_ms": {"p50": percentile(answered, 0.5), "p99": percentile(answered, 0.99)},
        "host_limits": limits,
    }


def close_all(boxes: list[Sandbox]) -> None:
    for sb in boxes:
        with contextlib.suppress(Exception):
            sb.close()


def render(r: dict[str, Any]) -> str:
    def ms(d: dict[str, float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:.1f}" for v in (d["p50"], d["p99"]))

    per = r["per_sandbox_mib"]
    uss, peer = r["vmm_uss_mib_p50"], r["peer_python_uss_mib"]
    ratio = f"{uss / peer:.2f}x" if uss and peer else "-"
    return "\n".join([
        f"live sandboxes: {r['live']} ({r['answered']} answered the final ping) in "
        f"{r['elapsed_s']:.0f} s; stopped by: {r['stopped_by']}",
        f"what would lift it: {r['lift']}",
        f"host MemAvailable: {r['available_gib_before']:.1f} -> "
        f"{r['available_gib_at_limit']:.1f} GiB",
        f"per sandbox: {per['MemAvailable']:.2f} MiB of MemAvailable; anon {per['AnonPages']:.2f}, "
        f"page tables {per['PageTables']:.2f}, kernel stacks {per['KernelStack']:.2f}, "
        f"unreclaimable slab {per['SUnreclaim']:.2f}, page cache {per['Cached']:.2f} MiB",
        f"VMM USS p50 {uss or 0:.2f} MiB; idle python3 peer {peer or 0:.2f} MiB; "
        f"VMM / peer {ratio}",
        f"Sandbox() ms p50/p99 {ms(r['create_ms'])}; first ping {ms(r['first_ping_ms'])}; "
        f"ping of all after idle {ms(r['ping_all_ms'])}",
        f"extra creation at the limit failed cleanly: {r['extra_creation_failed_cleanly']}; "
        f"host: {r['host_limits']}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--max", type=int, default=2000)
    parser.add_argument("--floor-gib", type=float, default=3.0,
                        help="stop when MemAvailable falls below this (a shared host)")  # fmt: skip
    parser.add_argument("--idle", type=float, default=3.0, help="pause before the final pings")
    parser.add_argument(
        "--template", default=None, help="restore this template (default: the default)"
    )
    parser.add_argument(
        "--nofile", type=int, default=65536,
        help="RLIMIT_NOFILE to take for this process (root may raise the hard limit)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.max, args.floor_gib, args.idle, args.template, args.nofile)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
