"""The benches' pure parts: summaries, ratios, tables, JSON, marker scanning, command lines.

Benchmarks never assert times (DESIGN.md §6), but what turns raw runs into a table must be right,
or a comparison lies. No /dev/kvm needed: the process plumbing is exercised with tiny Python
children instead of VMMs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# bench/ is a folder of scripts, not a package: import its modules the way the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _common
import boot
from _common import (
    MARKER,
    MarkerScanner,
    RunResult,
    Summary,
    format_table,
    ratio,
    run_measured,
    summarize,
    to_json,
)


def test_summarize_odd_even_and_missing() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Summary(p50=2.0, min=1.0, max=3.0, n=3)
    assert summarize([4.0, 1.0, 2.0, 3.0]) == Summary(p50=2.5, min=1.0, max=4.0, n=4)
    assert summarize([None, 5.0, None]) == Summary(p50=5.0, min=5.0, max=5.0, n=1)
    assert summarize([]) is None
    assert summarize([None]) is None


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_marker_in_one_chunk() -> None:
    s = MarkerScanner()
    assert not s.feed(b"[    0.0] booting\n", 1.0)
    assert s.feed(b"EMBER-USERSPACE-OK 6.1.0-ember\nreboot: Restarting\n", 2.0)
    assert s.found_at == 2.0
    assert s.marker_line == "EMBER-USERSPACE-OK 6.1.0-ember"


@pytest.mark.parametrize("split", range(1, len(MARKER)))
def test_marker_straddling_two_reads(split: int) -> None:
    """Timestamped at the read that completed it, wherever the pipe cut it."""
    text = b"noise\n" + MARKER + b" 6.1\nmore\n"
    cut = len(b"noise\n") + split
    s = MarkerScanner()
    assert not s.feed(text[:cut], 1.0)
    assert s.found_at is None
    assert s.feed(text[cut:], 2.0)
    assert s.found_at == 2.0
    assert s.marker_line == "EMBER-USERSPACE-OK 6.1"


def test_marker_byte_by_byte_and_line_split_after_marker() -> None:
    s = MarkerScanner()
    data = b"x" * 100 + MARKER + b" tail-of-line\nnext\n"
    for i, byte in enumerate(data):
        s.feed(bytes([byte]), float(i))
    assert s.found_at == float(100 + len(MARKER) - 1)
    assert s.marker_line == "EMBER-USERSPACE-OK tail-of-line"


def test_only_first_marker_counts_and_partial_is_not_a_match() -> None:
    s = MarkerScanner()
    assert not s.feed(MARKER[:-1] + b"\n", 1.0)
    assert s.feed(MARKER + b" a\n", 2.0)
    assert not s.feed(MARKER + b" b\n", 3.0)
    assert s.found_at == 2.0
    assert s.marker_line == "EMBER-USERSPACE-OK a"


def test_tail_is_bounded() -> None:
    s = MarkerScanner(tail_bytes=8)
    s.feed(b"0123456789", 0.0)
    s.feed(b"abc", 0.0)
    assert s.tail == b"56789abc"
    assert s.marker_line is None


def test_format_table_aligns_columns() -> None:
    out = format_table(["VMM", "t (s)"], [["ember", "1.50"], ["qemu", "12.25"]])
    assert out.splitlines() == [
        "VMM    t (s)",
        "-----  -----",
        "ember   1.50",
        "qemu   12.25",
    ]
    with pytest.raises(ValueError):
        format_table(["a", "b"], [["only one"]])


def test_to_json_rounds_and_is_stable() -> None:
    text = to_json({"b": 1 / 3, "a": [2 / 3, None, "x"]})
    assert json.loads(text) == {"a": [0.666667, None, "x"], "b": 0.333333}
    assert text.index('"a"') < text.index('"b"')


def _run(ok: bool, marker: float | None, exit_s: float | None, rss_kib: int | None) -> RunResult:
    return RunResult(
        ok,
        marker,
        exit_s,
        rss_kib,
        1.0,
        0 if ok else None,
        error=None if ok else "timed out after 300 s",
    )


def _report() -> dict[str, Any]:
    inputs = boot.BootInputs(Path("/k/vmlinux"), Path("/k/initrd"), 128)
    results = {
        "ember": [
            _run(True, 30.0, 32.0, 100 * 1024),
            _run(False, None, None, 90 * 1024),
            _run(True, 34.0, 36.0, 120 * 1024),
        ],
        "qemu": [
            _run(True, 20.0, 21.0, 70 * 1024),
            _run(True, 30.0, 31.0, 80 * 1024),
            _run(True, 10.0, 11.0, 60 * 1024),
        ],
    }
    argvs = {"ember": boot.ember_argv(inputs), "qemu": boot.qemu_argv(inputs)}
    return boot.build_report(inputs, "elf", 3, 300.0, argvs, results)


def test_report_medians_ignore_failed_runs_and_ratios_use_p50() -> None:
    report = _report()
    vmms = report["vmms"]
    assert isinstance(vmms, dict)
    ember, qemu = vmms["ember"], vmms["qemu"]
    assert (ember["runs"], ember["runs_ok"]) == (3, 2)
    assert ember["marker_s"] == {"p50": 32.0, "min": 30.0, "max": 34.0, "n": 2}
    assert ember["peak_rss_mib"]["p50"] == pytest.approx(110.0)
    assert qemu["exit_s"]["p50"] == 21.0
    assert ember["per_run"][1]["error"].startswith("timed out")
    ratios = report["ratio_ember_over_qemu"]
    assert isinstance(ratios, dict)
    assert ratios["marker_s"] == pytest.approx(32.0 / 20.0)
    assert ratios["exit_s"] == pytest.approx(34.0 / 21.0)
    assert ratios["peak_rss_mib"] == pytest.approx(110.0 / 70.0)
    json.loads(to_json(report))


def test_render_table_has_ratio_row_and_failures() -> None:
    text = boot.render_table(_report())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("VMM"))
    for col in ("marker p50 (s)", "exit p50 (s)", "peak RSS p50 (MiB)", "runs ok"):
        assert col in header
    ember = next(line for line in lines if line.startswith("ember "))
    assert ember.split()[1:] == ["32.00", "30.00-34.00", "34.00", "110.0", "2/3"]
    ratio_row = next(line for line in lines if line.startswith("ember/qemu"))
    assert ratio_row.split()[1:] == ["1.60x", "1.62x", "1.57x"]
    assert "ember run 2: timed out after 300 s" in text


def test_report_with_one_vmm_or_all_failed() -> None:
    inputs = boot.BootInputs(Path("/k"), Path("/i"), 64)
    results = {"qemu": [_run(False, None, None, None)]}
    report = boot.build_report(inputs, "elf", 1, 5.0, {"qemu": ["q"]}, results)
    assert report["ratio_ember_over_qemu"] is None
    text = boot.render_table(report)
    qemu = next(line for line in text.splitlines() if line.startswith("qemu "))
    assert qemu.split()[1:] == ["-", "-", "-", "-", "0/1"]


def test_schedule_alternates_and_swaps_order() -> None:
    assert boot.schedule(3, ("ember", "qemu")) == [
        (0, "ember"),
        (0, "qemu"),
        (1, "qemu"),
        (1, "ember"),
        (2, "ember"),
        (2, "qemu"),
    ]
    assert boot.schedule(2, ("qemu",)) == [(0, "qemu"), (1, "qemu")]


def test_both_vmms_get_the_same_inputs() -> None:
    inputs = boot.BootInputs(Path("/k/vmlinux"), Path("/k/initrd"), 96)
    ember, qemu = boot.ember_argv(inputs, python="py"), boot.qemu_argv(inputs, qemu="q")
    assert ember[:4] == ["py", "-m", "ember.cli.main", "boot"]
    assert ember[ember.index("--cmdline") + 1] == boot.CMDLINE
    # QEMU's guest the same but for Ember's page-clearing port, which QEMU does not have
    qemu_words = qemu[qemu.index("-append") + 1].split()
    assert qemu_words == [w for w in boot.CMDLINE.split() if not w.startswith("ember.host_clear=")]
    assert len(qemu_words) == len(boot.CMDLINE.split()) - 1
    assert ember[ember.index("--kernel") + 1] == qemu[qemu.index("-kernel") + 1] == "/k/vmlinux"
    assert ember[ember.index("--initrd") + 1] == qemu[qemu.index("-initrd") + 1] == "/k/initrd"
    assert ember[ember.index("--mem") + 1] == qemu[qemu.index("-m") + 1] == "96"
    assert "-no-reboot" in qemu
    assert qemu[qemu.index("-device") + 1] == "i8042"  # reboot=k must reach a reset line
    cpu = qemu[qemu.index("-cpu") + 1].split(",")
    assert cpu[0] == "host" and {"-cx16", "-xsave", "-arch-capabilities"} <= set(cpu)
    for feature in boot.CLEARCPUID:
        assert f"-{feature}" in cpu
    assert len(cpu) == len(set(cpu))
    assert "noxsave" in boot.CMDLINE.split()
    assert boot.CMDLINE.startswith("console=ttyS0 reboot=k panic=-1 quiet ")


# The process plumbing, with a Python child standing in for a VMM (fast, no KVM).

_CHILD = (
    "import os, sys, time\n"
    "os.write(1, b'booting\\nEMBER-USER')\n"
    "time.sleep(0.3)\n"
    "os.write(1, b'SPACE-OK 6.1\\n')\n"
    "time.sleep(0.2)\n"
    "sys.exit(int(sys.argv[1]))\n"
)


def test_run_measured_times_marker_before_exit() -> None:
    r = run_measured([sys.executable, "-c", _CHILD, "0"], timeout_s=30)
    assert r.ok, r.error
    assert r.marker_s is not None and r.exit_s is not None
    assert 0.3 <= r.marker_s < r.exit_s
    assert r.marker_line == "EMBER-USERSPACE-OK 6.1"
    assert r.peak_rss_kib is not None and r.peak_rss_kib > 1024
    assert r.returncode == 0


def test_run_measured_reports_bad_exit_status() -> None:
    r = run_measured([sys.executable, "-c", _CHILD, "3"], timeout_s=30)
    assert not r.ok and r.returncode == 3 and r.marker_s is not None
    assert r.error is not None and "status 3" in r.error


def test_run_measured_kills_on_timeout_and_reports_output() -> None:
    code = "import os, time; os.write(2, b'stuck here\\n'); time.sleep(60)"
    r = run_measured([sys.executable, "-c", code], timeout_s=0.5)
    assert not r.ok and r.marker_s is None and r.exit_s is None
    assert r.error is not None and r.error.startswith("timed out after 0.5 s")
    assert "stuck here" in r.error


def test_run_measured_missing_program() -> None:
    r = run_measured(["/nonexistent/vmm"], timeout_s=1)
    assert not r.ok and r.error is not None and r.error.startswith("cannot start")


def test_module_constant_is_the_marker_the_initramfs_prints() -> None:
    assert _common.MARKER == b"EMBER-USERSPACE-OK"


def test_side_by_side_rows_show_both_medians_and_their_ratio() -> None:
    ours = {"ms": {"p50": 2.0}, "cpu": None}
    peer = {"ms": {"p50": 8.0}, "cpu": {"p50": 3.0}}
    rows = _common.side_by_side(ours, peer, [("time", "ms", 1), ("cpu", "cpu", 0)])
    assert rows == [["time", "2.0", "8.0", "0.25x"], ["cpu", "-", "3", "-"]]


def test_process_cpu_seconds_is_what_the_process_itself_counts() -> None:
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # some CPU of our own to count
        pass
    own = os.times()
    counted = _common.process_cpu_seconds(os.getpid())
    assert counted >= 0.04
    assert abs(counted - (own.user + own.system)) < 0.05
