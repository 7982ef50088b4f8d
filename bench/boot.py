"""Boot time and memory: Ember against QEMU's microvm, same kernel, initrd and command line.

Usage: ``.venv/bin/python bench/boot.py [--runs 3] [--only ember|qemu] [--json]``

Each run starts a VMM process, and measures from just before the spawn to (a) the first console
line holding ``EMBER-USERSPACE-OK`` (printed by the initramfs' /init: the guest reached
userspace) and (b) the process' exit (the init reboots; both VMMs exit on a guest reboot), plus
the VMM process' peak RSS. It prints medians (min-max) per VMM and the Ember/QEMU ratio of each.

Why these choices (DESIGN.md §6): a figure only means something beside a peer measured in the
same run on the same inputs, so both VMMs get byte-identical kernel, initrd and command line,
and their runs alternate (the starting VMM swaps every round) so drift on a shared host hits
both alike. On this host the guest kernel is emulated (HOST.md), so a boot takes ~30-60 s: the
defaults keep the whole bench under ~10 minutes. Times are never asserted; tests assert
behaviour.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    MARKER,
    RunResult,
    ember_over_qemu,
    fmt_num,
    fmt_range,
    fmt_ratio,
    format_table,
    p50,
    run_measured,
    summarize,
    to_json,
)

from ember.arch.x86_64.cpuid import TEMPLATES
from ember.vmm.config import DEFAULT_CMDLINE

REPO = Path(__file__).resolve().parents[1]

#: CPU features this host's CPL0 emulator cannot run or that are risky (HOST.md). Ember hides
#: them in CPUID; QEMU needs them off with ``-cpu host,-...``; both guests are also told on the
#: command line so the two kernels see exactly the same thing.
CLEARCPUID = next(
    tuple(word.split("=", 1)[1].split(","))
    for word in TEMPLATES["pvm"].cmdline
    if word.startswith("clearcpuid=")
)

#: The one kernel command line both VMMs get: Ember's default plus the pvm template's words,
#: taken from Ember itself so the two can never drift apart.
CMDLINE = " ".join([DEFAULT_CMDLINE, *TEMPLATES["pvm"].cmdline])

#: Words that name a device only Ember's VMM has: its page-clearing port (kernel patch 0017).
#: QEMU has nothing behind it, so a guest handing it pages found them not cleared and crashed
#: (the workload exited 139); QEMU's guest clears its own pages, as on any other VMM.
EMBER_VMM_ONLY = ("ember.host_clear=",)


def qemu_cmdline(cmdline: str) -> str:
    """``cmdline`` without the words only Ember's VMM can honour (:data:`EMBER_VMM_ONLY`)."""
    return " ".join(w for w in cmdline.split() if not w.startswith(EMBER_VMM_ONLY))


#: ``-cpu host`` minus what the emulator lacks. ``arch-capabilities`` is not about the guest:
#: with it QEMU aborts on MSR 0x10a under kvm_pvm (HOST.md). All accepted by QEMU 7.2.
QEMU_CPU = "host," + ",".join(f"-{f}" for f in (*CLEARCPUID, "xsave", "arch-capabilities"))

#: microvm without ACPI (else no ``virtio_mmio.device=`` for an ACPI-less kernel), no option
#: ROMs and no RTC: the closest QEMU gets to Ember's device model.
QEMU_MACHINE = "microvm,acpi=off,x-option-roms=off,rtc=off"

VMMS = ("ember", "qemu")


@dataclass(frozen=True)
class BootInputs:
    """What both VMMs boot: the same files and command line for each."""

    kernel: Path
    initrd: Path
    mem_mib: int
    cmdline: str = CMDLINE


def ember_argv(inputs: BootInputs, python: str = sys.executable) -> list[str]:
    """``python -m ember.cli.main boot``: the measured process is the VMM itself, no wrapper."""
    return [
        python,
        "-m",
        "ember.cli.main",
        "boot",
        "--kernel",
        str(inputs.kernel),
        "--initrd",
        str(inputs.initrd),
        "--mem",
        str(inputs.mem_mib),
        "--cmdline",
        inputs.cmdline,
    ]


def ember_cmd_words(workload: Sequence[str]) -> str:
    """The words ember-init reads to mount the root disk and run ``workload``, as
    ``VmConfig.full_cmdline`` writes them for Ember: what a QEMU peer appends."""
    encoded = base64.urlsafe_b64encode("\0".join(workload).encode()).decode()
    return f"ember.root=/dev/vda ember.cmd={encoded}"


def qemu_base_argv(mem_mib: int, kernel: Path, initrd: Path, qemu: str) -> list[str]:
    """QEMU microvm on KVM, serial on stdio, exiting (``-no-reboot``) when the guest reboots.

    microvm has no keyboard controller, so the guest's ``reboot=k`` write of 0xFE to port 0x64
    would go nowhere and the kernel would fall back to a triple fault through ``int3``, which
    hangs under kvm_pvm (HOST.md): ``-device i8042`` gives it the reset line Ember's i8042
    model provides, and QEMU then exits on the guest's reboot.
    """
    return [
        qemu,
        "-M", QEMU_MACHINE, "-enable-kvm", "-cpu", QEMU_CPU,
        "-m", str(mem_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-no-reboot", "-device", "i8042",
        "-kernel", str(kernel), "-initrd", str(initrd),
    ]  # fmt: skip


def qemu_argv(inputs: BootInputs, qemu: str = "qemu-system-x86_64") -> list[str]:
    base = qemu_base_argv(inputs.mem_mib, inputs.kernel, inputs.initrd, qemu)
    return [*base, "-append", qemu_cmdline(inputs.cmdline)]


def ember_env() -> dict[str, str]:
    """The environment for the Ember VMM: ours, with this checkout's ``src`` importable.

    So the bench measures the code next to it even when run with a Python where ember is not
    installed (it is harmless for an editable install of the same tree).
    """
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


class BenchError(Exception):
    """A set-up problem the user must fix before anything can be measured."""


def default_artifact(name: str) -> Path:
    """The cached guest image ``name`` ("kernel", "bzimage", "initrd") built by ``ember image``.

    Asks ``ember.images.artifact_path`` first, and falls back to ``ember image path NAME`` in a
    subprocess, so the bench works whichever of the two exists in this checkout.
    """
    try:
        images = importlib.import_module("ember.images")
        artifact_path: Callable[[str], object] = images.artifact_path
    except (ImportError, AttributeError):
        pass
    else:
        try:
            return Path(str(artifact_path(name)))
        except Exception as exc:
            raise BenchError(f"{exc} (or pass --{_option(name)})") from exc
    cmd = [sys.executable, "-m", "ember.cli.main", "image", "path", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ember_env(), check=False)
    path = proc.stdout.strip()
    if proc.returncode != 0 or not path:
        why = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise BenchError(
            f"cannot find the {name} image ({why[0]}): run `ember image build`, "
            f"or pass --{_option(name)}"
        )
    return Path(path)


def _option(artifact: str) -> str:
    return "initrd" if artifact == "initrd" else "kernel"


def schedule(runs: int, vmms: Sequence[str]) -> list[tuple[int, str]]:
    """Interleave the VMMs, swapping which goes first each round, so slow drift hits both."""
    order: list[tuple[int, str]] = []
    for i in range(runs):
        round_vmms = list(vmms) if i % 2 == 0 else list(reversed(vmms))
        order += [(i, vmm) for vmm in round_vmms]
    return order


def build_report(
    inputs: BootInputs,
    fmt: str,
    runs: int,
    timeout_s: float,
    argvs: Mapping[str, Sequence[str]],
    results: Mapping[str, Sequence[RunResult]],
) -> dict[str, Any]:
    """The bench's result as plain data: the JSON output, and what the table is drawn from."""
    vmms: dict[str, Any] = {}
    for vmm, rs in results.items():
        ok = [r for r in rs if r.ok]
        stats = {
            "marker_s": summarize([r.marker_s for r in ok]),
            "exit_s": summarize([r.exit_s for r in ok]),
            "peak_rss_mib": summarize([r.peak_rss_mib for r in ok]),
            "cpu_s": summarize([r.cpu_s for r in ok]),
        }
        vmms[vmm] = {
            "argv": list(argvs[vmm]),
            "runs": len(rs),
            "runs_ok": len(ok),
            **{k: None if s is None else s.as_dict() for k, s in stats.items()},
            "per_run": [r.as_dict() for r in rs],
        }
    report: dict[str, Any] = {
        "bench": "boot",
        "marker": MARKER.decode(),
        "kernel": str(inputs.kernel),
        "initrd": str(inputs.initrd),
        "format": fmt,
        "mem_mib": inputs.mem_mib,
        "cmdline": inputs.cmdline,
        "runs": runs,
        "timeout_s": timeout_s,
        "vmms": vmms,
        "ratio_ember_over_qemu": None,
    }
    report["ratio_ember_over_qemu"] = ember_over_qemu(
        vmms, ("marker_s", "exit_s", "peak_rss_mib", "cpu_s")
    )
    return report


TABLE_HEADERS = (
    "VMM",
    "marker p50 (s)",
    "marker min-max (s)",
    "exit p50 (s)",
    "peak RSS p50 (MiB)",
    "runs ok",
)


def render_table(report: Mapping[str, Any]) -> str:
    """The human form of ``build_report``'s output: inputs, one row per VMM, ratio, failures."""
    rows: list[list[str]] = []
    for vmm, r in report["vmms"].items():
        marker = r["marker_s"]
        rows.append(
            [
                vmm,
                fmt_num(None if marker is None else marker["p50"]),
                fmt_range(*((None, None) if marker is None else (marker["min"], marker["max"]))),
                fmt_num(p50(r, "exit_s")),
                fmt_num(p50(r, "peak_rss_mib"), 1),
                f"{r['runs_ok']}/{r['runs']}",
            ]
        )
    ratios = report["ratio_ember_over_qemu"]
    if ratios is not None:
        rows.append(
            [
                "ember/qemu",
                fmt_ratio(ratios["marker_s"]),
                "",
                fmt_ratio(ratios["exit_s"]),
                fmt_ratio(ratios["peak_rss_mib"]),
                "",
            ]
        )
    lines = [
        f"boot: {report['runs']} run(s) per VMM, {report['mem_mib']} MiB, "
        f"format {report['format']}, timeout {report['timeout_s']:g} s",
        f"kernel:  {report['kernel']}",
        f"initrd:  {report['initrd']}",
        f"cmdline: {report['cmdline']}",
        "",
        format_table(TABLE_HEADERS, rows),
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


def progress_line(vmm: str, i: int, runs: int, result: RunResult) -> str:
    status = "ok" if result.ok else f"FAILED: {result.error}"
    return (
        f"[boot] {vmm} run {i + 1}/{runs}: marker {fmt_num(result.marker_s)} s, "
        f"exit {fmt_num(result.exit_s)} s, peak RSS {fmt_num(result.peak_rss_mib, 1)} MiB, {status}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/boot.py",
        description="Boot the same kernel+initrd with Ember and QEMU microvm; compare times, RSS.",
    )
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the cached ember image)")
    p.add_argument("--initrd", type=Path, help="initramfs (default: the cached ember image)")
    p.add_argument(
        "--format",
        choices=("elf", "bzimage"),
        default="elf",
        help="which cached kernel to use when --kernel is not given (default: elf)",
    )
    p.add_argument("--runs", type=int, default=3, help="boots per VMM (default: 3)")
    p.add_argument("--mem", type=int, default=128, metavar="MiB", help="guest RAM (default: 128)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="per boot; the VMM is killed and the run recorded as failed (default: 300)",
    )
    p.add_argument("--only", choices=VMMS, help="measure one VMM only")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.mem < 1:
        p.error("--mem must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; exit status 0 if every run succeeded, 1 if some failed, 2 on set-up errors.

    A failed run never aborts the others: it is reported in the table and the JSON.
    """
    args = parse_args(argv)
    vmms = (args.only,) if args.only else VMMS
    try:
        kernel = args.kernel or default_artifact("kernel" if args.format == "elf" else "bzimage")
        initrd = args.initrd or default_artifact("initrd")
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if not path.is_file():
                raise BenchError(f"{what} {path} is not a file")
        qemu = shutil.which("qemu-system-x86_64")
        if "qemu" in vmms and qemu is None:
            raise BenchError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    except BenchError as exc:
        print(f"bench/boot.py: error: {exc}", file=sys.stderr)
        return 2
    inputs = BootInputs(kernel.resolve(), initrd.resolve(), args.mem)
    argvs = {"ember": ember_argv(inputs), "qemu": qemu_argv(inputs, qemu or "qemu-system-x86_64")}
    envs = {"ember": ember_env(), "qemu": dict(os.environ)}
    results: dict[str, list[RunResult]] = {vmm: [] for vmm in vmms}
    for i, vmm in schedule(args.runs, vmms):
        print(f"[boot] {vmm} run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
        result = run_measured(argvs[vmm], timeout_s=args.timeout, env=envs[vmm])
        results[vmm].append(result)
        print(progress_line(vmm, i, args.runs, result), file=sys.stderr, flush=True)
    report = build_report(
        inputs, args.format, args.runs, args.timeout, {v: argvs[v] for v in vmms}, results
    )
    print(to_json(report) if args.json else render_table(report))
    return 0 if all(r.ok for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
