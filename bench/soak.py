"""Soak: many sandboxes, each used and closed; nothing may be left behind or go missing.

Usage: ``.venv/bin/python bench/soak.py [--sandboxes 1000] [--ops 10] [--concurrency 2]
[--exec echo|python] [--max-minutes M] [--json]``

Each sandbox is restored from the default template (jailed, as root, with cgroup quotas so
every one gets a cgroup), runs ``--ops`` rounds of a real exec and a file round trip (write
4 KiB, read it back, compare), then is closed. At most ``--concurrency`` sandboxes are alive at
once. The exec is ``echo TOKEN`` by default: a new guest process every time, the cheapest one
(~1 s of emulated guest kernel on an idle host of this kind); ``--exec python`` runs
``python3 -c`` instead, which the sandbox's pre-started interpreters serve while they last (two,
refilled only when the sandbox idles: after them every exec is a new ~7 s ``python3``).
``--max-minutes`` stops starting sandboxes once the budget is spent (the census still covers
every one that ran).

Before the first and after the last sandbox (and one warm-up sandbox, so the zygote and the
imports exist in both), the bench takes a census of what a sandbox can leave behind, each item
by identity, so that "leaked" (present after, not before) and "lost" (present before, gone
after) are both counted:

- processes: this process's descendants (the zygote, VMMs) and any process whose root is a
  sandbox directory of this run (a jailed VMM that escaped the tree);
- fds: every open fd of those processes and of this one, by target;
- cgroups: the directories of every sandbox's cgroup (recorded when it was made);
- namespaces: the namespaces those processes hold (other than this process's own);
- files: everything under this run's private ``TMPDIR`` (sandbox and fork directories) and
  under the template directory (which must stay exactly as it was).

Peak host memory (``MemTotal - MemAvailable``, above the baseline) and the peak PSS of this
process tree are sampled every 0.25 s. Prints medians per operation and the census; nothing is
asserted about times (``tests/integration/test_soak.py`` runs the census for a few sandboxes
and asserts 0 leaked, 0 lost). Exit status 1 if anything leaked, got lost or failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import fmt_num, format_table, summarize, to_json

from ember.zygote_fork import AHEAD_NAME

FILE_BYTES = 4096
CATEGORIES = ("processes", "fds", "cgroups", "namespaces", "files")


# --- the census -------------------------------------------------------------------------------


def _gone() -> contextlib.suppress:
    """/proc entries vanish while we read them: that is not an error here."""
    return contextlib.suppress(OSError)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> set[int]:
    children = _children_map()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _rooted_under(directory: Path) -> set[int]:
    """Processes chrooted into a directory below ``directory`` (jailed VMMs of this run)."""
    prefix = str(directory) + "/"
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root").startswith(prefix):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _fd_targets(pid: int) -> dict[str, str]:
    targets: dict[str, str] = {}
    with _gone():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with _gone():
                targets[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return targets


def _forked_ahead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == AHEAD_NAME
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _files_under(root: Path) -> set[str]:
    found: set[str] = set()
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found.add(f"{path} {st.st_size} {st.st_mtime_ns}")
    return found


@dataclass
class Census:
    items: dict[str, set[str]] = field(default_factory=lambda: {c: set() for c in CATEGORIES})

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in self.items.items()}


def take_census(tmpdir: Path, template: Path | None, cgroups: Iterable[Path]) -> Census:
    """Everything this run's sandboxes could leave behind, by identity (see the docstring)."""
    gc.collect()  # sockets and files only dropped, not yet closed, are not leaks
    census = Census()
    me = os.getpid()
    # The zygote's child forked ahead of the next request is replaced by each sandbox made,
    # so it is neither a leak nor a loss (ember.zygote_fork): it is left out, and so is the
    # pipe the zygote holds to it.
    found = _descendants(me) | _rooted_under(tmpdir)
    ahead = {p for p in found if _forked_ahead(p)}
    pids = found - ahead
    ahead_pipes = {target for pid in ahead for target in _fd_targets(pid).values()}
    for pid in sorted(pids | {me}):
        started = _start_time(pid)
        if started is None:
            continue  # gone while we looked
        with _gone():  # threads too: a sandbox must not leave one behind in this process
            for tid in os.listdir(f"/proc/{pid}/task"):
                census.items["processes"].add(f"{pid}/{tid}@{started}")
    own_ns = {}
    for ns in os.listdir("/proc/self/ns"):
        with _gone():
            own_ns[ns] = os.readlink(f"/proc/self/ns/{ns}")
    for pid in sorted(pids | {me}):
        started = _start_time(pid)
        for fd, target in _fd_targets(pid).items():
            # /proc/...: the listing's own directory fd
            if not target.startswith("/proc/") and target not in ahead_pipes:
                census.items["fds"].add(f"{pid}@{started}:{fd}->{target}")
        if pid == me:
            continue
        with _gone():
            for ns in os.listdir(f"/proc/{pid}/ns"):
                with _gone():
                    target = os.readlink(f"/proc/{pid}/ns/{ns}")
                    if own_ns.get(ns) != target:
                        census.items["namespaces"].add(target)
    census.items["cgroups"] = {str(p) for p in cgroups if p.exists()}
    census.items["files"] = _files_under(tmpdir)
    if template is not None:
        census.items["files"] |= _files_under(template)
    return census


def compare(before: Census, after: Census) -> dict[str, dict[str, Any]]:
    """Per category: counts before and after, what leaked (new) and what got lost (gone)."""
    report: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        old, new = before.items[category], after.items[category]
        report[category] = {
            "before": len(old),
            "after": len(new),
            "leaked": sorted(new - old),
            "lost": sorted(old - new),
        }
    return report


# --- memory sampling --------------------------------------------------------------------------


def _host_used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def _tree_pss_mib() -> float:
    total = 0
    for pid in _descendants(os.getpid()) | {os.getpid()}:
        with _gone(), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total / 1024


class MemorySampler:
    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.baseline_host = _host_used_mib()
        self.peak_host = self.baseline_host
        self.baseline_pss = _tree_pss_mib()
        self.peak_pss = self.baseline_pss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_host = max(self.peak_host, _host_used_mib())
            self.peak_pss = max(self.peak_pss, _tree_pss_mib())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the sandboxes ----------------------------------------------------------------------------


@dataclass
class SandboxRun:
    create_s: float = 0.0
    exec_s: list[float] = field(default_factory=list)
    file_s: list[float] = field(default_factory=list)
    close_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None
    skipped: bool = False  # not started: the time budget was spent


@dataclass
class Soak:
    """Shared state of one soak: where its sandboxes live and what they made."""

    tmpdir: Path
    quotas: bool = True
    python: bool = False  # exec python3 -c (pool-served while it lasts) instead of echo
    deadline: float | None = None  # no sandbox starts after this (time.monotonic())
    cgroups: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, index: int, ops: int) -> SandboxRun:
        from ember import Sandbox

        run = SandboxRun()
        t0 = time.monotonic()
        if self.deadline is not None and t0 > self.deadline:
            run.skipped = True
            return run
        try:
            kwargs: dict[str, Any] = {"pids": 64, "memory_mib": 1024} if self.quotas else {}
            sb = Sandbox(**kwargs)
            run.create_s = time.monotonic() - t0
            try:
                cgroup = sb._vmm.cgroup
                if cgroup is not None:
                    with self.lock:
                        self.cgroups.extend(cgroup.paths)
                payload = os.urandom(FILE_BYTES)
                for op in range(ops):
                    token = f"t{index}-{op}"
                    cmd = ["python3", "-c", f"print('{token}')"] if self.python else ["echo", token]
                    t = time.monotonic()
                    r = sb.exec(cmd, timeout=300)
                    run.exec_s.append(time.monotonic() - t)
                    if r.exit_code != 0 or r.stdout != f"{token}\n".encode():
                        raise RuntimeError(f"exec {op}: {r.exit_code} {r.stdout!r} {r.stderr!r}")
                    t = time.monotonic()
                    path = f"/tmp/soak-{op}"
                    sb.files.write(path, payload)
                    back = sb.files.read(path)
                    run.file_s.append(time.monotonic() - t)
                    if back != payload:
                        raise RuntimeError(f"file {op}: {len(back)} bytes came back changed")
            finally:
                t = time.monotonic()
                sb.close()
                run.close_s = time.monotonic() - t
        except Exception as exc:
            run.error = f"sandbox {index}: {type(exc).__name__}: {exc}"
        run.total_s = time.monotonic() - t0
        return run

    def run(self, sandboxes: int, ops: int, concurrency: int) -> list[SandboxRun]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda i: self.one(i, ops), range(sandboxes)))


def soak(
    sandboxes: int,
    ops: int,
    concurrency: int,
    *,
    quotas: bool = True,
    python: bool = False,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Run the soak in a private TMPDIR; the census report, timings and memory as a dict."""
    from ember import templates
    from ember.spec import SandboxSpec

    tmpdir = Path(tempfile.mkdtemp(prefix="ember-soak-", dir="/tmp"))
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)  # the launcher's sandbox and fork directories go here
    try:
        state = Soak(tmpdir, quotas=quotas, python=python)
        warm = state.one(-1, 1)  # the zygote, the imports, the template's page cache
        if warm.error:
            raise RuntimeError(f"the warm-up sandbox failed: {warm.error}")
        template = templates.find(spec=SandboxSpec(jail=True)).dir
        before = take_census(tmpdir, template, state.cgroups)
        started = time.monotonic()
        if max_minutes is not None:
            state.deadline = started + max_minutes * 60
        with MemorySampler() as memory:
            runs = state.run(sandboxes, ops, concurrency)
        wall = time.monotonic() - started
        after = take_census(tmpdir, template, state.cgroups)
    finally:
        tempfile.tempdir = saved
    census = compare(before, after)
    shutil.rmtree(tmpdir, ignore_errors=True)
    ran = [r for r in runs if not r.skipped]
    ok = [r for r in ran if r.error is None]
    return {
        "sandboxes": sandboxes,
        "ran": len(ran),
        "ops": ops,
        "exec": "python3 -c" if python else "echo",
        "concurrency": concurrency,
        "wall_s": wall,
        "sandboxes_per_s": len(ran) / wall if wall else None,
        "errors": [r.error for r in runs if r.error is not None],
        "timings": {
            "create_s": _summary([r.create_s for r in ok]),
            "exec_s": _summary([s for r in ok for s in r.exec_s]),
            "file_round_trip_s": _summary([s for r in ok for s in r.file_s]),
            "close_s": _summary([r.close_s for r in ok]),
            "sandbox_total_s": _summary([r.total_s for r in ok]),
        },
        "census": census,
        "memory": {
            "host_baseline_mib": memory.baseline_host,
            "host_peak_mib": memory.peak_host,
            "host_peak_above_baseline_mib": memory.peak_host - memory.baseline_host,
            "tree_pss_baseline_mib": memory.baseline_pss,
            "tree_pss_peak_mib": memory.peak_pss,
        },
    }


def _summary(values: list[float]) -> dict[str, float | int] | None:
    s = summarize(values)
    return None if s is None else s.as_dict()


def clean(report: dict[str, Any]) -> bool:
    census = report["census"]
    return not report["errors"] and all(
        not census[c]["leaked"] and not census[c]["lost"] for c in CATEGORIES
    )


def print_report(report: dict[str, Any]) -> None:
    budget = "" if report["ran"] == report["sandboxes"] else " (time budget spent)"
    print(
        f"{report['ran']} of {report['sandboxes']} sandboxes{budget} x {report['ops']} execs "
        f"({report['exec']}) + file round trips, "
        f"{report['concurrency']} at a time: {report['wall_s']:.1f} s "
        f"({fmt_num(report['sandboxes_per_s'])} sandboxes/s), {len(report['errors'])} errors"
    )
    rows = []
    for name, s in report["timings"].items():
        if s is None:
            rows.append([name, "0", "-", "-", "-"])
        else:
            rows.append(
                [name, str(s["n"]), *(fmt_num(s[k] * 1000, 1) for k in ("p50", "min", "max"))]
            )
    print()
    print(format_table(["operation", "n", "p50 ms", "min ms", "max ms"], rows))
    print()
    census = report["census"]
    rows = [
        [c, str(census[c]["before"]), str(census[c]["after"]),
         str(len(census[c]["leaked"])), str(len(census[c]["lost"]))]
        for c in CATEGORIES
    ]  # fmt: skip
    print(format_table(["census", "before", "after", "leaked", "lost"], rows))
    memory = report["memory"]
    print()
    print(
        f"host memory used: baseline {memory['host_baseline_mib']:.0f} MiB, peak "
        f"{memory['host_peak_mib']:.0f} MiB (+{memory['host_peak_above_baseline_mib']:.0f}); "
        f"this process tree's PSS: baseline {memory['tree_pss_baseline_mib']:.0f} MiB, "
        f"peak {memory['tree_pss_peak_mib']:.0f} MiB"
    )
    for c in CATEGORIES:
        for kind in ("leaked", "lost"):
            for item in census[c][kind][:10]:
                print(f"  {kind} {c}: {item}")
    for error in report["errors"][:10]:
        print(f"  error: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--ops", type=int, default=10, help="execs and file round trips each")
    parser.add_argument("--concurrency", type=int, default=2, help="sandboxes alive at once")
    parser.add_argument("--exec", choices=("echo", "python"), default="echo", dest="exec_kind")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting then")
    parser.add_argument("--no-quotas", action="store_true", help="no cgroup per sandbox")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = soak(
        args.sandboxes,
        args.ops,
        args.concurrency,
        quotas=not args.no_quotas,
        python=args.exec_kind == "python",
        max_minutes=args.max_minutes,
    )
    if args.json:
        print(to_json(report))
    else:
        print_report(report)
    return 0 if clean(report) else 1


if __name__ == "__main__":
    sys.exit(main())
