"""Sequential disk read: Ember's virtio-blk against QEMU microvm's, same guest, same disk.

Usage: ``.venv/bin/python bench/blk.py [--runs 3] [--size-mib 256] [--bs 1M] [--mem 256]
[--only ember|qemu] [--json]``

Each run boots a VMM with the root file system (``/dev/vda``, read-only under ember-init's
overlay) and a data disk (``/dev/vdb``, read-only) and runs one workload in the guest::

    dd if=/dev/vdb of=/dev/null bs=1M iflag=direct

``iflag=direct`` bypasses the guest's page cache, so every byte crosses the virtio-blk device.
dd's summary line (``N bytes (...) copied, S s, R MB/s``) is read from the serial console; the
rate is recomputed from its bytes and seconds (decimal MB/s, as dd prints it). The run's wall
time, from just before the VMM is spawned to its exit, is recorded too: it is mostly boot.

Fairness (DESIGN.md §6): both VMMs get the same kernel, initrd, rootfs, CPU feature mask and
kernel command line, and the runs alternate, swapping which VMM goes first each round. The data
disk is written once per bench run from ``os.urandom`` (real data, not a sparse file whose holes
the host never reads) and fsynced, so it sits clean in the host page cache for every run of
both VMMs; the kernel, initrd and rootfs are read once before the first run for the same
reason. How much of the data disk was resident before each run is measured (``mincore``) and
reported, so a cold first run would show. Ember serves requests with ``preadv`` on a normally
opened file (host page cache); QEMU gets its defaults, ``cache=writeback,aio=threads``, which
read through the same cache.

QEMU's microvm (``acpi=off``) announces its virtio-mmio transports on the kernel command line
itself; the guest probes them so that the first ``-device`` is ``/dev/vda``: the root, as in
Ember. A swapped order cannot pass unnoticed: ember-init would fail to mount the data disk as
ext4, and dd must report exactly the data disk's size. QEMU exits 0 on any guest reboot, so the
workload's status is read from the kernel's ``ember-exit=N`` restart line on its console (Ember
turns that line into its own exit status). On a failed run the console tail goes to stderr.

On this host the guest kernel is emulated (HOST.md), so a run takes ~20-60 s and the figures
are the host's, not the design's: only the ratio means something. Times are never asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    RunResult,
    ember_over_qemu,
    fmt_num,
    fmt_range,
    fmt_ratio,
    format_table,
    p50,
    page_cache_fraction,
    run_measured,
    summarize,
    to_json,
)
from boot import (
    CMDLINE,
    VMMS,
    BenchError,
    default_artifact,
    ember_cmd_words,
    ember_env,
    qemu_base_argv,
    qemu_cmdline,
    schedule,
)

MIB = 1 << 20

#: The part of dd's summary line every GNU coreutils version prints; the console line holding it
#: is the one parsed.
DD_MARKER = b" copied, "

#: ``268435456 bytes (268 MB, 256 MiB) copied, 24.6 s, 10.9 MB/s`` (no parenthesis below 1 kB).
DD_SUMMARY = re.compile(
    r"(?P<bytes>\d+) bytes (?:\([^)]*\) )?copied, "
    r"(?P<seconds>[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?) s, (?P<rate>[^,]+/s)\s*$"
)

#: What ``kernel_restart()`` prints for ember-init's ``reboot(RESTART2, "ember-exit=N")``: the
#: workload's exit status (the same pattern as ``ember.vmm.console.EXIT_STATUS``; the bench is
#: stdlib-only, so it does not import it).
EXIT_STATUS = re.compile(rb"reboot: Restarting system with command 'ember-exit=(\d{1,3})'")

#: Console lines shown on stderr for a failed run.
FAILURE_CONSOLE_LINES = 60

#: Data disk writes: 1 MiB of os.urandom at a time.
CHUNK = MIB

#: A dd block size: digits and an optional suffix (``4096``, ``64K``, ``1M``, ``1MiB``...).
BS_PATTERN = re.compile(r"[0-9]+[A-Za-z]*")

#: Page-cache residency from which a run counts as warm (readahead rounding aside).
WARM_FRACTION = 0.99


@dataclass(frozen=True)
class BlkInputs:
    """What both VMMs run: the same guest files, data disk, memory, command line and workload."""

    kernel: Path
    initrd: Path
    rootfs: Path
    data: Path
    size_mib: int
    bs: str
    mem_mib: int
    cmdline: str = CMDLINE

    @property
    def workload(self) -> list[str]:
        return ["dd", "if=/dev/vdb", "of=/dev/null", f"bs={self.bs}", "iflag=direct"]

    @property
    def size_bytes(self) -> int:
        return self.size_mib * MIB


def ember_argv(inputs: BlkInputs, python: str = sys.executable) -> list[str]:
    """``python -m ember.cli.main boot`` with the rootfs, the data disk read-only, and dd."""
    return [
        python,
        "-m",
        "ember.cli.main",
        "boot",
        "--kernel",
        str(inputs.kernel),
        "--initrd",
        str(inputs.initrd),
        "--rootfs",
        str(inputs.rootfs),
        "--disk",
        f"{inputs.data}:ro",
        "--mem",
        str(inputs.mem_mib),
        "--cmdline",
        inputs.cmdline,
        "--",
        *inputs.workload,
    ]


def qemu_argv(inputs: BlkInputs, qemu: str = "qemu-system-x86_64") -> list[str]:
    """bench/boot.py's QEMU microvm, plus the same two disks and ember-init's command line.

    Both drives use QEMU's default cache mode (writeback: the host page cache, as Ember's plain
    ``preadv``) and ``aio=threads`` (its default too), read-only like Ember's.
    """
    drive = "format=raw,if=none,readonly=on,cache=writeback,aio=threads"
    return [
        *qemu_base_argv(inputs.mem_mib, inputs.kernel, inputs.initrd, qemu),
        "-drive", f"id=root,file={inputs.rootfs},{drive}",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=data,file={inputs.data},{drive}",
        "-device", "virtio-blk-device,drive=data",
        "-append", f"{qemu_cmdline(inputs.cmdline)} {ember_cmd_words(inputs.workload)}",
    ]  # fmt: skip


@dataclass(frozen=True)
class DdSummary:
    """dd's summary line: bytes copied, its own seconds, its own rate text."""

    bytes: int
    seconds: float
    rate: str

    @property
    def mb_s(self) -> float | None:
        """Decimal megabytes per second, from bytes and seconds (dd's unit, more digits)."""
        return None if self.seconds <= 0 else self.bytes / self.seconds / 1e6


def parse_dd_summary(console: bytes) -> DdSummary | None:
    """The last dd summary line in the console output, if any.

    Read from the console tail rather than the marker scanner's line: the scanner only sees the
    line from the chunk holding the marker, and a serial console delivers lines in pieces.
    """
    for line in reversed(console.decode("utf-8", "replace").splitlines()):
        match = DD_SUMMARY.search(line.strip())
        if match is not None:
            return DdSummary(int(match["bytes"]), float(match["seconds"]), match["rate"].strip())
    return None


def workload_status(vmm: str, result: RunResult) -> int | None:
    """The guest workload's exit status: Ember's own, or the restart line on QEMU's console."""
    if vmm == "ember":
        return result.returncode
    found = EXIT_STATUS.findall(result.tail)
    return int(found[-1]) if found else None


@dataclass
class BlkRun:
    """One measured run: the process, dd's figures, and the host cache before it started."""

    result: RunResult
    dd: DdSummary | None
    status: int | None
    data_cached: float | None
    ok: bool
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result.as_dict(),
            "ok": self.ok,
            "error": self.error,
            "workload_status": self.status,
            "dd_bytes": None if self.dd is None else self.dd.bytes,
            "dd_s": None if self.dd is None else self.dd.seconds,
            "dd_rate": None if self.dd is None else self.dd.rate,
            "mb_s": None if self.dd is None else self.dd.mb_s,
            "wall_s": self.result.exit_s,
            "data_page_cache_fraction": self.data_cached,
        }


def judge(vmm: str, inputs: BlkInputs, result: RunResult, data_cached: float | None) -> BlkRun:
    """A run is ok when the VMM ran clean, dd exited 0 and read exactly the data disk's size."""
    dd = parse_dd_summary(result.tail)
    status = workload_status(vmm, result)
    error = result.error
    if error is None:
        if dd is None:
            error = "cannot parse dd's summary line from the console"
        elif status is None:
            error = "no ember-exit=N restart line on the console: the workload's status is unknown"
        elif status != 0:
            error = f"dd exited with status {status}"
        elif dd.bytes != inputs.size_bytes:
            error = (
                f"dd read {dd.bytes} bytes, the data disk has {inputs.size_bytes}: "
                "is /dev/vdb the data disk?"
            )
        elif dd.mb_s is None:
            error = f"dd reported {dd.seconds} s: no rate"
    return BlkRun(result, dd, status, data_cached, error is None, error)


def build_report(
    inputs: BlkInputs,
    runs: int,
    timeout_s: float,
    argvs: Mapping[str, Sequence[str]],
    results: Mapping[str, Sequence[BlkRun]],
    first: tuple[str, float | None] | None,
) -> dict[str, Any]:
    """The bench's result as plain data: the JSON output, and what the table is drawn from."""
    vmms: dict[str, Any] = {}
    for vmm, rs in results.items():
        ok = [r for r in rs if r.ok]
        stats = {
            "mb_s": summarize([r.dd.mb_s for r in ok if r.dd is not None]),
            "dd_s": summarize([r.dd.seconds for r in ok if r.dd is not None]),
            "wall_s": summarize([r.result.exit_s for r in ok]),
            "peak_rss_mib": summarize([r.result.peak_rss_mib for r in ok]),
            "cpu_s": summarize([r.result.cpu_s for r in ok]),
        }
        vmms[vmm] = {
            "argv": list(argvs[vmm]),
            "runs": len(rs),
            "runs_ok": len(ok),
            **{k: None if s is None else s.as_dict() for k, s in stats.items()},
            "per_run": [r.as_dict() for r in rs],
        }
    first_run = None
    if first is not None:
        vmm, cached = first
        first_run = {
            "vmm": vmm,
            "data_page_cache_fraction": cached,
            "cold": None if cached is None else cached < WARM_FRACTION,
        }
    report: dict[str, Any] = {
        "bench": "blk",
        "kernel": str(inputs.kernel),
        "initrd": str(inputs.initrd),
        "rootfs": str(inputs.rootfs),
        "size_mib": inputs.size_mib,
        "bs": inputs.bs,
        "workload": inputs.workload,
        "mem_mib": inputs.mem_mib,
        "cmdline": inputs.cmdline,
        "runs": runs,
        "timeout_s": timeout_s,
        "first_run": first_run,
        "vmms": vmms,
        "ratio_ember_over_qemu": None,
    }
    report["ratio_ember_over_qemu"] = ember_over_qemu(
        vmms, ("mb_s", "dd_s", "wall_s", "peak_rss_mib", "cpu_s")
    )
    return report


TABLE_HEADERS = (
    "VMM",
    "MB/s p50",
    "MB/s min-max",
    "dd p50 (s)",
    "wall p50 (s)",
    "runs ok",
)


def render_table(report: Mapping[str, Any]) -> str:
    """The human form of ``build_report``'s output: inputs, one row per VMM, ratio, failures."""
    rows: list[list[str]] = []
    for vmm, r in report["vmms"].items():
        rate = r["mb_s"]
        rows.append(
            [
                vmm,
                fmt_num(p50(r, "mb_s"), 1),
                "-" if rate is None else fmt_range(rate["min"], rate["max"], 1),
                fmt_num(p50(r, "dd_s")),
                fmt_num(p50(r, "wall_s")),
                f"{r['runs_ok']}/{r['runs']}",
            ]
        )
    ratios = report["ratio_ember_over_qemu"]
    if ratios is not None:
        rows.append(
            [
                "ember/qemu",
                fmt_ratio(ratios["mb_s"]),
                "",
                fmt_ratio(ratios["dd_s"]),
                fmt_ratio(ratios["wall_s"]),
                "",
            ]
        )
    first = report["first_run"]
    if first is None:
        cache = "no run"
    elif first["data_page_cache_fraction"] is None:
        cache = f"first run ({first['vmm']}): page-cache residency unknown"
    else:
        state = "cold" if first["cold"] else "warm"
        cache = (
            f"first run ({first['vmm']}) {state}: "
            f"{100 * first['data_page_cache_fraction']:.1f}% of the data disk "
            "in the host page cache"
        )
    lines = [
        f"blk: {report['runs']} run(s) per VMM, {' '.join(report['workload'])} "
        f"({report['size_mib']} MiB of random data, read-only), {report['mem_mib']} MiB guest, "
        f"timeout {report['timeout_s']:g} s",
        f"kernel:  {report['kernel']}",
        f"initrd:  {report['initrd']}",
        f"rootfs:  {report['rootfs']}",
        f"cmdline: {report['cmdline']}",
        f"cache:   {cache}",
        "",
        format_table(TABLE_HEADERS, rows),
        "",
        "MB/s: dd's bytes / dd's seconds (higher is better); wall: VMM spawn to exit.",
    ]
    failures = [
        f"  {vmm} run {i + 1}: {run['error']}"
        for vmm, r in report["vmms"].items()
        for i, run in enumerate(r["per_run"])
        if not run["ok"]
    ]
    if failures:
        lines += ["", "failed runs:", *failures]
    return "\n".join(lines)


def progress_line(vmm: str, i: int, runs: int, run: BlkRun) -> str:
    status = "ok" if run.ok else f"FAILED: {run.error}"
    cached = "?" if run.data_cached is None else f"{100 * run.data_cached:.1f}%"
    dd = "no dd line" if run.dd is None else f"dd {run.dd.seconds:g} s, {run.dd.rate}"
    return (
        f"[blk] {vmm} run {i + 1}/{runs}: {dd}, wall {fmt_num(run.result.exit_s)} s, "
        f"data cached before {cached}, {status}"
    )


def console_excerpt(tail: bytes, lines: int = FAILURE_CONSOLE_LINES) -> str:
    text = tail.decode("utf-8", "replace").replace("\r", "").rstrip()
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


def write_data_disk(path: Path, size_mib: int) -> None:
    """``size_mib`` MiB of random bytes, fsynced: real blocks, clean in the host page cache."""
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(CHUNK))
        f.flush()
        os.fsync(f.fileno())


def warm(paths: Sequence[Path]) -> None:
    """Read each file once so that the first boot does not pay for a cold host page cache."""
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while f.read(4 * MIB):
                pass


def default_rootfs() -> Path:
    """The cached rootfs; its key follows the guest agent's sources, so it may be unbuilt."""
    try:
        return default_artifact("rootfs")
    except BenchError as exc:
        why = str(exc).split(" (or pass")[0]
        raise BenchError(
            f"{why} (or pass --rootfs, e.g. the newest ~/.cache/ember/rootfs/*/rootfs.ext4)"
        ) from exc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/blk.py",
        description="Sequential O_DIRECT read of a data disk in the guest, Ember vs QEMU microvm.",
    )
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the cached ELF image)")
    p.add_argument("--initrd", type=Path, help="initramfs (default: the cached ember image)")
    p.add_argument("--rootfs", type=Path, help="root file system (default: the cached image)")
    p.add_argument("--runs", type=int, default=3, help="runs per VMM (default: 3)")
    p.add_argument(
        "--size-mib", type=int, default=256, metavar="MiB", help="data disk size (default: 256)"
    )
    p.add_argument("--bs", default="1M", help="dd block size (default: 1M)")
    p.add_argument("--mem", type=int, default=256, metavar="MiB", help="guest RAM (default: 256)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="per run; the VMM is killed and the run recorded as failed (default: 300)",
    )
    p.add_argument("--only", choices=VMMS, help="measure one VMM only")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.size_mib < 1:
        p.error("--size-mib must be at least 1")
    if args.mem < 1:
        p.error("--mem must be at least 1")
    if not BS_PATTERN.fullmatch(args.bs):
        p.error(f"--bs {args.bs!r} is not a dd block size (e.g. 4096, 64K, 1M)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; exit status 0 if every run succeeded, 1 if some failed, 2 on set-up errors.

    A failed run never aborts the others: it is reported in the table and the JSON, and its
    console tail goes to stderr.
    """
    args = parse_args(argv)
    vmms = (args.only,) if args.only else VMMS
    try:
        kernel = args.kernel or default_artifact("kernel")
        initrd = args.initrd or default_artifact("initrd")
        rootfs = args.rootfs or default_rootfs()
        for what, path in (("kernel", kernel), ("initrd", initrd), ("rootfs", rootfs)):
            if not path.is_file():
                raise BenchError(f"{what} {path} is not a file")
        qemu = shutil.which("qemu-system-x86_64")
        if "qemu" in vmms and qemu is None:
            raise BenchError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    except BenchError as exc:
        print(f"bench/blk.py: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ember-bench-blk-") as tmp:
        data = Path(tmp) / "data.img"
        print(f"[blk] writing {args.size_mib} MiB of random data to {data} ...", file=sys.stderr)
        started = time.monotonic()
        write_data_disk(data, args.size_mib)
        warm([kernel, initrd, rootfs])
        print(
            f"[blk] data disk and guest images ready in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        inputs = BlkInputs(
            kernel.resolve(),
            initrd.resolve(),
            rootfs.resolve(),
            data,
            args.size_mib,
            args.bs,
            args.mem,
        )
        argvs = {
            "ember": ember_argv(inputs),
            "qemu": qemu_argv(inputs, qemu or "qemu-system-x86_64"),
        }
        envs = {"ember": ember_env(), "qemu": dict(os.environ)}
        results: dict[str, list[BlkRun]] = {vmm: [] for vmm in vmms}
        first: tuple[str, float | None] | None = None
        for i, vmm in schedule(args.runs, vmms):
            cached = page_cache_fraction(data)
            if first is None:
                first = (vmm, cached)
            print(f"[blk] {vmm} run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            result = run_measured(
                argvs[vmm], timeout_s=args.timeout, marker=DD_MARKER, env=envs[vmm]
            )
            run = judge(vmm, inputs, result, cached)
            results[vmm].append(run)
            print(progress_line(vmm, i, args.runs, run), file=sys.stderr, flush=True)
            if not run.ok:
                print(
                    f"[blk] {vmm} run {i + 1} console (last {FAILURE_CONSOLE_LINES} lines):\n"
                    + console_excerpt(result.tail),
                    file=sys.stderr,
                    flush=True,
                )
    report = build_report(
        inputs, args.runs, args.timeout, {v: argvs[v] for v in vmms}, results, first
    )
    print(to_json(report) if args.json else render_table(report))
    return 0 if all(r.ok for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
