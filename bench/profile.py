"""Where a sandbox's guest time goes: RIP samples from the VMM, named by the guest kernel.

Usage::

    .venv/bin/python bench/profile.py [--runs 3] [--hz 1000] [--top 30] WORKLOAD

WORKLOAD is ``ping`` (the first request after the restore), ``exec-python`` (``python3 -c
'print(1)'``, the first exec in a fresh sandbox),
``exec-true``, ``run-code`` (ten ``run_code('6*7')``), ``write-10mib`` (``files.write``),
``refill`` (two Python execs, then until the mother's forks have filled the pool again),
``code:SOURCE`` (one ``run_code(SOURCE)``) or ``exec:COMMAND LINE`` (one ``exec``, the line
split as a shell would: ``"exec:ls -la /"``). Each run restores a sandbox, lets it settle,
samples its vCPUs while the workload runs (``ember.vmm.profiler``), and the counts of all runs
are summed. User-mode samples are one line (``[user]``); kernel samples are named from the
kernel's ``vmlinux`` (``nm``) and grouped into a few families, so that a change can be judged
by which family shrank. KVM's own counters for the same window (``ember.kvm.stats``) are
printed per run: ``insn_emulation`` is the guest kernel's emulated work. ``--gap S`` profiles
the workload's second run, after S idle seconds (a kept connection expiring, a worker that
stopped polling, a parked VM). Sampling costs the guest a few percent at 1 kHz.
"""

from __future__ import annotations

import argparse
import bisect
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

from ember import Sandbox

USER_TOP = 0x8000_0000_0000  # canonical lower half: a user-mode RIP
FAMILIES = [
    ("user mode", r"^\[user\]$"),
    ("random (chacha/blake2)", r"chacha|crng|random|blake2"),
    (
        "timer tick and scheduler",
        r"load_avg|sched|switch_to|hrtimer|timekeeping|tick|clock|timer|rq_|task_|calc_global"
        r"|rcu|update_curr|pick_next|enqueue|dequeue|idle|calc_delta|jiffies|ktime|pvclock"
        r"|clear_buddies|finish_task|irq|vsyscall",
    ),
    (
        "freeing pages, unmapping",
        r"unmap|free|release_pages|rmap|tlb|zap|vm_normal_page|mod_node|lru|drain|mmput"
        r"|exit_mmap",
    ),
    (
        "page faults, allocation",
        r"fault|set_pte|filemap_map|alloc|clear_page|handle_mm|uptodate|pte|pmd|copy_page"
        r"|wp_page|anon|get_page_from|rmqueue|xa_|xas_|charge|lock_page|folio|page_add"
        r"|mod_zone",
    ),
    ("block and ext4", r"ext4|mpage|bio|blk|bdev|block|submit|jbd2"),
    ("virtio and vsock", r"vsock|virtio|vring|virtqueue"),
    ("sockets, pipes, files", r"sock|skb|unix|pipe|vfs|fd|file|copy_|iov|poll|select"),
    ("syscall entry", r"syscall|entry|^__x64|^do_"),
]


# What the hypervisor did (ember.kvm.stats): under kvm_pvm every guest-kernel instruction is
# emulated (~1 us each here), so insn_emulation is the guest kernel's work.
KVM_COUNTERS = ("insn_emulation", "exits", "pf_taken", "mmu_pte_write", "halt_exits")


def kernel_symbols() -> tuple[list[int], list[str]]:
    """The guest kernel's text symbols, by address (from its vmlinux in the image cache)."""
    vmlinux = subprocess.check_output(
        [sys.executable, "-m", "ember.cli.main", "image", "path", "kernel"], text=True
    ).strip()
    pairs: list[tuple[int, str]] = []
    for line in subprocess.check_output(["nm", "-n", vmlinux], text=True).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            pairs.append((int(parts[0], 16), parts[2]))
    return [a for a, _ in pairs], [n for _, n in pairs]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name):
            return label
    return "other kernel"


def workload(name: str, sb: Sandbox) -> Callable[[], object]:
    if name == "exec-python":
        return lambda: sb.exec(["python3", "-c", "print(1)"])
    if name == "run-file":  # what `ember run hello.py` asks: the script sent with the exec
        script = {"/tmp/ember-run/hello.py": b'print("hello")\n'}
        return lambda: sb.exec(["python3", "/tmp/ember-run/hello.py"], files=script)
    if name == "ping":
        return sb.ping
    if name == "exec-true":
        return lambda: sb.exec(["true"])
    if name == "run-code":
        return lambda: [sb.run_code("6*7") for _ in range(10)]
    if name == "write-10mib":
        return lambda: sb.files.write("/tmp/profile.bin", bytes(10 << 20))
    if name == "refill":
        return lambda: refill(sb)
    if name.startswith("code:"):
        return lambda: sb.run_code(name[5:])
    if name.startswith("exec:"):  # exec:ARGV, split as a shell would: "exec:ls -la /"
        argv = shlex.split(name[5:])
        return lambda: sb.exec(argv)
    raise SystemExit(f"unknown workload {name!r}")


def refill(sb: Sandbox) -> None:
    """Two Python execs take two of the pool's members; then wait (pinging every 0.25 s)
    until the mother has forked both back and the pool is full again. (With the template's
    four, waiting for one member ready, as this did for a pool of two, waited for nothing.)"""
    forked = sb.ping()["pool"]["forked"]
    for _ in range(2):
        sb.exec(["python3", "-c", "pass"])
    while (pool := sb.ping()["pool"])["forked"] < forked + 2 or pool["ready"] < pool["size"]:
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hz", type=float, default=1000.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after the restore")
    parser.add_argument(
        "--gap",
        type=float,
        default=None,
        help="run the workload once first, then profile it again after this many idle seconds",
    )
    args = parser.parse_args()
    addrs, names = kernel_symbols()

    def name_of(rip: int) -> str:
        if rip < USER_TOP:
            return "[user]"
        i = bisect.bisect_right(addrs, rip) - 1
        return names[i] if i >= 0 else "[unknown kernel]"

    by_function: Counter[str] = Counter()
    kvm: Counter[str] = Counter()
    walls: list[float] = []
    for _ in range(args.runs):
        with Sandbox() as sb:
            run = workload(args.workload, sb)
            time.sleep(args.settle)
            if args.gap is not None:
                run()
                time.sleep(args.gap)
            stats_before = sb._vmm.control("kvm-stats")
            sb._vmm.control("profile-start", hz=args.hz)
            t0 = time.monotonic()
            run()
            walls.append(time.monotonic() - t0)
            report = sb._vmm.control("profile-stop")
            stats_after = sb._vmm.control("kvm-stats")
        for section in ("vcpus", "vm"):
            for name in KVM_COUNTERS:
                if name in stats_after[section]:
                    kvm[name] += stats_after[section][name] - stats_before[section][name]
        for rip, count in report["samples"].items():
            by_function[name_of(int(rip, 16))] += count
        by_function["[not reported]"] += report["other"]
    total = sum(by_function.values()) or 1
    by_family: Counter[str] = Counter()
    for function, count in by_function.items():
        by_family[family(function)] += count
    walls.sort()
    print(
        f"{args.workload}: {args.runs} runs, wall p50 {walls[len(walls) // 2]:.3f} s, "
        f"{total} samples at {args.hz:g} Hz"
    )
    print("\nKVM, per run: " + ", ".join(f"{n} {kvm[n] / args.runs:.0f}" for n in KVM_COUNTERS))
    print("\nby family")
    for label, count in by_family.most_common():
        print(f"  {100 * count / total:5.1f}%  {label}")
    print(f"\ntop {args.top} functions")
    for function, count in by_function.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {function}  ({family(function)})")


if __name__ == "__main__":
    main()
