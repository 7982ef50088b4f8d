"""Where a workload's shadow page faults land: which guest process, which of its mappings.

Usage::

    .venv/bin/python bench/shadow.py [--runs 2] [--settle 0.5] [--gap S] [--top 25] WORKLOAD

Under kvm_pvm the guest kernel is emulated, but guest user code runs natively on shadow page
tables that a restore starts empty: every guest page a process touches first after a restore
costs one exit, a walk of the guest's page tables and a host fault (~15-25 us here), whether
the guest kernel mapped it long ago or not. A Python exec's ~3,000-4,000 of them are about
half of its wall time. KVM's ``kvmmmu:kvm_mmu_set_spte`` tracepoint names the guest frame of
each entry it makes; after the workload, the sandbox's ``run_code`` worker reads every guest
process's ``/proc/PID/maps`` and ``pagemap`` and says who maps each of those frames. So the
faults are counted by process (the agent, the interpreter that ran the program...) and by
mapping (python3's text, its ``.data``, the heap...): what a change of layout (huge pages,
fewer objects touched) would save, before it is made.

WORKLOAD is one of :func:`profile.workload`'s (``ping``, ``exec-python``, ``run-code``,
``code:SOURCE``, ``exec:COMMAND LINE``...), in a sandbox restored ``--settle`` seconds
earlier (``--gap S``: its second run, S idle seconds after the first). Every VM on the host
is traced: run nothing else. Frames no process maps any more (freed, kernel memory, page
cache only) are counted apart. Needs root and tracefs; nothing is asserted.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from insns import mount_tracefs, settled_job, workload_parser

from ember import Sandbox

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "events/kvmmmu/kvm_mmu_set_spte"
SPTE = re.compile(r"kvm_mmu_set_spte: gfn ([0-9a-f]+) spte [0-9a-f]+ \((\S*)\) level (\d)")

# Run by the sandbox's run_code worker after the traced workload: for each frame in WANTED,
# how many processes map it, the first one's pid and its mapping (an index into the labels),
# and each process's command line. Compact: a result must fit in one frame.
OWNERS = """
def _ember_owners(wanted):
    import os
    found, roles, labels = {}, {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\\0")
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read().splitlines()
            pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        roles[int(pid)] = b" ".join(argv[:3])[:60].decode(errors="replace")
        try:
            for line in maps:
                fields = line.split()
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if high - low > 1 << 32:
                    continue
                name = fields[5].rsplit("/", 1)[-1] if len(fields) > 5 else "[anon]"
                label = labels.setdefault(f"{name} {fields[1]}", len(labels))
                data = os.pread(pagemap, (high - low) // 4096 * 8, low // 4096 * 8)
                for i in range(0, len(data), 8):
                    entry = int.from_bytes(data[i:i + 8], "little")
                    frame = entry & ((1 << 55) - 1)
                    if entry >> 63 and frame in wanted:
                        count, first, first_label = found.get(frame, (0, int(pid), label))
                        found[frame] = (count + 1, first, first_label)
        finally:
            os.close(pagemap)
    return found, roles, sorted(labels, key=labels.__getitem__)
_ember_owners(set(WANTED))
"""


def _set(path: str, value: str) -> None:
    (TRACEFS / path).write_text(value)


def traced_frames(job: Callable[[], object]) -> list[tuple[int, str]]:
    """(guest frame, permissions) of each shadow entry KVM made while ``job()`` ran."""
    _set("trace", "")
    _set(f"{EVENT}/enable", "1")
    _set("tracing_on", "1")
    try:
        job()
    finally:
        _set("tracing_on", "0")
        _set(f"{EVENT}/enable", "0")
    text = (TRACEFS / "trace").read_text()
    _set("trace", "")
    return [(int(gfn, 16), perms) for gfn, perms, _level in SPTE.findall(text)]


def role(cmdline: str) -> str:
    if "ember.agent.worker" in cmdline:
        return "run_code worker"
    if "ember.agent" in cmdline:
        return "agent"
    if cmdline.startswith("/usr/bin/python3 -c"):
        return "pool interpreter"
    return cmdline or "?"


def one_run(name: str, settle: float, gap: float | None) -> tuple[Counter[str], Counter[str]]:
    """Shadow entries of one traced run, counted by owner and by mapping."""
    with Sandbox() as sb:
        frames = traced_frames(settled_job(sb, name, settle, gap))
        wanted = sorted({gfn for gfn, _ in frames})
        result = sb.run_code(OWNERS.replace("WANTED", repr(wanted)), timeout=600)
        if result.error is not None or result.value is None:
            raise SystemExit(f"reading the guest's page maps failed: {result.error}")
        found, roles, labels = ast.literal_eval(result.value)
    by_owner: Counter[str] = Counter()
    by_mapping: Counter[str] = Counter()
    for gfn, perms in frames:
        by_owner[f"({perms})"] += 1
        if gfn not in found:
            by_owner["no process maps it now"] += 1
            continue
        count, pid, index = found[gfn]
        label = labels[index]
        if count == 1:
            who = f"{role(roles.get(pid, ''))} (pid {pid})"
            by_owner[who] += 1
            by_mapping[f"{label}, {who}"] += 1
        else:
            by_owner[f"shared by {count} mappings"] += 1
            by_mapping[f"{label}, shared by {count}"] += 1
    return by_owner, by_mapping


def main() -> None:
    args = workload_parser(__doc__, runs=2, top=25).parse_args()
    mount_tracefs(16)
    if not (TRACEFS / EVENT).is_dir():
        raise SystemExit(f"needs {TRACEFS}/{EVENT} (a KVM with its MMU tracepoints)")
    Sandbox().close()  # the zygote warm, the template built: not traced
    owners: Counter[str] = Counter()
    mappings: Counter[str] = Counter()
    for _ in range(args.runs):
        by_owner, by_mapping = one_run(args.workload, args.settle, args.gap)
        owners.update(by_owner)
        mappings.update(by_mapping)
    runs = args.runs
    total = sum(n for key, n in owners.items() if key.startswith("("))
    print(f"{args.workload}: {total / runs:.0f} shadow entries made per run ({runs} runs)")
    print("  by permission, then by the process that maps the frame:")
    for key, n in sorted(owners.items(), key=lambda kv: (not kv[0].startswith("("), -kv[1])):
        print(f"  {n / runs:8.0f}  {key}")
    print(f"  top {args.top} mappings:")
    for key, n in mappings.most_common(args.top):
        print(f"  {n / runs:8.0f}  {key}")


if __name__ == "__main__":
    main()
