"""Every emulated guest-kernel instruction of a workload, by function: exact, not sampled.

Usage::

    .venv/bin/python bench/insns.py [--runs 3] [--settle 0.5] [--gap S] [--top 40]
        [--sequence FILE] [--buffer-mib 64] WORKLOAD

Under kvm_pvm each guest-kernel instruction is emulated (~1 us each here) and KVM's
``kvm:kvm_emulate_insn`` tracepoint records its address. With tracefs (root) this counts them
all during one workload and names them from the guest kernel's ``vmlinux``: where
``bench/profile.py`` samples a few hundred RIPs (and charges shadow-fault time to user mode),
this is the guest kernel's work itself, instruction by instruction, and a change can be judged
by which function lost how many. ``--sequence FILE`` writes the path in order (one line per
run of instructions in one function), which reads like a call trace. The trace buffer holds
~16 instructions a KiB per CPU: a longer workload (``refill``: ~6 M) needs ``--buffer-mib``
(768 for a refill), or its start is overwritten and the counts are its end's.

WORKLOAD is one of :func:`profile.workload`'s (``ping``, ``exec-python``, ``exec-true``,
``run-code``, ``write-10mib``, ``code:SOURCE``, ``exec:COMMAND LINE``), traced in a sandbox
restored ``--settle`` seconds earlier (``--gap S``: its second run, S idle seconds after the
first), or ``first-run-code``: ``Sandbox()`` and its first ``run_code('6*7')``, traced from
before the restore (every VM on the host is traced then: run nothing else) and split at the
moments the sandbox was ready and the worker announced its rings. KVM's own ``insn_emulation``
count for the same window is printed beside the traced count. Tracing costs each emulated
instruction ~0.3 us more, so wall times here are not the untraced ones. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from profile import family, kernel_symbols, workload

from first_call import emulated

import ember.client.code_ring as code_ring
from ember import Sandbox

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "events/kvm/kvm_emulate_insn"
MARK = "ember-insns:"
LINE = re.compile(
    r"kvm_emulate_insn: [0-9a-f]+:([0-9a-f]+):|tracing_mark_write: " + MARK + r"(\S+)"
)


def _write(path: str, value: str) -> None:
    (TRACEFS / path).write_text(value)


def mount_tracefs(buffer_mib: int) -> None:
    if not (TRACEFS / EVENT).is_dir():
        os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null")
    if not (TRACEFS / EVENT).is_dir():
        raise SystemExit(f"needs root and {TRACEFS}/{EVENT} (a KVM with its tracepoints)")
    _write("buffer_size_kb", str(buffer_mib << 10))  # per CPU: see the module's docstring


def mark(phase: str) -> None:
    _write("trace_marker", MARK + phase)


class Trace:
    """kvm_emulate_insn on for the threads of ``pids`` (None: every VM), then read back."""

    def __init__(self, pids: list[int] | None) -> None:
        threads = [int(t) for p in pids or () for t in os.listdir(f"/proc/{p}/task")]
        self.filter = " || ".join(f"common_pid == {t}" for t in threads) or "0"

    def __enter__(self) -> Trace:
        _write("trace", "")
        _write(f"{EVENT}/filter", self.filter)
        _write(f"{EVENT}/enable", "1")
        _write("tracing_on", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        _write("tracing_on", "0")
        _write(f"{EVENT}/enable", "0")
        _write(f"{EVENT}/filter", "0")

    @staticmethod
    def records() -> Iterator[tuple[str, int]]:
        """(phase, rip) per emulated instruction, the phase named by the last mark."""
        phase = "all"
        with open(TRACEFS / "trace") as trace:
            for line in trace:
                m = LINE.search(line)
                if m is None:
                    continue
                if m.group(2):
                    phase = m.group(2)
                else:
                    yield phase, int(m.group(1), 16)
        _write("trace", "")


def workload_parser(doc: str | None, *, runs: int, top: int) -> argparse.ArgumentParser:
    """The arguments of a traced workload (this script's and ``shadow.py``'s): which, how many
    runs, when after the restore (``--settle``, or a second run ``--gap`` S after the first),
    and how many lines of each ranking to print."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after the restore")
    parser.add_argument("--gap", type=float, default=None, help="trace a second run after S s")
    parser.add_argument("--top", type=int, default=top)
    return parser


def settled_job(sb: Sandbox, name: str, settle: float, gap: float | None) -> Callable[[], object]:
    """Workload ``name`` in ``sb``, ready to trace: ``settle`` seconds after the restore, or
    its second run, ``gap`` seconds after a first one."""
    job = workload(name, sb)
    time.sleep(settle)
    if gap is not None:
        job()
        time.sleep(gap)
    return job


def traced_workload(name: str, settle: float, gap: float | None) -> Callable[[], int]:
    """A run: trace ``name`` in a new sandbox; KVM's insn_emulation count for it."""

    def run() -> int:
        with Sandbox() as sb:
            job = settled_job(sb, name, settle, gap)
            assert sb._vmm.vmm_pid is not None
            with Trace([sb._vmm.vmm_pid]):
                before = emulated(sb)
                job()
                return emulated(sb) - before

    return run


def first_run_code() -> int | None:
    """``Sandbox()`` → first ``run_code``, marked: ready, announced (the worker's rings seen)."""
    original = code_ring._await_announcement

    def announced(req_ctl: memoryview, generation: int) -> None:
        original(req_ctl, generation)
        mark("announced->reply")

    code_ring._await_announcement = announced
    try:
        with Trace(None):
            mark("restore->ready")
            sb = Sandbox()
            mark("ready->announced")
            sb.run_code("6*7")
            mark("after")
        sb.close()
    finally:
        code_ring._await_announcement = original
    return None  # KVM's count would start with the VM, the trace before it


def main() -> None:
    parser = workload_parser(__doc__, runs=3, top=40)
    parser.add_argument("--buffer-mib", type=int, default=64, help="trace buffer per CPU")
    parser.add_argument("--sequence", type=Path, default=None, help="the last run's path")
    args = parser.parse_args()
    mount_tracefs(args.buffer_mib)
    addrs, names = kernel_symbols()

    def name_of(rip: int) -> str:
        i = bisect.bisect_right(addrs, rip) - 1
        return names[i] if i >= 0 else "[unknown]"

    first = args.workload == "first-run-code"
    run = first_run_code if first else traced_workload(args.workload, args.settle, args.gap)
    Sandbox().close()  # the zygote warm, the template built: not traced
    by_phase: dict[str, Counter[str]] = {}
    kvm_counts: list[int | None] = []
    sequence: list[list[object]] = []
    for _ in range(args.runs):
        kvm_counts.append(run())
        sequence.clear()
        for phase, rip in Trace.records():
            if phase == "after":
                continue
            name = name_of(rip)
            by_phase.setdefault(phase, Counter())[name] += 1
            if sequence and sequence[-1][0] == name:
                sequence[-1][1] += 1  # type: ignore[operator]
            else:
                sequence.append([name, 1])
    runs = args.runs
    total = sum(sum(c.values()) for c in by_phase.values())
    print(f"{args.workload}: {runs} runs, {total / runs:.0f} emulated instructions traced per run")
    counted = [n for n in kvm_counts if n is not None]
    if counted:
        print(f"  KVM's own insn_emulation count per run: {sum(counted) / len(counted):.0f}")
    for phase, counts in by_phase.items():
        n = sum(counts.values())
        print(f"\n{phase}: {n / runs:.0f} per run")
        families: Counter[str] = Counter()
        for function, count in counts.items():
            families[family(function)] += count
        for label, count in families.most_common():
            print(f"  {count / runs:9.0f}  {label}")
        print(f"  top {args.top} functions")
        for function, count in counts.most_common(args.top):
            print(f"  {count / runs:9.0f}  {function}")
    if args.sequence is not None:
        args.sequence.write_text("".join(f"{n:7d} {f}\n" for f, n in sequence))
        print(f"\nthe last run's path: {args.sequence} ({len(sequence)} lines)")


if __name__ == "__main__":
    main()
